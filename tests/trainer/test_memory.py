"""kvpo.run.memory: running out of GPU memory names the stage and the settings that bound it."""

import importlib

import pytest
import torch
from trainer_support import cli_args, run_overrides

from kvpo.run.config import build_config
from kvpo.run.memory import TrainingOutOfMemoryError
from kvpo.trainer import main, train

ALLOCATOR = "CUDA out of memory. Tried to allocate 2.00 GiB"


@pytest.mark.parametrize(
    "module, where, stage, advice",
    [
        (
            "kvpo.method.iteration",
            "rollout",
            "rollout",
            r"now micro_batch=0, rollout_branches=0, group_size=3, window=\(2, 4\)",
        ),
        ("kvpo.method.iteration", "micro_batch_rewards", "reward", "--micro_batch 1"),
        ("kvpo.method.iteration", "reference_terms", "reference", "kl='velocity'"),
        ("kvpo.method.update", "accumulate_gradients", "update", "--replay_branches 1"),
        ("kvpo.trainer", "evaluate_sets", "evaluation", "now eval_batch=0"),
    ],
)
def test_each_stage_says_what_bounds_its_memory(
    base, tmp_path, monkeypatch, module, where, stage, advice
):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError(ALLOCATOR)

    monkeypatch.setattr(importlib.import_module(module), where, out_of_memory)
    with pytest.raises(TrainingOutOfMemoryError, match=f"in the {stage}, .*{advice}") as e:
        train(build_config(run_overrides(base, tmp_path, samples=False)))
    assert str(e.value).endswith(ALLOCATOR)
    assert isinstance(e.value, torch.OutOfMemoryError)  # what code that catches OOM expects


def test_the_cli_prints_it_as_an_error(base, tmp_path, monkeypatch):
    import kvpo.method.iteration

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError(ALLOCATOR)

    monkeypatch.setattr(kvpo.method.iteration, "rollout", out_of_memory)
    over = run_overrides(base, tmp_path, samples=False, eval_before=False)
    args = cli_args(over)
    with pytest.raises(SystemExit, match="error: out of GPU memory in the rollout"):
        main(args)
