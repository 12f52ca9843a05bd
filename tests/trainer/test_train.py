"""The trainer end to end on a tiny generator: outputs, exact resume, errors, two ranks."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from trainer_support import (
    OwnGenerator,
    checkpoint_meta,
    cli_args,
    free_port,
    run_overrides,
    straight_and_resumed,
    tiny_model,
)

from kvpo.evaluate import evaluate, evaluation_metrics, turned_prompts
from kvpo.generators import data
from kvpo.method.update import NonFiniteGradientError
from kvpo.rewards import CompositeReward
from kvpo.run.checkpoint import CheckpointError, load_model, prune_checkpoints
from kvpo.run.config import ConfigError, build_config, parse_args
from kvpo.run.setup import make_reward
from kvpo.trainer import main, train

ROOT = Path(__file__).resolve().parents[2]


def _cfg(base, out, **kw):
    return build_config(run_overrides(base, out, **kw))


def test_run_writes_logs_plot_samples_and_checkpoint(base, tmp_path, capsys):
    res_cfg = _cfg(base, tmp_path, samples=True, reward_fns={}, window_shift=1)
    res = train(res_cfg)
    before, *rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert before == res.history[0] and before["iter"] == -1  # the evaluation before training
    assert [r["iter"] for r in rows] == [0, 1]
    for key in (
        "reward",
        "reward_alignment_std",
        "tve",
        "ratio",
        "clip_frac",
        "kl",
        "grad_norm",
        "time_rollout",
        "time_reward",
        "time_reference",
        "time_replay",
        "time_update",
        "eval_reward",
        "valid_groups",
        "branch_spread",
        "adv_mean",
        "adv_abs",
    ):
        assert key in rows[-1], key
    assert rows[0]["tve"] > 0  # routed branches are away from the full-context policy
    assert all(0 < r["branch_spread"] < 2 for r in rows)  # and from each other
    for r in rows:  # group advantages are centred in every trained group
        assert abs(r["adv_mean"]) < 1e-3 and (r["adv_abs"] > 0) == (r["valid_groups"] > 0)
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "reward" in header and "eval_reward" in header
    # eval_prompts: a row per held-out prompt and evaluation; the metrics' means over prompts
    per = _prompt_rows(tmp_path)
    assert [r["iter"] for r in per] == [-1, -1, 0, 0, 1, 1]
    assert per[0]["prompt"] != per[1]["prompt"]
    assert per[0]["eval_reward"] != pytest.approx(per[1]["eval_reward"], abs=1e-4)
    for r in rows:
        mine = [p for p in per if p["iter"] == r["iter"]]
        for k in ("eval_reward", "eval_alignment", "eval_diversity"):
            assert sum(p[k] for p in mine) / len(mine) == pytest.approx(r[k], rel=1e-6), k
    header = (tmp_path / "eval_prompts.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["iter", "prompt", "eval_alignment"]
    # groups: a row per group and iteration, the metrics' means over them
    groups = [json.loads(x) for x in (tmp_path / "groups.jsonl").read_text().splitlines()]
    assert [g["iter"] for g in groups] == [0, 0, 1, 1]
    train_prompts = set(data.split_prompts(num_eval=2)[0])
    assert all(g["prompt"] in train_prompts for g in groups)
    for r in rows:
        mine = [g for g in groups if g["iter"] == r["iter"]]
        assert sum(g["trained"] for g in mine) == r["valid_groups"]
        for k in ("reward", "reward_path", "branch_spread"):
            assert sum(g[k] for g in mine) / 2 == pytest.approx(r[k], rel=1e-6), k
        assert all(g["reward_std"] > 0 and g["adv_abs"] >= 0 for g in mine)
    rose = sum(b["eval_reward"] > a["eval_reward"] for a, b in zip(per[:2], per[-2:], strict=True))
    assert f"per prompt: {rose} of 2 held-out prompts rose" in capsys.readouterr().out
    for name in (
        "rewards.png",
        "samples_before.gif",
        "samples_after.gif",
        "samples_after.mp4",
        "checkpoint.safetensors",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    assert res.history[-1]["iter"] == 1
    # config.yaml is the run's config, read back by --config
    assert parse_args(["--config", str(tmp_path / "config.yaml")]) == res_cfg
    base_model = tiny_model()
    moved = sum(
        (a - b).abs().sum()
        for a, b in zip(res.model.parameters(), base_model.parameters(), strict=True)
    )
    assert moved > 0


def test_without_the_evaluation_before_training(base, tmp_path, capsys):
    res = train(_cfg(base, tmp_path, samples=True, eval_before=False, eval_every=2))
    assert [h["iter"] for h in res.history] == [0, 1] and "eval_reward" not in res.history[0]
    assert "eval_reward" in res.history[1] and not (tmp_path / "samples_before.gif").exists()
    out = capsys.readouterr().out
    assert (
        "before training" not in out
        and f"done: eval reward {res.history[1]['eval_reward']:.4f}" in out
    )


def test_sample_routing_local_window_recache_and_window_shift(base, tmp_path):
    """The public recipe's exploration: a local window refilled from older history, the window
    start drawn per iteration, multi-prompt videos with KV re-cache; the trained model keeps the
    deployment context it was trained with."""
    cfg = _cfg(
        base,
        tmp_path,
        iterations=4,
        routing="sample",
        local_window=2,
        recent_frames=1,
        window=(2, 3),
        window_shift=2,
        multi_prompt=1.0,
        recache=True,
        samples=False,
    )
    res = train(cfg)
    starts = [r["window_start"] for r in res.history if r["iter"] >= 0]
    assert set(starts) <= {2, 3, 4} and len(set(starts)) > 1
    saved = load_model(tmp_path / "checkpoint.safetensors")
    assert saved.local_window == 2 and saved.recache
    # the error names the window and shift as written, then the shifted window that fails
    with pytest.raises(ValueError, match=r"window_shift=2 starts window=\(2, 4\).* \(4, 6\)"):
        train(_cfg(base, tmp_path / "b", window=(2, 4), window_shift=2))
    with pytest.raises(ValueError, match="local_window=None"):
        train(_cfg(base, tmp_path / "c", routing="sample"))
    # Chunk 2's 4 history frames fit in 1 sink + a 3-frame window: at window start 2 every branch
    # would see the same context.
    with pytest.raises(ValueError, match=r"window \(2, 3\): no chunk's branches can attend"):
        train(
            _cfg(
                base,
                tmp_path / "d",
                routing="sample",
                local_window=3,
                recent_frames=2,
                window=(2, 3),
                window_shift=2,
            )
        )
    with pytest.raises(ValueError, match="p_keep=1.0"):
        train(_cfg(base, tmp_path / "e", p_keep=1.0))
    # The post-fork clip of the window started a chunk later is one chunk (2 frames), too short
    # for motion (3): refused before any rollout or evaluation.
    with pytest.raises(ValueError, match=r"'motion' .* 'global' at window \(4, 5\)"):
        train(
            _cfg(
                base,
                tmp_path / "f",
                window=(3, 4),
                window_shift=1,
                reward_scopes={"global": 1.0},
                reward_weights={"motion": 1.0},
            )
        )
    assert not (tmp_path / "f" / "metrics.jsonl").exists()


def test_samples_at_eval_keep_the_group_each_evaluation_trained_on(base, tmp_path, monkeypatch):
    """samples/group_N: the anchor and branches of the first group of iteration N - 1, as the
    rollout made them, with the rewards and advantages the update read."""
    import imageio.v3 as iio

    import kvpo.trainer as trainer
    from kvpo.run.report import video_grid

    seen, real = [], trainer.explore
    monkeypatch.setattr(trainer, "explore", lambda *a: seen.append(real(*a)) or seen[-1])
    train(_cfg(base, tmp_path, samples=True, samples_at_eval=True, advantage="anchor"))
    assert len(seen) == 2
    for it, ex in enumerate(seen):
        stem = tmp_path / "samples" / f"group_{it + 1:06d}"
        info = json.loads(stem.with_suffix(".json").read_text())
        ro = ex.parts[0]
        assert [info["prompt"]] * len(ro.prompts[0]) == ro.prompts[0]  # one prompt: a string
        assert info["window"] == list(ro.window)
        assert info["columns"] == ["anchor", "branch 0", "branch 1", "branch 2"]
        assert info["reward"] == pytest.approx(ex.total[0].tolist(), abs=1e-6)
        assert info["advantage"] == pytest.approx(ex.adv[0].tolist(), abs=1e-6)
        assert info["reward_path"] == pytest.approx(ex.comps["path"][0].tolist(), abs=1e-6)
        assert info["trained"] == bool(ex.valid[0])
        assert info["branch_spread"] == pytest.approx(float(ro.branch_spread()[0]), rel=1e-5)
        want = video_grid(load_model(base).to_video(ro.group_tokens(0))).numpy()
        got = iio.imread(stem.with_suffix(".gif"))[..., :3]
        assert got.shape == want.shape  # the anchor's and the 3 branches' columns
        assert np.abs(got.astype(int) - want).mean() < 4  # GIF palette rounding only
    train(_cfg(base, tmp_path / "g", samples=True, samples_at_eval=True, iterations=1))
    info = json.loads((tmp_path / "g" / "samples" / "group_000001.json").read_text())
    assert info["columns"] == ["branch 0", "branch 1", "branch 2"]  # no anchor rolled out


def _prompt_rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "eval_prompts.jsonl").read_text().splitlines()]


def test_resume_continues_exactly(base, tmp_path):
    """Policy, AdamW state and EMA all continue as if never stopped."""
    straight = train(_cfg(base, tmp_path / "a", iterations=3, samples=False, ema=0.5))
    train(_cfg(base, tmp_path / "b", iterations=2, samples=False, ema=0.5))
    ckpt = tmp_path / "b" / "checkpoint.safetensors"
    resumed = train(
        _cfg(base, tmp_path / "b", iterations=3, samples=False, ema=0.5, resume=str(ckpt))
    )
    for a, b in ((straight.model, resumed.model), (straight.ema, resumed.ema)):
        for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
            assert torch.equal(p, q), n
    saved = load_model(ckpt, ema=True)
    for (n, p), q in zip(saved.named_parameters(), resumed.ema.parameters(), strict=True):
        assert torch.equal(p, q), n
    # the EMA lags the policy: it is neither the policy nor the base
    policy = dict(resumed.model.named_parameters())
    moved = [n for n, p in saved.named_parameters() if not torch.equal(p, policy[n])]
    assert moved
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows] == [-1, 0, 1, 2]
    assert all(("eval_ema_reward" in r) == (r["iter"] >= 0) for r in rows)
    # each held-out prompt's scores, policy and EMA in one row: those of the run never stopped
    per = {d: _prompt_rows(tmp_path / d) for d in "ab"}
    assert [(r["iter"], r["prompt"]) for r in per["b"]] == [
        (it, p) for it in (-1, 0, 1, 2) for p in data.split_prompts(num_eval=2)[1][:2]
    ]
    assert all(("eval_ema_reward" in r) == (r["iter"] >= 0) for r in per["b"])
    for a, b in zip(per["a"], per["b"], strict=True):
        assert a.keys() == b.keys() and a["prompt"] == b["prompt"]
        assert {k: b[k] for k in a if k != "prompt"} == pytest.approx(
            {k: v for k, v in a.items() if k != "prompt"}, rel=1e-5
        )
    groups = {d: (tmp_path / d / "groups.jsonl").read_text().splitlines() for d in "ab"}
    assert len(groups["a"]) == 6
    for a, b in zip(*(map(json.loads, groups[d]) for d in "ab"), strict=True):
        assert (a.pop("prompt"), a.pop("trained")) == (b.pop("prompt"), b.pop("trained"))
        assert b == pytest.approx(a, rel=1e-5)
    train(_cfg(base, tmp_path / "c", iterations=1, samples=False))
    train(_cfg(base, tmp_path / "c", iterations=1, samples=False))  # anew: a former run's rows go
    assert [r["iter"] for r in _prompt_rows(tmp_path / "c")] == [-1, -1, 0, 0]
    with pytest.raises(CheckpointError, match="no EMA"):
        load_model(tmp_path / "c" / "checkpoint.safetensors", ema=True)


def test_a_step_with_a_nan_gradient_is_skipped_and_a_run_of_them_stops(
    base, tmp_path, monkeypatch, capsys
):
    """A NaN gradient leaves weights, AdamW and EMA as they were, is logged, and training goes
    on; more skipped steps in a row than max_skipped_steps stop the run with a clear error."""
    import kvpo.method.update as update

    accumulate, poison, seen = update.accumulate_gradients, set(), []

    def poisoned(cfg, model, *args):
        seen.append([p.detach().clone() for p in model.parameters()])
        out = accumulate(cfg, model, *args)
        if len(seen) in poison:
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = math.nan
        return out

    monkeypatch.setattr(update, "accumulate_gradients", poisoned)
    poison.update({3})  # iteration 1's first of its 2 epochs
    res = train(
        _cfg(base, tmp_path / "a", iterations=3, samples=False, max_skipped_steps=1, ema=0.5)
    )
    assert [r["skipped_steps"] for r in res.history if r["iter"] >= 0] == [0, 1, 0]
    assert math.isnan(res.history[2]["grad_norm"]) and math.isfinite(res.history[3]["grad_norm"])
    assert all(torch.equal(a, b) for a, b in zip(seen[2], seen[3], strict=True))  # skipped
    assert not all(torch.equal(a, b) for a, b in zip(seen[1], seen[2], strict=True))  # stepped
    assert all(p.isfinite().all() for p in [*res.model.parameters(), *res.ema.parameters()])
    scalars = json.loads(
        checkpoint_meta(tmp_path / "a" / "checkpoint.safetensors")["optim_scalars"]
    )
    assert {s["step"] for s in scalars.values()} == {5.0}  # 6 steps, one skipped
    assert (
        "it    1 | 1 of 2 optimizer steps skipped: NaN or inf gradient" in capsys.readouterr().out
    )

    seen.clear()
    poison.update({4})  # and the next one: two in a row
    with pytest.raises(
        NonFiniteGradientError, match=r"2 optimizer steps in a row .*max_skipped_steps=1"
    ):
        train(_cfg(base, tmp_path / "b", iterations=3, samples=False, max_skipped_steps=1))
    seen.clear()
    with pytest.raises(ValueError, match="max_skipped_steps=-1"):
        train(_cfg(base, tmp_path / "c", max_skipped_steps=-1))


def test_a_policy_that_makes_nan_videos_stops_naming_the_generator(base, tmp_path):
    """Too large an lr: finite weights whose videos overflow to NaN. The run stops with an error
    that blames the generator, not the reward that would have turned them into NaN scores."""
    over = run_overrides(base, tmp_path, lr=1e3, iterations=3, samples=False, eval_every=5)
    with pytest.raises(SystemExit, match=r"^error: videos .* hold NaN or inf .* the generator"):
        main(cli_args(over))


def test_warmup_logs_its_rates_and_resumes_exactly(base, tmp_path):
    kw = dict(samples=False, lr=1e-3, lr_warmup=2, eval_every=5)
    straight = train(_cfg(base, tmp_path / "a", iterations=3, **kw))
    assert [r["lr"] for r in straight.history if "lr" in r] == pytest.approx([5e-4, 1e-3, 1e-3])
    train(_cfg(base, tmp_path / "b", iterations=2, **kw))
    ckpt = str(tmp_path / "b" / "checkpoint.safetensors")
    resumed = train(_cfg(base, tmp_path / "b", iterations=3, resume=ckpt, **kw))
    for (n, p), q in zip(
        straight.model.named_parameters(), resumed.model.parameters(), strict=True
    ):
        assert torch.equal(p, q), n
    # the warmup's first step is half the size of a full-rate one: the weights moved less
    full = train(_cfg(base, tmp_path / "c", iterations=1, samples=False, lr=1e-3, eval_every=5))
    half = train(_cfg(base, tmp_path / "d", iterations=1, **kw))
    start = tiny_model()

    def moved(m):
        pairs = zip(m.parameters(), start.parameters(), strict=True)
        return sum(float((p - q).detach().abs().sum()) for p, q in pairs)

    assert 0 < moved(half.model) < moved(full.model)


def test_held_out_prompts_from_their_own_file(base, tmp_path):
    """eval_prompts_file: the evaluation's prompts; prompts_file (or the built-in set) all
    trains."""
    from kvpo.run.setup import config_prompts

    train_p, held_p = data.split_prompts()
    (tmp_path / "train.txt").write_text("\n".join(train_p[:3]) + "\n")
    (tmp_path / "held.txt").write_text("\n\n".join(held_p[5:7]) + "\n")
    files = dict(prompts_file=str(tmp_path / "train.txt"))
    held = dict(eval_prompts_file=str(tmp_path / "held.txt"))
    assert config_prompts(build_config({**files, **held})) == (train_p[:3], held_p[5:7])
    assert config_prompts(build_config(held)) == (data.split_prompts(num_eval=16)[0], held_p[5:7])
    assert config_prompts(build_config(files | {"eval_prompts": 1})) == (train_p[:2], train_p[2:3])
    kw = dict(iterations=1, samples=False, eval_seeds=2, eval_prompts=4, **files, **held)
    res = train(_cfg(base, tmp_path / "run", **kw))
    want = evaluate(
        load_model(base), held_p[5:7], make_reward(build_config({})), 0, torch.device("cpu"), 2
    ).scores
    assert res.history[0]["eval_reward"] == pytest.approx(want["eval_reward"], rel=1e-6)
    (tmp_path / "empty.txt").write_text("\n\n")
    for bad, match in (
        (str(tmp_path / "none.txt"), "eval_prompts_file=.*No such file"),
        (str(tmp_path / "empty.txt"), "eval_prompts_file=.*no prompts"),
    ):
        with pytest.raises(ValueError, match=match):
            train(_cfg(base, tmp_path / "bad", **{**kw, "eval_prompts_file": bad}))


def test_kept_checkpoints_resume_from_their_step(base, tmp_path):
    kw = dict(samples=False, eval_every=5, save_every=1)
    straight = train(_cfg(base, tmp_path / "a", iterations=2, keep_checkpoints=True, **kw))
    kept = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    assert kept == ["step_000001.safetensors", "step_000002.safetensors"]
    # the newest is the checkpoint under a second name (a hard link, not a copy); the older one
    # still holds its own step's state (below: it resumes to the same weights)
    latest = tmp_path / "a" / "checkpoints" / "step_000002.safetensors"
    assert latest.samefile(tmp_path / "a" / "checkpoint.safetensors")
    first = str(tmp_path / "a" / "checkpoints" / "step_000001.safetensors")
    again = train(_cfg(base, tmp_path / "b", iterations=2, resume=first, **kw))
    for (n, p), q in zip(straight.model.named_parameters(), again.model.parameters(), strict=True):
        assert torch.equal(p, q), n
    assert not (tmp_path / "b" / "checkpoints").exists()  # off by default


def test_keep_last_keeps_the_newest_kept_checkpoints(base, tmp_path):
    """keep_last=2 leaves the last two saves of checkpoints/ (each the state after its step); a
    run resumed from an earlier one leaves the later files of the run it left alone until it
    overwrites them, and prunes only those up to its own step."""
    kw = dict(samples=False, eval_every=5, save_every=1, keep_checkpoints=True, keep_last=2)
    res = train(_cfg(base, tmp_path / "a", iterations=3, **kw))
    folder = tmp_path / "a" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [
        "step_000002.safetensors",
        "step_000003.safetensors",
    ]
    for (n, p), q in zip(
        res.model.named_parameters(),
        load_model(folder / "step_000003.safetensors").parameters(),
        strict=True,
    ):
        assert torch.equal(p, q), n
    for n in (1, 4, 5):  # as if a longer run had been here, and restarted after step 1
        (folder / f"step_{n:06d}.safetensors").write_bytes(b"")
    assert prune_checkpoints(folder, 2, keep=1) == [folder / "step_000001.safetensors"]
    left = sorted(p.name for p in folder.iterdir())
    assert left == [f"step_{n:06d}.safetensors" for n in (2, 3, 4, 5)]
    with pytest.raises(ValueError, match="keep_last=2: needs keep_checkpoints=true"):
        _cfg(base, tmp_path / "b", keep_last=2)


def test_the_best_evaluation_keeps_its_state(base, tmp_path):
    """best.safetensors is the state at the best held-out reward (the base, before training,
    counts): the kept checkpoint of that step, or the base."""
    kw = dict(iterations=4, eval_every=1, keep_checkpoints=True, samples=False, lr=3e-3)
    res = train(_cfg(base, tmp_path, keep_best="eval_reward", **kw))
    rows = [h for h in res.history if "eval_reward" in h]
    top = max(rows, key=lambda h: h["eval_reward"])
    assert int(checkpoint_meta(tmp_path / "best.safetensors")["iteration"]) == top["iter"] + 1
    best = load_model(tmp_path / "best.safetensors")
    same = (
        tmp_path / "checkpoints" / f"step_{top['iter'] + 1:06d}.safetensors"
        if top["iter"] >= 0
        else base
    )
    for (n, p), q in zip(best.named_parameters(), load_model(same).parameters(), strict=True):
        assert torch.equal(p, q), n
    assert len({h["eval_reward"] for h in rows}) > 1  # the runs' evaluations differ
    with pytest.raises(
        ValueError, match=r"keep_best='eval_ema_reward' is not a metric .*eval_reward"
    ):
        train(_cfg(base, tmp_path / "b", keep_best="eval_ema_reward"))
    with pytest.raises(ValueError, match="keep_best='reward'"):
        _cfg(base, tmp_path / "c", keep_best="reward")


def test_keep_best_names_any_logged_metric_the_emas_included(base, tmp_path):
    """The metrics an evaluation logs are known as the run starts (evaluation_metrics: the EMA's,
    the multi-prompt set's, the diversity); keep_best=eval_ema_... keeps the state at the EMA's
    best, the untrained policy (where the EMA starts) included; a metric the run does not log
    stops it before any video is made."""
    kw = dict(iterations=3, eval_every=1, ema=0.5, eval_multi_prompt=True, eval_seeds=2, lr=3e-3)
    cfg = _cfg(base, tmp_path, keep_best="eval_ema_mp_reward", samples=False, **kw)
    res = train(cfg)
    logged = {k for h in res.history for k in h if k.startswith("eval_")}
    assert logged == set(evaluation_metrics(make_reward(cfg), cfg))
    assert "eval_ema_mp_reward" not in res.history[0]  # before training: the policy's alone

    def ema_value(h):
        return h["eval_mp_reward"] if h["iter"] == -1 else h["eval_ema_mp_reward"]

    values = [ema_value(h) for h in res.history]
    assert len(set(values)) == len(values)
    top = max(res.history, key=ema_value)
    assert int(checkpoint_meta(tmp_path / "best.safetensors")["iteration"]) == top["iter"] + 1
    with pytest.raises(ValueError, match=r"keep_best='eval_ema_mp_reward' is not a metric"):
        train(_cfg(base, tmp_path / "b", keep_best="eval_ema_mp_reward", eval_before=False))
    assert not (tmp_path / "b" / "metrics.jsonl").exists()


def test_resume_rejects_mismatched_or_unreadable_checkpoints(base, tmp_path):
    train(_cfg(base, tmp_path, iterations=1, samples=False))
    ckpt = str(tmp_path / "checkpoint.safetensors")
    with pytest.raises(CheckpointError, match="group_size"):
        train(_cfg(base, tmp_path, iterations=2, group_size=4, resume=ckpt))
    bad = tmp_path / "bad.safetensors"
    bad.write_text("garbage")
    with pytest.raises(SystemExit, match="not a readable"):
        main(["--base_checkpoint", base, "--out_dir", str(tmp_path), "--resume", str(bad)])


def test_reward_batch_changes_memory_not_the_run(base, tmp_path):
    """Each reward called on 2 videos at a time: the same rewards, so the same training."""
    kw = dict(iterations=1, samples=False, eval_seeds=2)
    whole = train(_cfg(base, tmp_path / "a", **kw)).history
    parts = train(_cfg(base, tmp_path / "b", reward_batch=2, **kw)).history
    for a, b in zip(whole, parts, strict=True):
        for k, v in a.items():
            if not k.startswith("time_"):
                assert b[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k


def test_cli_reports_bad_values(base, tmp_path):
    with pytest.raises(SystemExit, match="lr"):
        main(["--lr", "-3"])
    with pytest.raises(SystemExit, match=r"reward_batch=-1: must be an integer >= 0 \(0: all"):
        main(["--reward_batch", "-1"])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["--base_checkpoint", str(tmp_path / "none.safetensors"), "--out_dir", str(tmp_path)])
    with pytest.raises(ConfigError, match="window"):
        train(_cfg(base, tmp_path, window=[2, 9]))
    # settings found wrong as the run starts: a clean error line too, before any video is made
    (tmp_path / "free.txt").write_text("a small red square moving left slowly\na cat running\n")
    run = ["--base_checkpoint", base, "--out_dir", str(tmp_path / "r"), "--progress", "false"]
    for more, match in (
        (["--window", "0,1"], r"window=\(0, 1\) must satisfy 1 <= w0"),
        (["--window", "1,2", "--p_keep", "1"], r"window \(1, 2\): no chunk's branches can"),
        (["--prompts_file", str(tmp_path / "none.txt")], "config prompts_file=.*No such file"),
        (
            [
                "--prompts_file",
                str(tmp_path / "free.txt"),
                "--eval_prompts",
                "1",
                "--window",
                "2,4",
            ],
            "reward 'alignment' reads the asked scene .*'a cat running' must name exactly one "
            r"colour.*generic ones \(dynamic, smoothness\)",
        ),
        (
            ["--window", "2,4", "--reward_weights", "alignment=1,colourful=1"],
            r"unknown reward\(s\) \['colourful'\]",
        ),
        (["--window", "2,4", "--reward_weights", "alignment=0"], "reward weights are all 0"),
        (
            ["--out_dir", str(tmp_path / "free.txt" / "r")],
            r"config out_dir='.*free.txt/r': cannot write in",
        ),
    ):
        with pytest.raises(SystemExit, match="error: " + match):
            main(run + more)
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
    assert not (tmp_path / "r" / "eval_prompts.jsonl").exists()


SCRIPT = """
import sys, torch, torch.distributed as dist
from kvpo.run.config import build_config, parse_args
from kvpo.trainer import train
import json
over = json.loads(sys.argv[1])
res = train(build_config(over))
rank = int(__import__("os").environ["RANK"])
total = sum(float(p.double().sum()) for p in res.model.parameters())
open(f"{over['out_dir']}/rank{rank}.txt", "w").write(repr(total))
json.dump(res.history, open(f"{over['out_dir']}/history{rank}.json", "w"))
"""


def test_two_ranks_over_gloo(base, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    over = run_overrides(
        base,
        tmp_path,
        eval_every=5,
        save_every=5,
        samples=True,
        eval_seeds=3,
        prompts_per_iter=4,
        micro_batch=1,
        eval_batch=2,
        tau_auto=1.0,
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            free_port(),
            str(script),
            json.dumps(over),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    sums = [float((tmp_path / f"rank{r}.txt").read_text()) for r in (0, 1)]
    assert sums[0] == sums[1]  # gradients averaged over ranks keep the replicas identical
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()][1:]
    assert len(rows) == 2 and all(r["valid_groups"] <= 4 for r in rows)
    groups = [json.loads(x) for x in (tmp_path / "groups.jsonl").read_text().splitlines()]
    assert [g["iter"] for g in groups] == [0] * 4 + [1] * 4  # both ranks' two groups
    for r in rows:
        mine = [g["reward"] for g in groups if g["iter"] == r["iter"]]
        assert sum(mine) / 4 == pytest.approx(r["reward"], rel=1e-6)
    assert all(r["groups"] == 4 for r in rows)  # each rank's two groups (one at a time), gathered
    # the evaluation is split over the ranks (3 and 3 of 2 prompts x 3 noises, 2 at a time):
    # every rank has the means, and before training they are those of one process making all
    # six samples at once
    hist = [json.loads((tmp_path / f"history{r}.json").read_text()) for r in (0, 1)]
    evals = [[{k: v for k, v in h.items() if k.startswith("eval_")} for h in x] for x in hist]
    assert evals[0] == evals[1] and [h["iter"] for h in hist[0]] == [-1, 0, 1]
    # tau_auto's tau is the median over every rank's groups: one tau on both ranks
    taus = [[h["tau"] for h in x[1:]] for x in hist]
    assert taus[0] == taus[1] and taus[0][0] != taus[0][1] and min(taus[0]) > 0
    assert "eval_reward" in evals[0][0] and "eval_reward" in evals[0][-1]
    cfg = build_config(over)
    eval_prompts = data.split_prompts(num_eval=cfg.eval_prompts)[1][: cfg.eval_prompts]
    one = evaluate(
        load_model(base), eval_prompts, make_reward(cfg), cfg.seed, torch.device("cpu"), 3
    )
    assert evals[0][0] == pytest.approx(one.scores, rel=1e-5, abs=1e-6)
    # each prompt's, from the ranks' shares, in the rank 0's eval_prompts.jsonl
    per = [r for r in _prompt_rows(tmp_path) if r["iter"] == -1]
    assert [r.pop("prompt") for r in per] == eval_prompts
    assert [r.pop("iter") for r in per] == [-1, -1]
    for got, want in zip(per, one.per_prompt, strict=True):
        want = {k: v for k, v in want.items() if k != "prompt"}
        assert got.keys() == want.keys() and got == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert (tmp_path / "samples_before.gif").stat().st_size > 0  # rank 0 gathered the videos


def test_tau_auto_gives_the_update_and_the_kl_each_iterations_tau(base, tmp_path, monkeypatch):
    """With tau_auto the iteration's tau (kvpo.method.likelihood.iteration_tau, called on the rollout
    policy's parts) is logged, and the PPO ratios and the softmax KL read it: a run whose
    iteration_tau gives 0.05 trains as a run at a fixed tau of 0.05, to the bit."""
    over = dict(kl="softmax", kl_coef=3.0, likelihood="step", micro_batch=1)
    fixed = train(build_config(run_overrides(base, tmp_path / "fixed", tau=0.05, **over)))
    calls = []

    def fake(cfg, model, parts, weights):
        calls.append((cfg.tau_auto, len(parts), len(weights), model.training))
        return 0.05

    monkeypatch.setattr("kvpo.method.iteration.iteration_tau", fake)
    cfg = build_config(run_overrides(base, tmp_path / "auto", tau=1e-3, tau_auto=2.0, **over))
    auto = train(cfg)
    assert calls == [(2.0, 2, 2, False)] * 2  # once an iteration, on both micro-batches
    assert [r["tau"] for r in auto.history[1:]] == [0.05, 0.05]
    assert all(r["time_tau"] >= 0 for r in auto.history[1:])
    assert [r["tau"] for r in fixed.history[1:]] == [0.05, 0.05]
    for key in ("ratio", "kl", "loss"):
        assert [r[key] for r in auto.history[1:]] == [r[key] for r in fixed.history[1:]], key
    for a, b in zip(auto.model.parameters(), fixed.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_the_projects_variants_train_together(base, tmp_path):
    """This project's own variants (sample routing, per-step likelihood, anchor advantages over the
    local and global clips, softmax KL, EMA) end to end, on the tiny generator."""
    over = {
        **run_overrides(base, tmp_path, samples=False),
        "window": "2,3",
        "window_shift": 1,
        "local_window": 2,  # chunk 2's 4 history frames overflow 1 sink + 2: sample routing explores
        "score_steps": "0,1",
        "routing": "sample",
        "recent_frames": 1,
        "likelihood": "step",
        "advantage": "anchor",
        "reward_scopes": "local=1,global=0.5",
        "kl": "softmax",
        "ema": 0.999,
    }
    argv = []
    for k, v in over.items():
        argv += [f"--{k}", str(v)]
    res = train(parse_args(argv))
    rows = [r for r in res.history if r["iter"] >= 0]
    for row in rows:
        assert "reward_local/alignment" in row and "reward_global/path" in row
        assert "reward_alignment" not in row and "eval_ema_reward" in row
        assert 0 <= row["valid_groups"] <= 2 and row["window_start"] in (2, 3)
        assert all(map(math.isfinite, (row["loss"], row["ratio"], row["kl"], row["grad_norm"])))
    assert res.ema is not None


def test_lora_training_moves_only_the_adapters_and_resumes(base, tmp_path):
    res = train(_cfg(base, tmp_path, lora_rank=4, lr=1e-3, samples=False))
    start = load_model(base)
    trained = dict(res.model.named_parameters())
    for name, p in start.named_parameters():
        key = name
        if key not in trained:  # wrapped layer: blocks.0.q.weight -> blocks.0.q.base.weight
            head, leaf = key.rsplit(".", 1)
            key = f"{head}.base.{leaf}"
        assert torch.equal(trained[key], p), name
    moved = [n for n, p in trained.items() if n.endswith("lora_b") and p.abs().sum() > 0]
    assert moved
    ckpt = str(tmp_path / "checkpoint.safetensors")
    more = train(
        _cfg(base, tmp_path, lora_rank=4, lr=1e-3, samples=False, iterations=3, resume=ckpt)
    )
    assert [r["iter"] for r in more.history if r["iter"] >= 0] == [0, 1, 2]
    with pytest.raises(ConfigError, match="has 3 iterations done, more than config iterations=2"):
        train(
            _cfg(
                base,
                tmp_path,
                lora_rank=4,
                samples=False,
                iterations=2,
                resume=str(tmp_path / "checkpoint.safetensors"),
            )
        )
    with pytest.raises(CheckpointError, match="lora_rank"):
        train(_cfg(base, tmp_path, iterations=4, samples=False, resume=ckpt))
    with pytest.raises(CheckpointError, match="lora_alpha=0.0, this config has 8.0"):
        train(_cfg(base, tmp_path, lora_rank=4, lora_alpha=8.0, iterations=4, resume=ckpt))


def test_lora_adapters_start_from_the_runs_seed(base, tmp_path):
    """The adapters' random start is drawn from the run's seed, not from the global RNG, whose
    state depends on what the process ran before: a run resumed in the same process (or a sweep
    in a notebook, or another rank) trains what one straight run does."""
    from kvpo.run.policy import reference_and_policy

    cpu = torch.device("cpu")

    def policy(seed, global_seed):
        torch.manual_seed(global_seed)
        _, m, *_ = reference_and_policy(_cfg(base, tmp_path, lora_rank=2, seed=seed), cpu)
        return {n: p for n, p in m.named_parameters() if n.endswith("lora_a")}

    a, b, c = policy(0, 1), policy(0, 2), policy(1, 1)
    assert a and all(torch.equal(a[n], b[n]) for n in a)
    assert not any(torch.equal(a[n], c[n]) for n in a)
    straight, resumed = straight_and_resumed(
        base, tmp_path, lora_rank=2, lr=1e-3, samples=False, eval_every=5
    )
    for (n, p), q in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), n


@pytest.mark.parametrize(
    "prompts",
    [
        ["a red circle", "a blue square"],  # one flat list: each string would unpack into chars
        (["a red circle"], []),
        (["a red circle"], "a blue square"),
        (["a red circle"], [3]),
        "a red circle",
    ],
)
def test_train_refuses_prompts_that_are_not_two_lists(base, tmp_path, prompts):
    with pytest.raises(ValueError, match=r"prompts must be \(training prompts, held-out prompts\)"):
        train(_cfg(base, tmp_path / "run"), prompts=prompts)
    with pytest.raises(TypeError, match=r"reward 'reward' must be a callable .* got str"):
        train(_cfg(base, tmp_path / "run"), reward="alignment")
    assert not (tmp_path / "run").exists()  # before the generator loads


def test_train_a_users_generator_reward_and_prompts(base, tmp_path):
    def brightness(videos, prompts):
        return videos.mean(dim=(1, 2, 3, 4))

    prompts = (["a red circle", "a blue square", "a green triangle"], ["a red square"])
    kw = dict(samples=False, ema=0.5, local_window=3, eval_prompts=1)

    def run(out, **over):
        cfg = _cfg(base, tmp_path / out, **{**kw, **over})
        gen = OwnGenerator(tiny_model())
        gen.inner.text.requires_grad_(False)  # what the user froze stays frozen
        return train(cfg, generator=gen, reward=brightness, prompts=prompts)

    straight = run("a", iterations=3)
    assert isinstance(straight.model, OwnGenerator) and straight.model.local_window == 3
    text = zip(straight.model.inner.text.parameters(), tiny_model().text.parameters(), strict=True)
    for p, q in text:
        assert torch.equal(p, q) and not p.requires_grad
    assert not torch.equal(straight.model.inner.head.weight, tiny_model().head.weight)
    assert "reward_reward" in straight.history[-1] and "eval_ema_reward" in straight.history[-1]
    run("b", iterations=2)
    resumed = run("b", iterations=3, resume=str(tmp_path / "b" / "checkpoint.safetensors"))
    for a, b in ((straight.model, resumed.model), (straight.ema, resumed.ema)):
        for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
            assert torch.equal(p, q), n
    sizes = []  # a plain function reward is called reward_batch videos at a time too

    def counted(videos, prompts):
        sizes.append(videos.shape[0])
        return brightness(videos, prompts)

    cfg = _cfg(base, tmp_path / "d", **{**kw, "iterations": 1, "reward_batch": 2})
    train(cfg, generator=OwnGenerator(tiny_model()), reward=counted, prompts=prompts)
    assert sizes and set(sizes) <= {1, 2} and 2 in sizes
    with pytest.raises(ValueError, match="lora_rank"):
        run("c", lora_rank=2)
    with pytest.raises(ValueError, match="grad_checkpointing"):
        run("c", grad_checkpointing=True)
    with pytest.raises(ValueError, match="multi_prompt"):
        run("c", multi_prompt=0.5)


def test_cli_trains_on_rewards_named_by_import_path(base, tmp_path, monkeypatch):
    """--reward_fns name=module:fn,name=file.py:Class, weighted by --reward_weights (1 if
    absent)."""
    (tmp_path / "kvpo_test_cli_rewards.py").write_text(
        "def brightness(videos, prompts):\n"
        "    return videos.mean(dim=(1, 2, 3, 4))\n"
        "def flat(videos, prompts):\n"
        "    return videos.mean()\n"
        "class Contrast:\n"
        "    def __call__(self, videos, prompts):\n"
        "        return videos.std(dim=(1, 2, 3, 4))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    over = run_overrides(base, tmp_path / "run", iterations=1, samples=False)
    args = cli_args(over)
    fns = f"bright=kvpo_test_cli_rewards:brightness,contrast={tmp_path}/kvpo_test_cli_rewards.py:Contrast"
    main(args + ["--reward_fns", fns, "--reward_weights", "alignment=1,bright=0.5"])
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"reward_alignment", "reward_bright", "reward_contrast"} <= set(row)
    assert "reward_path" not in row and 0 < row["reward_bright"] < 1 and row["reward_contrast"] > 0
    total = row["reward_alignment"] + 0.5 * row["reward_bright"] + row["reward_contrast"]
    assert row["reward"] == pytest.approx(total, rel=1e-5)
    with pytest.raises(SystemExit, match="error: reward .* has no attribute 'darkness'"):
        main(args + ["--reward_fns", "dark=kvpo_test_cli_rewards:darkness"])
    # a reward that scores the batch instead of each video: an error line naming it
    with pytest.raises(
        SystemExit, match=r"error: reward 'flat' returned 1 value\(s\) for \d+ videos"
    ):
        main(args + ["--reward_fns", "flat=kvpo_test_cli_rewards:flat"])


def test_micro_batches_and_branch_passes_bound_the_rollout_cache(base, tmp_path):
    """micro_batch=1: each rank's groups are rolled out and trained one at a time (the KV pages
    of one group at a time); micro_batch >= the groups is the one-pass run, bit for bit.
    rollout_branches=1: each group's branches are rolled out one at a time."""
    kw = dict(iterations=1, samples=False, prompts_per_iter=2)
    rows = {}
    for mb in (0, 1, 5):
        res = train(_cfg(base, tmp_path / f"mb{mb}", micro_batch=mb, **kw))
        rows[mb] = res.history[-1]
    assert rows[1]["rollout_cache_mib"] * 2 == pytest.approx(rows[0]["rollout_cache_mib"])
    assert rows[5] == {**rows[0], **{k: rows[5][k] for k in rows[5] if k.startswith("time_")}}
    assert math.isfinite(rows[1]["grad_norm"]) and rows[1]["valid_groups"] > 0
    anchor = train(_cfg(base, tmp_path / "anchor", micro_batch=1, advantage="anchor", **kw))
    assert "adv_abs" in anchor.history[-1] and math.isfinite(anchor.history[-1]["loss"])
    # rollout_branches=1: the same branches one at a time, in the pages of one branch per group
    one = train(_cfg(base, tmp_path / "rb1", rollout_branches=1, **kw)).history[-1]
    assert one["rollout_cache_mib"] < rows[0]["rollout_cache_mib"] / 2
    for key in ("reward", "tve", "branch_spread"):
        assert one[key] == pytest.approx(rows[0][key], rel=1e-3), key


