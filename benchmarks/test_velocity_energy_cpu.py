"""CPU: kvpo's C++ velocity_energy against torch eager and torch.compile (the baselines a user
would write), forward and forward + backward, G = 8 branches x 4 steps.

    python -m pytest benchmarks/test_velocity_energy_cpu.py --benchmark-columns=min,median,rounds

Sizes: the built-in generator's calls (3456 elements per step), and 2^16 and 2^20 elements per
step (8 and 128 MiB per fp32 operand). Times come from pytest-benchmark, side by side in one run.
"""

import pytest
import torch

import kvpo_kernels

G, S = 8, 4
SIZES = {"trainer": 3456, "64K": 2**16, "1M": 2**20}


def _eager(a, b, w):
    # in float32, as a careful user writes it (bfloat16 squares and sums lose digits)
    return kvpo_kernels.velocity_energy_reference(a.float(), b.float(), w, "mean")


def _kvpo(a, b, w):
    return kvpo_kernels.velocity_energy(a, b, w, "mean", backend="cpu")


@pytest.fixture(scope="module", autouse=True)
def _many_compiles():
    # one compiled graph per (size, dtype): more than dynamo's default recompile limit
    old = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = 64
    yield
    torch._dynamo.config.recompile_limit = old


def _method(name: str):
    if name == "kvpo":
        return _kvpo
    if name == "eager":
        return _eager
    return torch.compile(_eager, dynamic=False)


def _inputs(size: str, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(G, S, SIZES[size], generator=gen).to(dtype)
    b = torch.randn(G, S, SIZES[size], generator=gen).to(dtype)
    return a, b, torch.rand(S, generator=gen) + 0.1


METHODS = ["kvpo", "eager", "compile"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("size", list(SIZES))
def test_forward(benchmark, size, dtype, method):
    benchmark.group = f"velocity_energy CPU forward, {dtype}, {size} per step"
    a, b, w = _inputs(size, DTYPES[dtype])
    fn = _method(method)
    want = kvpo_kernels.velocity_energy_reference(a.double(), b.double(), w.double(), "mean")
    torch.testing.assert_close(fn(a, b, w).double(), want, rtol=1e-5, atol=0)
    benchmark(fn, a, b, w)
    if benchmark.enabled:  # not under --benchmark-disable (a run of each, as CI's smoke test)
        benchmark.extra_info["gb_per_s"] = 2 * a.nbytes / benchmark.stats["median"] / 1e9


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("size", list(SIZES))
def test_forward_backward(benchmark, size, dtype, method):
    benchmark.group = f"velocity_energy CPU forward+backward, {dtype}, {size} per step"
    a, b, w = _inputs(size, DTYPES[dtype])
    a.requires_grad_()
    fn = _method(method)

    def step():
        return torch.autograd.grad(fn(a, b, w).sum(), a)

    benchmark(step)
