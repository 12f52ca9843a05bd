"""CPU: a KVPO rollout at G = 8 with the pre-window pages shared by table against copied per
branch (pytest-benchmark; KV page MiB in extra_info). ``python -m benchmarks.trainer_bench`` gives
the per-stage iteration split and peak memory."""

import pytest
import torch

from benchmarks.trainer_bench import _rollout_args
from kvpo.rollout import rollout


@pytest.mark.parametrize("share", [True, False], ids=["shared", "copied"])
def test_rollout(benchmark, share):
    benchmark.group = "KVPO rollout, 4 prompts x G=8"
    model, prompts, spec = _rollout_args(share)
    ro = benchmark.pedantic(
        lambda: rollout(model, prompts, spec, torch.Generator().manual_seed(0)), rounds=3
    )
    benchmark.extra_info["kv_mib"] = ro.cache_bytes / 2**20
    assert ro.tokens.shape[1] == 8
