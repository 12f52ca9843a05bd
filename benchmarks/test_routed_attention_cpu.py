"""CPU: kvpo's C++ routed_attention against the baselines, G = 8 branches sharing 16 pages.

    python -m pytest benchmarks/test_routed_attention_cpu.py --benchmark-columns=min,median,rounds

Times come from pytest-benchmark, side by side in one run; peak memory per method is measured in a
fresh process each (``benchmarks.routed_methods``) and attached as ``extra_info["peak_mib"]``.
"""

import subprocess
import sys

import pytest
import torch

from benchmarks.routed_methods import METHODS, Setup, flops, make_inputs

SETUP = Setup()


@pytest.fixture(scope="module")
def inputs():
    return make_inputs(SETUP)


def _peak_mib(method: str) -> float:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.routed_methods", method],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("method", list(METHODS))
def test_forward(benchmark, inputs, method):
    benchmark.group = "routed_attention CPU forward, G=8, 16 pages"
    q, k, v, table = inputs
    fn = METHODS[method]
    ref = METHODS["kvpo"](q, k, v, table)
    torch.testing.assert_close(fn(q, k, v, table), ref, rtol=1e-4, atol=1e-5)
    benchmark(fn, q, k, v, table)
    if benchmark.enabled:  # not under --benchmark-disable (a run of each, as CI's smoke test)
        benchmark.extra_info["gflops_kept"] = flops(SETUP, table) / benchmark.stats["median"] / 1e9
        benchmark.extra_info["peak_mib"] = _peak_mib(method)


@pytest.mark.parametrize("method", ["kvpo", "gather_sdpa", "sdpa_dense_mask"])
def test_forward_backward(benchmark, inputs, method):
    benchmark.group = "routed_attention CPU forward+backward, G=8, 16 pages"
    q, k, v, table = (t.detach().clone() for t in inputs)
    q.requires_grad_()
    k.requires_grad_()
    v.requires_grad_()
    fn = METHODS[method]

    def step():
        fn(q, k, v, table).sum().backward()
        q.grad = k.grad = v.grad = None

    benchmark(step)
    if benchmark.enabled:
        benchmark.extra_info["gflops_kept"] = (
            flops(SETUP, table, backward=True) / benchmark.stats["median"] / 1e9
        )
