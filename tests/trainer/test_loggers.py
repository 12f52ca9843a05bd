"""TensorBoard and W&B logging of a training run: the numbers logged are the run's own."""

import json
import sys
import types

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from trainer_support import run_overrides

from kvpo.run.config import ConfigError, build_config
from kvpo.run.loggers import (
    filmstrip,
    metric_name,
    missing_packages,
    parse_log_to,
    prompt_table,
    scalars,
)
from kvpo.trainer import train


def _cfg(base, out, **kw):
    return build_config(run_overrides(base, out, save_every=2, **kw))


def test_names_steps_and_values():
    assert parse_log_to(" wandb, tensorboard,wandb ") == ("wandb", "tensorboard")
    assert parse_log_to("") == ()
    assert metric_name("eval_reward") == "eval/reward"
    assert metric_name("eval_ema_reward") == "eval/ema_reward"
    assert metric_name("time_update") == "time/update"
    assert metric_name("reward_path_std") == "train/reward_path_std"
    step, values = scalars({"iter": 4, "reward": 1.5, "groups": 3, "note": "x", "flag": True})
    assert step == 5 and values == {"train/reward": 1.5, "train/groups": 3.0}


def test_prompt_table():
    rows = [
        {"prompt": "a | b", "eval_reward": 0.5, "eval_mp_reward": 0.25},
        {"prompt": ["a", "c"], "eval_reward": 0.75, "eval_mp_reward": 0.125},
    ]
    columns, data = prompt_table(rows)
    assert columns == ["prompt", "reward", "mp_reward"]
    assert data == [["a | b", 0.5, 0.25], ["a / c", 0.75, 0.125]]


def test_filmstrip():
    frames = torch.randint(0, 256, (5, 6, 7, 3), dtype=torch.uint8).numpy()
    strip = filmstrip(frames)  # frames 0, 1, 3, 4 (evenly spaced, rounded)
    assert np.array_equal(strip, np.concatenate([frames[i] for i in (0, 1, 3, 4)], axis=1))
    small = filmstrip(frames, count=2, max_width=5)  # 14 wide -> every third pixel
    assert np.array_equal(small, np.concatenate([frames[0], frames[4]], axis=1)[::3, ::3])
    assert filmstrip(frames[:1]).shape == (6, 7, 3)


def test_unknown_logger_is_refused(base, tmp_path):
    with pytest.raises(ValueError, match=r"config log_to='tensorboard,mlflow'.*mlflow"):
        _cfg(base, tmp_path, log_to="tensorboard,mlflow")


