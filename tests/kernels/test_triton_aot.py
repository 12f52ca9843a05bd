"""The Triton kernels compile for real GPUs on a machine without one.

Every launch the op wrappers make (each kernel, dtype, head dim, small and large pages, every
autotuning candidate) is compiled by kvpo_kernels.triton.aot with Triton's compiler and ptxas for
sm_80 and sm_90a, in a subprocess without TRITON_INTERPRET. The interpreter tests say the kernels
compute the right thing; these say the compiled kernels will launch on an A100 or H100 (shared
memory within the SM's), will not crawl (no registers spilled), and use tensor cores for 16-bit
attention.
"""

import json
import os
import sys

import pytest
from helpers import run_ok

triton = pytest.importorskip("triton")
try:
    from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401

    _PTXAS = os.path.exists(triton.knobs.nvidia.ptxas.path)
except Exception:  # no CUDA backend in this Triton build
    _PTXAS = False

pytestmark = pytest.mark.skipif(not _PTXAS, reason="Triton's CUDA backend (ptxas) is missing")

ARCHS = ("sm_80", "sm_90a")
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90a": 227 * 1024}
ATTENTION = ("routed_attention.fwd", "routed_attention.bwd_dq", "routed_attention.bwd_dkdv")
ENERGY = ("velocity_energy.fwd", "velocity_energy.fwd_partials", "velocity_energy.bwd")


def _compile(out, *args: str, timeout: int) -> list[dict]:
    """The records of ``python -m kvpo_kernels.triton.aot ARGS``, run without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run_ok(
        [sys.executable, "-m", "kvpo_kernels.triton.aot", *args, "--json", str(out)],
        env=env,
        timeout=timeout,
    )
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return _compile(tmp_path_factory.mktemp("aot") / "records.json", timeout=3600)


def test_every_launch_is_compiled_for_every_arch(records):
    seen = {(r["kernel"], r["arch"], r["dtype"], r["head_dim"], r["page_size"]) for r in records}
    want = {
        (k, a, d, D, p)
        for k in ATTENTION
        for a in ARCHS
        for d in ("fp16", "bf16", "fp32")
        for D in (64, 128, 256)
        for p in (16, 1560)
    } | {(k, a, d, 0, 0) for k in ENERGY for a in ARCHS for d in ("fp16", "bf16", "fp32")}
    assert seen == want


def test_autotuning_keeps_several_candidates_for_16_bit_attention(records):
    fwd = [r for r in records if r["kernel"] == "routed_attention.fwd" and r["dtype"] == "bf16"]
    for D in (64, 128, 256):
        tiles = {(r["block_m"], r["block_n"], r["num_warps"], r["num_stages"])
                 for r in fwd if r["head_dim"] == D and r["page_size"] == 1560 and r["arch"] == "sm_90a"}  # fmt: skip
        assert len(tiles) >= 2, (D, tiles)


def test_no_launch_spills_registers(records):
    """16-bit: nothing spilled. fp32 (exact IEEE dots on CUDA cores, the correctness path, not the
    fast one): ptxas spills a few bytes in some backward tiles; at most 64."""
    for r in records:
        budget = 64 if r["dtype"] == "fp32" else 0
        assert r["spill_bytes"] <= budget, r


def test_every_launch_fits_the_sms_shared_memory(records):
    for r in records:
        assert 0 <= r["shared_bytes"] <= SHARED_LIMIT[r["arch"]], r


def test_keys_blocks_never_exceed_small_pages(records):
    for r in records:
        if r["kernel"] in ATTENTION and r["page_size"] == 16:
            assert r["block_n"] == 16, r


def test_16_bit_attention_runs_on_tensor_cores(records):
    """wgmma (warpgroup MMA) on Hopper, mma.sync on Ampere; fp32 stays on exact CUDA-core FMAs."""
    for r in records:
        if r["kernel"] not in ATTENTION:
            continue
        if r["dtype"] == "fp32":
            assert r["matmul"] == "fma", r
        elif r["arch"] == "sm_80":
            assert r["matmul"] == "mma", r
        else:
            assert r["matmul"] in ("wgmma", "mma"), r
    hopper_fwd = [
        r
        for r in records
        if r["kernel"] == "routed_attention.fwd"
        and r["arch"] == "sm_90a"
        and r["dtype"] == "bf16"
        and r["head_dim"] == 128
        and r["page_size"] == 1560
    ]
    assert any(r["matmul"] == "wgmma" for r in hopper_fwd), hopper_fwd


def test_velocity_energy_forward_fills_an_sm(records):
    """The forward folds each 16-byte load into its accumulator as it goes, which keeps it at
    32 registers or fewer: 8 programs of 8 warps (a full SM) then fit, and the launch, sized to
    the resident programs, is one wave of 8 per SM. (The grid is sized from the compiled kernel's
    registers at run time, so this guards the speed, not the correctness.)"""
    fwd = [
        r for r in records if r["kernel"] in ("velocity_energy.fwd", "velocity_energy.fwd_partials")
    ]
    assert len(fwd) == 12
    for r in fwd:
        assert r["num_warps"] == 8 and r["registers"] <= 32, r


def test_head_dims_below_tl_dots_smallest_compile(tmp_path):
    """D < 16 (1, 3, 8) runs on a head-dim tile of 16, masked: tl.dot takes no operand dimension
    under 16, so a tile of D's own power of two did not compile."""
    records = _compile(
        tmp_path / "records.json", "--arch", "sm_80", "--head_dim", "3", timeout=1200
    )
    assert {r["kernel"] for r in records if r["head_dim"]} == set(ATTENTION)