def test_multi_prompt_evaluation(base, tmp_path):
    """eval_multi_prompt: the held-out prompts also turn a quarter mid-video, scored apart."""
    res = train(_cfg(base, tmp_path, eval_multi_prompt=True, multi_prompt=0.5, samples=False))
    first, last = res.history[0], res.history[-1]
    for row in (first, last):
        assert "eval_mp_reward" in row and "eval_mp_path" in row
    model = load_model(base)
    nC = model.num_frames // model.chunk_frames
    _, eval_prompts = data.split_prompts(num_eval=2)
    turned = turned_prompts(eval_prompts[:2], nC)
    assert turned[0][0] == eval_prompts[0] and turned[0][-1] != eval_prompts[0]
    reward = CompositeReward({"alignment": 1.0, "path": 1.0, "motion": 0.0, "visual": 0.0})
    want = evaluate(model, turned, reward, 0, torch.device("cpu"), 4).scores
    assert abs(first["eval_mp_reward"] - want["eval_reward"]) < 1e-5
    assert abs(first["eval_mp_reward"] - first["eval_reward"]) > 1e-4


def test_bf16_autocast_training(base, tmp_path):
    res = train(_cfg(base, tmp_path, amp="bf16", samples=False, ema=0.5))
    for row in res.history[1:]:
        assert all(map(math.isfinite, (row["loss"], row["ratio"], row["tve"], row["grad_norm"])))
        assert row["tve"] > 0 and math.isfinite(row["eval_reward"])
    assert next(res.model.parameters()).dtype == torch.float32  # fp32 master weights


