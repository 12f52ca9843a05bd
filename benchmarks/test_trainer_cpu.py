"""CPU: a KVPO rollout at G = 8 in each of trainer_bench's modes: the pre-window pages shared by
table or copied per branch, the branches rolled out all at once or a few at a time
(pytest-benchmark; KV page MiB in extra_info). ``python -m benchmarks.trainer_bench`` gives
the per-stage iteration split and peak memory."""

import pytest
import torch

from benchmarks.trainer_bench import MODES, _rollout_args
from kvpo.method.rollout import rollout


@pytest.mark.parametrize("mode", list(MODES))
def test_rollout(benchmark, mode):
    benchmark.group = "KVPO rollout, 4 prompts x G=8"
    model, prompts, spec = _rollout_args(mode)
    ro = benchmark.pedantic(
        lambda: rollout(model, prompts, spec, torch.Generator().manual_seed(0)), rounds=3
    )
    benchmark.extra_info["kv_mib"] = ro.cache_bytes / 2**20
    assert ro.tokens.shape[1] == 8
