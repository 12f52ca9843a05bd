"""Trainer config: defaults, YAML, CLI overrides and clear errors."""

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from kvpo.run.config import TrainConfig, build_config, parse_args

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_valid():
    TrainConfig().validate()


def test_yaml_then_cli_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("iterations: 7\nwindow: [1, 3]\nreward_weights: {alignment: 2.0}\ntau: 0.5\n")
    cfg = parse_args(
        [
            "--config",
            str(path),
            "--tau",
            "0.25",
            "--score_steps",
            "0,2",
            "--anchor_free_flag_is_not_a_field",
        ][:-1]
    )
    assert cfg.iterations == 7 and cfg.window == (1, 3) and cfg.tau == 0.25
    assert cfg.reward_weights == {"alignment": 2.0} and cfg.score_steps == (0, 2)
    cfg = parse_args(
        ["--reward_weights", "visual=1,motion=0.5", "--samples", "false", "--score_steps", "none"]
    )
    assert cfg.reward_weights == {"visual": 1.0, "motion": 0.5} and cfg.samples is False
    assert cfg.score_steps is None
    cfg = parse_args(["--local_window", "4", "--routing", "sample", "--window_shift", "1"])
    assert cfg.local_window == 4 and cfg.routing == "sample" and cfg.window_shift == 1
    assert parse_args(["--local_window", "none"]).local_window is None
    assert (
        parse_args(["--recache", "true"]).recache == "longlive" and parse_args([]).recache is None
    )
    assert parse_args(["--recache", "chunkwise"]).recache == "chunkwise"
    assert parse_args(["--recache", "false"]).recache == "none"
    cfg = parse_args(["--reward_fns", "hps=my_rewards:HPS,aes=/code/aes.py:score"])
    assert cfg.reward_fns == {"hps": "my_rewards:HPS", "aes": "/code/aes.py:score"}


@pytest.mark.parametrize(
    "over, match",
    [
        ({"iterations": 0}, "iterations"),
        ({"group_size": 1}, "group_size"),
        ({"lr": -1.0}, "lr"),
        ({"tau": 0}, "tau"),
        ({"tau_auto": -0.5}, "tau_auto"),
        ({"tau_auto": float("nan")}, "tau_auto"),
        ({"tau_auto": 1.0, "explore": "sde"}, "tau_auto=1.0: sets KVPO's Gibbs temperature"),
        ({"p_keep": 2.0}, "p_keep"),
        ({"advantage": "mean"}, "advantage"),
        ({"kl": "l1"}, "kl"),
        ({"window": [3, 1]}, "window"),
        ({"iterations": "many"}, "iterations"),
        (
            {"itrations": 3},
            r"unknown config field\(s\) \['itrations'\] \('itrations': did you mean 'iterations'\?\)",
        ),
        (
            {"itrations": 3, "zzz": 1},
            r"unknown config field\(s\) \['itrations', 'zzz'\]; known: .*'lr'",
        ),
        ({"wan_size": [480]}, r"wan_size=\(480,\): must be the video's height and width"),
        ({"wan_size": [480, 0]}, "wan_size"),
        ({"samples": "maybe"}, "samples"),
        ({"routing": "swap"}, "routing"),
        ({"recent_frames": 0}, "recent_frames"),
        ({"local_window": 0}, "local_window"),
        ({"local_window": "wide"}, "local_window"),
        ({"window_shift": -1}, "window_shift"),
        ({"recache": "maybe"}, "recache"),
        ({"recache": "LongLive"}, "recache=.*must be one of none, longlive, chunkwise"),
        ({"global_sink": "sometimes"}, "global_sink"),
        ({"sampler": "ddim"}, "sampler='ddim': must be one of euler, renoise"),
        ({"lora_init": "lora.pt"}, "lora_init.*set lora_rank to the file's rank"),
        ({"reward_scopes": {"middle": 1.0}}, "reward_scopes"),
        ({"ema": 1.0}, "ema"),
        ({"amp": "fp16"}, "amp"),
        ({"lora_rank": -2}, "lora_rank"),
        ({"lora_rank": 2.5}, "lora_rank"),
        ({"reward_scopes": {"local": 0.0}}, "reward_scopes"),
        ({"micro_batch": -1}, "micro_batch"),
        ({"lr_warmup": -1}, "lr_warmup"),
        ({"lr_schedule": "linear"}, "lr_schedule"),
        ({"micro_batch": 1.5}, "micro_batch"),
        ({"rollout_branches": -1}, "rollout_branches"),
        ({"replay_branches": 0.5}, "replay_branches"),
        ({"reward_fns": {"alignment": "my_rewards:fn"}}, "reward_fns.*built-in"),
        ({"reward_fns": {"clip": "my_rewards:fn"}}, "reward_fns.*built-in"),
        ({"reward_fns": {"hps": "my_rewards"}}, "reward_fns.*expected 'package.module:name'"),
        ({"reward_fns": "my_rewards:fn"}, "reward_fns"),
        ({"profile_iteration": 20}, "profile_iteration=20: must be below iterations=20"),
        ({"samples_at_eval": True, "samples": False}, "samples_at_eval=True: needs samples=true"),
        ({"wan_dtype": "fp16"}, "wan_dtype='fp16': must be 'fp32' or 'bf16'"),
        ({"multi_prompt": 1.5}, r"multi_prompt=1.5: must be in \[0, 1\]"),
        ({"clip_low": 1.0}, "clip_low=1.0: must be < 1"),
        ({"likelihood": "gaussian"}, "likelihood='gaussian': must be 'branch', 'step' or 'x0'"),
        ({"step_weighting": "linear"}, "step_weighting='linear': must be 'uniform' or 'sigma'"),
        ({"device": "tpu"}, "device='tpu': must be 'auto', 'cpu' or 'cuda'"),
        ({"reward_weights": {}}, "reward_weights={}: must be a non-empty mapping"),
    ],
)
def test_bad_values_name_the_field(over, match):
    with pytest.raises(ValueError, match=match):
        build_config(over)


