"""kvpo.run.distributed: which device each torchrun rank takes (the two-rank run: test_train.py)."""

import pytest
import torch

from kvpo.run.distributed import all_gather, local_device


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


def _average_in_rank(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from kvpo.run.distributed import average_gradients

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        gen = torch.Generator().manual_seed(rank)
        shapes = [(300,), (7, 40), (1,), (64, 64), (5,)]
        params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
        params.append(torch.nn.Parameter(torch.zeros(9, dtype=torch.float64)))
        for i, p in enumerate(params):
            if rank == 0 or i != 2:  # rank 1 has no gradient for one parameter
                p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        params[1].grad = params[1].grad.t().contiguous().t()  # a transposed gradient stays one
        before = [None if p.grad is None else p.grad.clone() for p in params]
        average_gradients(params, bucket_mib=4 * 900 / 2**20)  # 900 floats: several buckets
        torch.save({"before": before, "after": [p.grad for p in params]}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_average_gradients_in_buckets_is_the_mean_over_ranks(tmp_path):
    """Two gloo ranks; gradients in several buckets, two dtypes, one missing on a rank: every rank
    ends with the mean of the ranks' gradients (a missing one counting as zeros), in place."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "grads")
    init = f"file://{tmp_path / 'store'}"
    mp.start_processes(_average_in_rank, args=(init, out), nprocs=2, start_method="spawn")
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    for i in range(6):
        grads = [r["before"][i] for r in ranks]
        want = sum(torch.zeros_like(ranks[0]["before"][i]) if g is None else g for g in grads) / 2
        for r in ranks:
            assert r["after"][i].dtype == want.dtype
            torch.testing.assert_close(r["after"][i], want, rtol=1e-6, atol=1e-7)
    assert ranks[0]["after"][1].stride() == (1, 7)  # copied into, not replaced