def test_an_iteration_that_trains_no_group_says_so(base, tmp_path, capsys):
    """A reward that ties every group (here: a constant) leaves nothing to train; the log line
    of each such iteration says so instead of looking like a quiet step."""

    def constant(videos, prompts):
        return torch.full((videos.shape[0],), 0.5)

    res = train(_cfg(base, tmp_path, samples=False), reward=constant)
    assert all(r["valid_groups"] == 0 for r in res.history if r["iter"] >= 0)
    out = capsys.readouterr().out
    assert out.count("no group trained: every group's rewards tied") == 2


def test_lora_init_is_refused_as_the_run_starts(base, tmp_path):
    """A LongLive LoRA file that is not there, or a generator whose layers it cannot name (the
    built-in one), stops the run before anything is trained, with the setting named."""
    with pytest.raises(ConfigError, match="lora_init='missing.pt' is not a file"):
        train(_cfg(base, tmp_path, lora_rank=2, lora_init="missing.pt"))
    torch.save({"generator_lora": {}}, tmp_path / "lora.pt")
    with pytest.raises(ConfigError, match="lora_init: TinyARVideo is not a Wan generator"):
        train(_cfg(base, tmp_path / "run", lora_rank=2, lora_init=str(tmp_path / "lora.pt")))
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()
