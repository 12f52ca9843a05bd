"""Held-out evaluation: fixed prompts, fixed noises, deployment sampling."""

import pytest
import torch
from trainer_support import PROMPTS, free_port

from kvpo.evaluate import evaluate
from kvpo.method.rollout import generate
from kvpo.rewards import CompositeReward


def test_evaluate_averages_over_fixed_noises(model):
    reward = CompositeReward({"alignment": 1.0, "visual": 0.5})
    ev_one = evaluate(model, PROMPTS, reward, seed=3, device=torch.device("cpu"))
    ev_two = evaluate(model, PROMPTS, reward, seed=3, device=torch.device("cpu"), seeds=3)
    one, two = ev_one.scores, ev_two.scores
    # The videos returned are those of the first noise, the same whatever the number of noises.
    assert ev_two.videos.shape == ev_one.videos.shape == (2, model.num_frames, 3, 8, 8)
    torch.testing.assert_close(ev_two.videos, ev_one.videos)
    # The reward averages all 3 x 2 samples: recompute it from the videos of the same seed.
    nC = model.num_frames // model.chunk_frames
    asked = PROMPTS * 3
    v = generate(model, [[p] * nC for p in asked], torch.Generator().manual_seed(3))
    torch.testing.assert_close(ev_two.videos, v[: len(PROMPTS)].clamp(-1, 1))  # as drawn
    comps = reward.components((v + 1) / 2, asked)
    total = reward.total(comps).double().view(3, len(PROMPTS))
    assert abs(two["eval_reward"] - float(total.mean())) < 1e-6
    assert abs(two["eval_reward"] - one["eval_reward"]) > 1e-6
    # each prompt's row: its own samples' means, over its 3 noises
    assert [r["prompt"] for r in ev_two.per_prompt] == PROMPTS
    for j, row in enumerate(ev_two.per_prompt):
        assert row["eval_reward"] == pytest.approx(float(total[:, j].mean()), abs=1e-6)
        for k, c in comps.items():
            want = float(c.double().view(3, len(PROMPTS))[:, j].mean())
            assert row[f"eval_{k}"] == pytest.approx(want, abs=1e-6)
    rows = ev_two.per_prompt
    assert rows[0]["eval_reward"] != pytest.approx(rows[1]["eval_reward"], abs=1e-4)
    # diversity: the RMS distance between two noises' samples of a prompt over their RMS, on
    # frames averaged down to 8 x 8 pixels (at most 16 x 16: these frames are 8 x 8 already)
    x = ((v.double() + 1) / 2).view(3, len(PROMPTS), -1)
    pair = [
        [(x[s, p] - x[t, p]).square().mean() for s in range(3) for t in range(3) if s != t]
        for p in range(len(PROMPTS))
    ]
    rms = [x[:, p].square().mean() for p in range(len(PROMPTS))]
    div = [float((sum(d) / len(d) / r).sqrt()) for d, r in zip(pair, rms, strict=True)]
    assert two["eval_diversity"] == pytest.approx(sum(div) / len(div), rel=1e-5)
    assert [r["eval_diversity"] for r in rows] == pytest.approx(div, rel=1e-5)
    assert "eval_diversity" not in one  # one noise: nothing to compare
    assert all("eval_diversity" not in r for r in ev_one.per_prompt)


def test_evaluate_keeps_videos_only_when_asked(model):
    reward = CompositeReward({"visual": 1.0})
    cpu = torch.device("cpu")
    kept = evaluate(model, PROMPTS, reward, seed=3, device=cpu, seeds=2)
    bare = evaluate(model, PROMPTS, reward, seed=3, device=cpu, seeds=2, videos=False)
    assert bare.videos is None and kept.videos is not None
    assert bare.scores == kept.scores and bare.per_prompt == kept.per_prompt


def test_evaluation_in_passes_makes_the_same_samples(model):
    """batch=k makes k videos at a time, each from the noise it has in the whole batch."""
    reward = CompositeReward({"alignment": 1.0, "visual": 0.5})
    cpu = torch.device("cpu")
    whole = evaluate(model, PROMPTS, reward, seed=3, device=cpu, seeds=3)
    for batch in (1, 4, 6, 10):
        part = evaluate(model, PROMPTS, reward, seed=3, device=cpu, seeds=3, batch=batch)
        assert part.scores == pytest.approx(whole.scores, rel=1e-5, abs=1e-6)
        assert [r["prompt"] for r in part.per_prompt] == PROMPTS
        for a, b in zip(part.per_prompt, whole.per_prompt, strict=True):
            assert a.keys() == b.keys()
            assert {k: a[k] for k in b if k != "prompt"} == pytest.approx(
                {k: v for k, v in b.items() if k != "prompt"}, abs=1e-6
            )
        torch.testing.assert_close(part.videos, whole.videos, rtol=0, atol=1e-5)


