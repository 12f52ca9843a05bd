"""kvpo.distributed: which device each torchrun rank takes (the two-rank run: test_train.py)."""

import pytest
import torch

from kvpo.distributed import all_gather, local_device


@pytest.mark.parametrize(
    "env, device, want",
    [
        ({}, "cuda", "cuda"),  # one process: the current CUDA device, as given
        ({"WORLD_SIZE": "1", "LOCAL_RANK": "0"}, "cuda", "cuda"),
        ({"WORLD_SIZE": "4", "LOCAL_RANK": "3"}, "cuda", "cuda:3"),  # one GPU per rank
        ({"WORLD_SIZE": "8", "LOCAL_RANK": "5"}, "cuda", "cuda:5"),
        ({"WORLD_SIZE": "4", "LOCAL_RANK": "3"}, "cpu", "cpu"),  # gloo ranks share the CPU
        ({"WORLD_SIZE": "4", "LOCAL_RANK": "3"}, "cuda:1", "cuda:1"),  # an explicit index stays
    ],
)
def test_local_device(monkeypatch, env, device, want):
    for key in ("WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert local_device(torch.device(device)) == torch.device(want)


def test_all_gather_without_ranks_is_the_input():
    x = torch.randn(3, 2)
    assert all_gather(x) is x
