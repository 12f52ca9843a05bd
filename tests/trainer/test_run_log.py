"""kvpo.run.log: the lines a run prints as it starts, at every iteration and as it ends."""

from pathlib import Path

import pytest
import torch
from trainer_support import tiny_model

from kvpo.run.config import build_config
from kvpo.run.log import end_line, progress_line, start_line


@pytest.mark.parametrize(
    "over, how",
    [
        ({"p_keep": 0.3}, "drop routing p_keep=0.3"),
        (
            {"routing": "sample", "recent_frames": 2},
            "sample routing (2 recent frames kept, local window 3)",
        ),
        ({"explore": "sde", "sde_noise": 0.4}, "SDE baseline, noise 0.4"),
    ],
)
def test_start_line_says_what_trains_where_and_how_it_explores(over, how):
    model = tiny_model(local_window=3)
    trained = list(model.parameters())[:2]
    n = sum(p.numel() for p in model.parameters()) / 1e6
    n_train = sum(p.numel() for p in trained) / 1e6
    cfg = build_config({"group_size": 5, "prompts_per_iter": 4, "window": [2, 4], **over})
    line = start_line(cfg, model, trained, torch.device("cpu"), 2)
    assert line == (
        f"kvpo: {n:.2f} M-parameter generator ({n_train:.2f} M trained) on cpu, 2 rank(s), "
        f"4 prompts x G=5 per iteration, window chunks (2, 4), {how}"
    )
    lora = start_line(build_config({**over, "lora_rank": 8}), model, trained, "cpu", 1)
    assert f"({n_train:.2f} M trained, LoRA rank 8) on cpu, 1 rank(s)" in lora


def test_end_line_reads_the_first_and_last_evaluations():
    history = [
        {"iter": -1, "eval_reward": 1.25, "eval_mp_reward": 0.5},
        {"iter": 0, "reward": 3.0},
        {"iter": 1, "eval_reward": 1.5, "eval_ema_reward": 1.375, "eval_mp_reward": 0.75},
    ]
    assert end_line(history, Path("runs/x")) == (
        "done: eval reward 1.2500 -> 1.5000 (EMA 1.3750), multi-prompt 0.5000 -> 0.7500; "
        "outputs in runs/x/"
    )
    # no evaluation before training (eval_before false): the first one logged, no multi-prompt
    history = [{"iter": 0, "reward": 1.0, "eval_reward": 1.0}, {"iter": 1, "eval_reward": 2.0}]
    assert end_line(history, Path("o")) == "done: eval reward 1.0000 -> 2.0000; outputs in o/"


def test_progress_line_shows_tau_only_when_it_moves_and_evaluations_when_made():
    row = {
        "iter": 7,
        "reward": 1.5,
        "reward_std": 0.25,
        "reward_path": 0.125,
        "branch_spread": 0.5,
        "tve": 2e-3,
        "tau": 4e-3,
        "ratio": 1.0625,
        "clip_frac": 0.5,
        "kl": 1e-4,
        "time_rollout": 1.0,
        "time_reward": 2.0,
        "time_reference": 3.0,
        "time_replay": 4.0,
        "time_update": 5.0,
    }
    line = progress_line(row, ["path"])
    assert line == (
        "it    7 | reward 1.5000 ± 0.2500 (path 0.125) spread 0.500 | tve 2.00e-03 ratio 1.062 "
        "clip 0.50 kl 1.00e-04 | rollout 1.0s reward 2.0s reference 3.0s replay 4.0s update 5.0s"
    )
    assert "tve 2.00e-03 tau 4.00e-03 ratio" in progress_line(row, ["path"], tau=True)
    evaluated = progress_line({**row, "eval_reward": 1.25, "eval_ema_reward": 1.5}, ["path"])
    assert evaluated.endswith("update 5.0s | eval 1.2500 (EMA 1.5000)")