def test_cli_reproduces_the_runs_evaluation(base, tmp_path, capsys):
    """python -m kvpo.evaluate --checkpoint: the run's last held-out scores, policy and EMA."""
    import json

    from trainer_support import run_overrides

    from kvpo.evaluate import main
    from kvpo.run.config import build_config
    from kvpo.trainer import train

    cfg = build_config(run_overrides(base, tmp_path, ema=0.5, samples=True, eval_seeds=2))
    last = train(cfg).history[-1]
    ckpt = str(tmp_path / "checkpoint.safetensors")
    per = tmp_path / "eval" / "per_prompt.jsonl"
    scores = main(["--checkpoint", ckpt, "--device", "cpu", "--per_prompt", str(per)])
    assert scores["eval_reward"] == pytest.approx(last["eval_reward"], rel=1e-6)
    assert scores["eval_alignment"] == pytest.approx(last["eval_alignment"], rel=1e-6)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == scores
    # each prompt's scores: those the run logged for its last evaluation (policy and EMA)
    logged = [json.loads(x) for x in (tmp_path / "eval_prompts.jsonl").read_text().splitlines()]
    logged = [r for r in logged if r["iter"] == last["iter"]]
    rows = [json.loads(x) for x in per.read_text().splitlines()]
    assert len(rows) == len(logged) == 2 and rows[0]["prompt"] != rows[1]["prompt"]
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in logged]
    for row, log in zip(rows, logged, strict=True):
        assert set(row) == {"prompt", "eval_reward", "eval_diversity"} | {
            f"eval_{k}" for k in ("alignment", "motion", "path", "visual")
        }
        assert {k: log[k] for k in row if k != "prompt"} == pytest.approx(
            {k: v for k, v in row.items() if k != "prompt"}, rel=1e-6
        )
    # --samples: the run's own samples_after (its last evaluation's first noise)
    import imageio.v3 as iio

    main(["--checkpoint", ckpt, "--samples", str(tmp_path / "again" / "grid")])
    again = iio.imread(tmp_path / "again" / "grid.gif")
    assert (again == iio.imread(tmp_path / "samples_after.gif")).all()
    ema = main(["--checkpoint", ckpt, "--ema", "--device", "cpu", "--per_prompt", str(per)])
    assert ema["eval_reward"] == pytest.approx(last["eval_ema_reward"], rel=1e-6)
    rows = [json.loads(x) for x in per.read_text().splitlines()]
    for row, log in zip(rows, logged, strict=True):
        assert row["eval_reward"] == pytest.approx(log["eval_ema_reward"], rel=1e-6)
        assert row["eval_diversity"] == pytest.approx(log["eval_ema_diversity"], rel=1e-6)
    one = main(["--checkpoint", ckpt, "--set", "eval_seeds=1", "--set", "eval_batch=3"])
    assert one["eval_reward"] != pytest.approx(scores["eval_reward"], rel=1e-6)
    for bad, match in (
        (["--set", "lr=1"], "not one of"),
        (["--set", "eval_seeds"], "field=value"),
        (["--set", "eval_seeds=0"], "eval_seeds"),
        (["--checkpoint", str(tmp_path / "none.safetensors")], "does not exist"),
        (["--samples", str(per / "grid")], r"--samples .*grid: cannot write in"),
        (["--per_prompt", str(per / "p.jsonl")], r"--per_prompt .*p.jsonl: cannot write in"),
    ):
        with pytest.raises(SystemExit, match=match):
            main(["--checkpoint", ckpt, *bad])


def test_cli_under_torchrun_gives_one_process_scores(base, tmp_path):
    """Two ranks make their shares of the samples: the scores (printed once) and each prompt's
    are those of one process."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from trainer_support import run_overrides

    from kvpo.evaluate import main
    from kvpo.run.config import build_config
    from kvpo.trainer import train

    train(build_config(run_overrides(base, tmp_path, iterations=1, samples=False, eval_seeds=3)))
    ckpt = str(tmp_path / "checkpoint.safetensors")
    one = main(["--checkpoint", ckpt, "--per_prompt", str(tmp_path / "one.jsonl")])
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            free_port(),
            "-m",
            "kvpo.evaluate",
            "--checkpoint",
            ckpt,
            "--device",
            "cpu",
            "--set",
            "eval_batch=2",
            "--per_prompt",
            str(tmp_path / "two.jsonl"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)},
    )
    assert res.returncode == 0, res.stderr[-4000:]
    (line,) = [x for x in res.stdout.splitlines() if x.startswith("{")]  # rank 0's only
    assert json.loads(line) == pytest.approx(one, rel=1e-5, abs=1e-6)
    rows = [
        [json.loads(x) for x in (tmp_path / f).read_text().splitlines()]
        for f in ("one.jsonl", "two.jsonl")
    ]
    for a, b in zip(*rows, strict=True):
        assert a.pop("prompt") == b.pop("prompt") and b == pytest.approx(a, rel=1e-5, abs=1e-6)


def test_evaluation_runs_in_eval_mode_and_restores_the_mode(model):
    """A policy evaluated between updates samples as deployed (no dropout), then trains on."""
    from kvpo.evaluate import evaluate_sets
    from kvpo.run.config import build_config

    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(m.training))
    model.train()
    sets = {"eval_": PROMPTS}
    cfg = build_config(dict(eval_seeds=1))
    evaluate_sets(model, sets, CompositeReward({"visual": 1.0}), cfg, torch.device("cpu"))
    assert seen and not any(seen) and model.training