def test_tensorboard_gets_every_row(base, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res = train(_cfg(base, tmp_path, log_to="tensorboard", samples=True, samples_at_eval=True))
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/reward", "train/tve", "time/update", "eval/reward"} <= tags

    def logged(tag):
        return {e.step: e.value for e in acc.Scalars(tag)}

    rows = res.history
    assert logged("train/reward") == pytest.approx({r["iter"] + 1: r["reward"] for r in rows[1:]})
    # the evaluation before training is step 0, then one after each iteration
    assert logged("eval/reward") == pytest.approx({r["iter"] + 1: r["eval_reward"] for r in rows})
    assert "config/text_summary" in acc.Tags()["tensors"]
    # each evaluation's per-prompt scores, a Markdown table at its step
    tables = acc.Tensors("eval/prompts/text_summary")
    assert [e.step for e in tables] == [0, 1, 2]
    per = [json.loads(x) for x in (tmp_path / "eval_prompts.jsonl").read_text().splitlines()]
    lines = tables[-1].tensor_proto.string_val[0].decode().splitlines()
    assert lines[0].startswith("| prompt | alignment |") and len(lines) == 2 + 2
    for line, row in zip(lines[2:], per[-2:], strict=True):
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        assert cells[0] == row["prompt"]
        want = [v for k, v in row.items() if k not in ("iter", "prompt")]
        assert [float(c) for c in cells[1:]] == pytest.approx(want, abs=5e-5)
    # every evaluation's samples at its step; before and after at the end
    assert [e.step for e in acc.Images("samples/eval")] == [0, 1, 2]
    assert [e.step for e in acc.Images("samples/group")] == [1, 2]
    assert [e.step for e in acc.Images("samples/after")] == [2]
    gif = iio.imread(tmp_path / "samples" / "step_000002.gif")[..., :3]
    png = iio.imread(acc.Images("samples/eval")[-1].encoded_image_string, extension=".png")
    assert np.array_equal(png[..., :3], filmstrip(gif))


def test_a_resumed_run_logs_each_step_once(base, tmp_path):
    """Iteration 2 was logged (step 3) after the kept checkpoint of step 2: resumed from there,
    TensorBoard shows the resumed run's step 3, not both."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    kw = dict(log_to="tensorboard", iterations=3, keep_checkpoints=True, eval_every=10)
    train(_cfg(base, tmp_path, **kw))
    step2 = tmp_path / "checkpoints" / "step_000002.safetensors"
    res = train(_cfg(base, tmp_path, resume=str(step2), **kw))
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/reward")] == [1, 2, 3]
    assert acc.Scalars("train/reward")[-1].value == pytest.approx(res.history[-1]["reward"])


def test_wandb_run_gets_config_rows_and_samples(base, tmp_path, monkeypatch):
    calls = {"log": [], "finish": 0}

    class Run:
        id = "run-1"

        def log(self, values, step):
            calls["log"].append((step, values))

        def finish(self):
            calls["finish"] += 1

    def init(**kw):
        calls["init"] = kw
        return Run()

    class Video:
        def __init__(self, path, format):
            self.path, self.format = path, format

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data

    wandb = types.SimpleNamespace(init=init, Video=Video, Table=Table)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    cfg = _cfg(
        base, tmp_path, log_to="wandb", wandb_project="mine", samples=True, samples_at_eval=True
    )
    res = train(cfg)
    assert calls["init"]["project"] == "mine" and calls["init"]["dir"] == str(tmp_path)
    assert calls["init"]["name"] == tmp_path.name  # the run's directory names it
    assert calls["init"]["config"] == cfg.to_dict()
    rows = [(s, v) for s, v in calls["log"] if "train/reward" in v or "eval/reward" in v]
    assert [s for s, _ in rows] == [0, 1, 2]
    for (step, values), row in zip(rows, res.history, strict=True):
        assert step == row["iter"] + 1
        assert values["eval/reward"] == pytest.approx(row["eval_reward"])
        if row["iter"] >= 0:
            assert values["train/reward"] == pytest.approx(row["reward"])
    media = [(s, v) for s, v in calls["log"] if any(k.startswith("samples/") for k in v)]
    assert [(s, set(v)) for s, v in media] == [
        (0, {"samples/eval"}),
        (1, {"samples/eval", "samples/group"}),  # and the group iteration 0 trained on
        (2, {"samples/eval", "samples/group"}),
        (2, {"samples/before", "samples/after"}),
    ]
    assert media[1][1]["samples/eval"].path == str(tmp_path / "samples" / "step_000001.gif")
    assert media[1][1]["samples/group"].path == str(tmp_path / "samples" / "group_000001.gif")
    assert media[-1][1]["samples/after"].path == str(tmp_path / "samples_after.gif")
    # each evaluation's per-prompt scores, a table at its step: eval_prompts.jsonl's rows
    tables = [(s, v["eval/prompts"]) for s, v in calls["log"] if "eval/prompts" in v]
    assert [s for s, _ in tables] == [0, 1, 2]
    per = [json.loads(x) for x in (tmp_path / "eval_prompts.jsonl").read_text().splitlines()]
    keys = [k for k in per[0] if k not in ("iter", "prompt")]
    assert tables[0][1].columns == ["prompt", *(k.removeprefix("eval_") for k in keys)]
    got = [row for _, t in tables for row in t.data]
    assert got == [[r["prompt"], *(r[k] for k in keys)] for r in per]
    assert calls["finish"] == 1
    assert "id" not in calls["init"] and (tmp_path / "wandb_run_id").read_text() == "run-1"
    ckpt = tmp_path / "checkpoint.safetensors"
    train(_cfg(base, tmp_path, log_to="wandb", iterations=3, resume=str(ckpt)))
    assert calls["init"]["id"] == "run-1" and calls["init"]["resume"] == "allow"  # the same run
    assert [s for s, v in calls["log"] if "train/reward" in v][-1] == 3
    monkeypatch.setenv("WANDB_NAME", "mine")  # W&B's own variable names it instead
    train(_cfg(base, tmp_path / "c", log_to="wandb", iterations=1))
    assert "name" not in calls["init"]


def test_a_missing_package_is_named_as_the_run_starts(base, tmp_path, monkeypatch):
    """Before the model loads and anything is written: the package named, with its install."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    assert missing_packages("tensorboard,wandb") == ["wandb"]
    with pytest.raises(ConfigError, match=r"log_to='tensorboard,wandb' needs wandb: pip install"):
        train(_cfg(base, tmp_path / "run", log_to="tensorboard,wandb"))
    assert not (tmp_path / "run").exists()