@pytest.mark.parametrize(
    "over, message",
    [
        ({"rollout_branches": "x"}, "config rollout_branches: cannot read 'x' as int"),
        ({"window": "a,b"}, "config window: cannot read 'a,b' as tuple[int, int]"),
        ({"local_window": "q"}, "config local_window: cannot read 'q' as int"),
        ({"reward_weights": "a=b"}, "config reward_weights: cannot read 'a=b' as dict[str, float]"),
    ],
)
def test_unreadable_values_name_the_type_as_written(over, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_config(over)


def test_bad_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        parse_args(["--config", str(path)])
    with pytest.raises(ValueError, match="cannot read"):
        parse_args(["--config", str(tmp_path / "missing.yaml")])
    path.write_bytes("lr: 1.0e-5  # caf\xe9\n".encode("latin-1"))  # not UTF-8
    with pytest.raises(ValueError, match="cannot read YAML: 'utf-8' codec can't decode"):
        parse_args(["--config", str(path)])
    path.write_text("lr: [1\n")
    with pytest.raises(ValueError, match="cannot read YAML: while parsing"):
        parse_args(["--config", str(path)])


def test_every_field_has_help(capsys):
    import dataclasses

    fields = dataclasses.fields(TrainConfig)
    assert all(f.metadata.get("help") for f in fields)
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    assert "--p_keep FLOAT" in out and "(default: 0.3)" in out and "<class" not in out
    for f in fields:  # every setting, with its help
        assert f"--{f.name} " in out and " ".join(f.metadata["help"].split()) in out, f.name


class _Shape:
    """A generator's shape, all that routing and the window checks read."""

    def __init__(self, frames, chunk, sinks, local_window, steps=4):
        self.num_frames, self.chunk_frames = frames, chunk
        self.sink_frames, self.local_window = sinks, local_window
        self.steps = steps

    def timesteps(self):
        return torch.linspace(1, 0, self.steps + 1)


@pytest.mark.parametrize("name", ["wan_self_forcing.yaml", "wan_longlive.yaml"])
def test_wan_recipes_explore_at_every_window_start(name):
    """Every window position of the shipped Wan recipes has a chunk whose branches can see
    different history (checked on the shape they configure)."""
    from kvpo.method.exploration import check_exploration, rollout_spec, shifted
    from kvpo.method.rollout import exploring_chunks

    cfg = parse_args(["--config", str(ROOT / "configs" / name)])
    model = _Shape(cfg.wan_frames, cfg.wan_chunk_frames, cfg.wan_sink_frames, cfg.local_window)
    spec = rollout_spec(cfg)
    for shift in range(cfg.window_shift + 1):
        at = dataclasses.replace(spec, window=shifted(cfg.window, shift))
        check_exploration(at, model)
        assert exploring_chunks(model, at), (name, at.window)


def test_sample_routing_over_a_window_that_shows_everything_is_refused():
    """LongLive's window (3 sinks + 12 frames) over a 21-frame clip's chunks 1-5: every branch
    would see all of its history (what the README's first Wan command did)."""
    from kvpo.method.exploration import check_exploration
    from kvpo.method.rollout import RolloutSpec, exploring_chunks

    model = _Shape(21, 3, 3, 12)
    spec = RolloutSpec(group_size=8, window=(1, 6), routing="sample", recent_frames=4)
    assert exploring_chunks(model, spec) == []
    with pytest.raises(ValueError, match="history passes 15 frames"):
        check_exploration(spec, model)
    assert exploring_chunks(model, dataclasses.replace(spec, window=(1, 7))) == [6]
