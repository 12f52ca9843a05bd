"""python -m kvpo.summary: a run's (or several runs') outcome from its logs."""

import json

import pytest
from trainer_support import run_overrides

from kvpo.run.config import build_config
from kvpo.summary import main, prompt_changes, summarize
from kvpo.trainer import train


def _prompt_rows(out):
    return [json.loads(x) for x in (out / "eval_prompts.jsonl").read_text().splitlines()]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_prompt_changes_compare_the_first_and_last_evaluation(tmp_path):
    path = tmp_path / "eval_prompts.jsonl"
    assert prompt_changes(path) is None  # no evaluation yet
    rows = [
        {"iter": -1, "prompt": "a", "eval_reward": 0.5},
        {"iter": -1, "prompt": "b", "eval_reward": 0.9},
        {"iter": -1, "prompt": "c", "eval_reward": 0.2},
    ]
    _write(path, rows)
    assert prompt_changes(path) is None  # one evaluation: nothing moved
    later = [
        {"iter": 4, "prompt": "a", "eval_reward": 0.1},  # a middle evaluation, not compared
        {"iter": 9, "prompt": "a", "eval_reward": 0.75},
        {"iter": 9, "prompt": "b", "eval_reward": 0.8},
        {"iter": 9, "prompt": "c", "eval_reward": 0.25},
    ]
    _write(path, rows + later)
    assert prompt_changes(path) == (
        "per prompt: 2 of 3 held-out prompts rose (best eval_reward +0.2500: 'a'; "
        "worst -0.1000: 'b') in eval_prompts.jsonl"
    )


def test_a_runs_summary_is_its_logs(base, tmp_path, capsys):
    over = run_overrides(base, tmp_path / "a", iterations=3, samples=False, ema=0.5, eval_seeds=2)
    res = train(build_config(over))
    hist = res.history  # the evaluation before training, then 3 iterations
    row = summarize(tmp_path / "a")
    assert row["iterations"] == 3 and row["of"] == 3 and row["metric"] == "eval_reward"
    assert (row["first"], row["first_iter"]) == (hist[0]["eval_reward"], -1)
    assert (row["last"], row["last_iter"]) == (hist[-1]["eval_reward"], 2)
    best = max(hist, key=lambda h: h["eval_reward"])
    assert (row["best"], row["best_iter"]) == (best["eval_reward"], best["iter"])
    assert row["ema_last"] == hist[-1]["eval_ema_reward"]
    assert (row["diversity_first"], row["diversity_last"]) == (
        hist[0]["eval_diversity"],
        hist[-1]["eval_diversity"],
    )
    per = [json.loads(x) for x in (tmp_path / "a" / "eval_prompts.jsonl").read_text().splitlines()]
    rose = sum(b["eval_reward"] > a["eval_reward"] for a, b in zip(per[:2], per[-2:], strict=True))
    assert (row["prompts_rose"], row["prompts"]) == (rose, 2)
    times = [sum(v for k, v in h.items() if k.startswith("time_")) for h in hist[1:]]
    assert row["seconds_per_iteration"] == pytest.approx(sum(times) / 3)
    assert row["skipped_steps"] == 0 and row["cuda_peak_gib"] is None  # a CPU run
    assert row["rollout_cache_mib"] == max(h["rollout_cache_mib"] for h in hist[1:]) > 0
    assert row["where"] == "1 x cpu"  # ranks x GPU, or the device
    groups = [json.loads(x) for x in (tmp_path / "a" / "groups.jsonl").read_text().splitlines()]
    assert row["trained_groups"] == pytest.approx(sum(g["trained"] for g in groups) / len(groups))
    path = summarize(tmp_path / "a", "eval_path")
    assert path["last"] == hist[-1]["eval_path"] and path["ema_last"] == hist[-1]["eval_ema_path"]
    # a second run beside it: a row each, in the order asked
    train(build_config(run_overrides(base, tmp_path / "b", iterations=1, samples=False)))
    capsys.readouterr()
    rows = main([str(tmp_path / "a"), str(tmp_path / "b")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| run | on | iterations | eval_reward first | best | last |")
    assert f"| {100 * row['trained_groups']:.0f} % |" in lines[2]
    assert f"| {row['rollout_cache_mib']:.1f} |  |" in lines[2]  # KV MiB, no GPU peak
    assert len(lines) == 4 and lines[2].startswith(f"| {tmp_path / 'a'} | 1 x cpu | 3 / 3 | ")
    assert f"{hist[-1]['eval_reward']:.4f} @2" in lines[2] and f"{rose} / 2" in lines[2]
    assert lines[3].startswith(f"| {tmp_path / 'b'} | 1 x cpu | 1 / 1 | ")
    assert rows[1]["ema_last"] is None
    main(["--json", str(tmp_path / "a")])
    assert json.loads(capsys.readouterr().out) == [row]
    # --prompts: each held-out prompt before training, then at each run's end
    main(["--prompts", str(tmp_path / "a"), str(tmp_path / "b")])
    lines = capsys.readouterr().out.split("\n\n")[1].splitlines()
    assert lines[0] == f"| prompt | before | {tmp_path / 'a'} | {tmp_path / 'b'} |"
    ends = {d: _prompt_rows(tmp_path / d) for d in "ab"}
    for line, first, a, b in zip(lines[2:], per[:2], ends["a"][-2:], ends["b"][-2:], strict=True):
        assert first["prompt"] == a["prompt"] == b["prompt"] and first["iter"] == -1
        want = [first["prompt"], *(f"{r['eval_reward']:.4f}" for r in (first, a, b))]
        assert [c.strip() for c in line.strip("| ").split(" | ")] == want
    (tmp_path / "old").mkdir()  # an older kvpo's run: metrics, no per-prompt log
    (tmp_path / "old" / "metrics.jsonl").write_text((tmp_path / "b" / "metrics.jsonl").read_text())
    assert main([str(tmp_path / "old")])[0]["prompts"] is None
    for argv, match in (
        (["--prompts", str(tmp_path / "old")], "no eval_prompts.jsonl"),
        ([str(tmp_path / "none")], "not a directory"),
        ([str(tmp_path)], "no metrics.jsonl or config.yaml"),
        (["--metric", "reward", str(tmp_path / "a")], "a held-out metric"),
        (["--metric", "eval_rewrd", str(tmp_path / "a")], r"no run logged it; .*'eval_reward'"),
    ):
        with pytest.raises(SystemExit, match="error: .*" + match):
            main(argv)
