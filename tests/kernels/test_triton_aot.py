"""The Triton kernels compile for real GPUs on a machine without one.

Every launch the op wrappers make (each kernel, dtype, head dim, small and large pages, every
autotuning candidate) is compiled by kvpo_kernels.triton.aot with Triton's compiler and ptxas for
Ampere (sm_80), Ada (sm_89), Hopper (sm_90a) and both Blackwells (sm_100a, sm_120), in a
subprocess without TRITON_INTERPRET. The interpreter tests say the kernels compute the right
thing; these say the compiled kernels will launch (shared memory within the SM's), will not crawl
(no registers spilled), and use tensor cores for 16-bit attention. On the A100 and H100, where the
tiles were tuned, every candidate must be clean; elsewhere each launch must keep a clean one (the
autotuner skips a candidate that does not fit and times the others).
"""

import json
import os
import sys

import pytest
from helpers import run_ok

triton = pytest.importorskip("triton")
from kvpo_kernels.triton.aot import TMA_KERNELS  # noqa: E402  (needs triton)

try:
    from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401

    _PTXAS = os.path.exists(triton.knobs.nvidia.ptxas.path)
except Exception:  # no CUDA backend in this Triton build
    _PTXAS = False

pytestmark = pytest.mark.skipif(not _PTXAS, reason="Triton's CUDA backend (ptxas) is missing")

ARCHS = ("sm_80", "sm_89", "sm_90a", "sm_100a", "sm_120")
TUNED = ("sm_80", "sm_90a")
# the most shared memory a block may opt in to (CUDA programming guide, per compute capability)
SHARED_LIMIT = {"sm_80": 163, "sm_89": 99, "sm_90a": 227, "sm_100a": 227, "sm_120": 99}
THREADS_PER_SM = {"sm_80": 2048, "sm_89": 1536, "sm_90a": 2048, "sm_100a": 2048, "sm_120": 1536}
ATTENTION = (
    "routed_attention.fwd",
    "routed_attention.bwd_dq",
    "routed_attention.bwd_dkdv",
    "routed_attention.bwd_fused",
    *TMA_KERNELS,
)
TMA_ARCHS = ("sm_90a", "sm_100a")  # triton_tma: Hopper, data-centre Blackwell; 16-bit, D <= 128
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
    # --quick: outside the tuned archs, each launch's candidates up to its first clean one
    return _compile(tmp_path_factory.mktemp("aot") / "records.json", "--quick", timeout=3600)


def test_every_launch_is_compiled_for_every_arch(records):
    seen = {(r["kernel"], r["arch"], r["dtype"], r["head_dim"], r["page_size"]) for r in records}
    want = {
        (k, a, d, D, p)
        for k in ATTENTION
        for a in (TMA_ARCHS if k in TMA_KERNELS else ARCHS)
        for d in (("fp16", "bf16") if k in TMA_KERNELS else ("fp16", "bf16", "fp32"))
        for D in ((64, 128) if k in TMA_KERNELS else (64, 128, 256))
        for p in (16, 1560)
    } | {(k, a, d, 0, 0) for k in ENERGY for a in ARCHS for d in ("fp16", "bf16", "fp32")}
    assert seen == want


def test_autotuning_keeps_several_candidates_for_16_bit_attention(records):
    fwd = [r for r in records if r["kernel"] == "routed_attention.fwd" and r["dtype"] == "bf16"]
    for D in (64, 128, 256):
        tiles = {
            (r["block_m"], r["block_n"], r["num_warps"], r["num_stages"])
            for r in fwd
            if r["head_dim"] == D and r["page_size"] == 1560 and r["arch"] == "sm_90a"
        }
        assert len(tiles) >= 2, (D, tiles)


def _clean(r: dict) -> bool:
    """16-bit: nothing spilled. fp32 (exact IEEE dots on CUDA cores, the correctness path, not the
    fast one): ptxas spills a few bytes in some backward tiles; at most 64. And the shared memory
    within what one block may have."""
    budget = 64 if r["dtype"] == "fp32" else 0
    return r["spill_bytes"] <= budget and 0 <= r["shared_bytes"] <= SHARED_LIMIT[r["arch"]] * 1024


def test_no_candidate_spills_or_overflows_where_the_tiles_were_tuned(records):
    tuned = [r for r in records if r["arch"] in TUNED]
    assert tuned
    for r in tuned:
        assert _clean(r), r


def test_every_launch_keeps_a_clean_candidate_on_every_arch(records):
    launches: dict[tuple, list[dict]] = {}
    for r in records:
        key = (r["kernel"], r["arch"], r["dtype"], r["head_dim"], r["page_size"])
        launches.setdefault(key, []).append(r)
    for key, rs in launches.items():
        assert any(_clean(r) for r in rs), (key, rs)


def test_keys_blocks_never_exceed_small_pages(records):
    for r in records:
        if r["kernel"] in ATTENTION and r["page_size"] == 16:
            assert r["block_n"] == 16, r


def test_16_bit_attention_runs_on_tensor_cores(records):
    """wgmma (warpgroup MMA) on Hopper, tcgen05 on the B200 (mma.sync in its 32-row tiles),
    mma.sync on Ampere, Ada and the RTX Blackwell; fp32 stays on exact CUDA-core FMAs."""
    allowed = {"sm_90a": ("wgmma", "mma"), "sm_100a": ("tcgen05", "mma")}
    for r in records:
        if r["kernel"] not in ATTENTION:
            continue
        if r["dtype"] == "fp32":
            assert r["matmul"] == "fma", r
        else:
            assert r["matmul"] in allowed.get(r["arch"], ("mma",)), r
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


def test_the_tma_kernels_load_through_tma_into_wgmma_on_hopper(records):
    tma = [r for r in records if r["kernel"] in TMA_KERNELS]
    assert {r["kernel"] for r in tma} == set(TMA_KERNELS)
    assert all(r["tma"] for r in tma), [r for r in tma if not r["tma"]]
    # 16-token pages give blocks of 16 keys, too few rows for wgmma: mma.sync there
    hopper = [r for r in tma if r["arch"] == "sm_90a" and r["page_size"] == 1560]
    assert hopper and all(r["matmul"] == "wgmma" for r in hopper), hopper
    assert not any(r["tma"] for r in records if r["kernel"] == "routed_attention.fwd")


def test_velocity_energy_forward_fills_an_sm(records):
    """The forward folds each 16-byte load into its accumulator as it goes, which keeps it at
    32 registers or fewer: 8 programs of 8 warps (a full SM of 2048 threads; 6 on Ada's and RTX
    Blackwell's 1536, 40 registers) then fit, and the launch, sized to the resident programs, is
    one wave of them per SM. (The grid is sized from the compiled kernel's registers at run time,
    so this guards the speed, not the correctness.)"""
    fwd = [
        r for r in records if r["kernel"] in ("velocity_energy.fwd", "velocity_energy.fwd_partials")
    ]
    assert len(fwd) == 2 * 3 * len(ARCHS)
    for r in fwd:
        allocated = -(-r["registers"] // 8) * 8  # per thread, in steps of 8 (256 per warp)
        assert r["num_warps"] == 8 and allocated * THREADS_PER_SM[r["arch"]] <= 65536, r


def test_head_dims_below_tl_dots_smallest_compile(tmp_path):
    """D < 16 (1, 3, 8) runs on a head-dim tile of 16, masked: tl.dot takes no operand dimension
    under 16, so a tile of D's own power of two did not compile."""
    records = _compile(
        tmp_path / "records.json", "--arch", "sm_80", "--head_dim", "3", timeout=1200
    )
    # the TMA kernels take head dims that are a multiple of 8, on sm 9.x and 10.x
    assert {r["kernel"] for r in records if r["head_dim"]} == set(ATTENTION) - set(TMA_KERNELS)


def test_blackwell_attention_runs_on_tcgen05():
    """On the B200 Triton runs the 16-bit forward's tiles of 64 rows and more on tcgen05, the
    tensor-core MMA of Blackwell (the quick compile above stops at the 32-row tile, mma.sync)."""
    code = (
        "import json, torch\n"
        "from kvpo_kernels.triton import aot\n"
        "launch = aot.routed_attention_launches(torch.bfloat16, 128, 1560)['routed_attention.fwd']\n"
        "records = aot.compile_launch(launch, 'sm_100a', 'fwd', torch.bfloat16, 1560)\n"
        "print(json.dumps([(r.block_m, r.matmul) for r in records]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = run_ok([sys.executable, "-c", code], env=env, timeout=1200).stdout
    tiles = json.loads(out.strip().splitlines()[-1])
    assert {m for m, _ in tiles} >= {32, 64}, tiles
    for block_m, matmul in tiles:
        assert matmul == ("tcgen05" if block_m >= 64 else "mma"), tiles


def test_check_fails_an_unclean_tuned_candidate_and_a_launch_left_without_a_clean_one():
    """``--check``'s rule on made-up records: every candidate on sm_80 / sm_90a; elsewhere one
    clean candidate per launch is enough, none is not."""
    from kvpo_kernels.triton.aot import Compiled, problems

    def rec(arch, block_m, spill, shared, limit):
        return Compiled(
            "routed_attention.fwd",
            arch,
            "bf16",
            128,
            1560,
            block_m,
            64,
            8,
            2,
            200,
            spill,
            shared,
            limit,
            "mma",
        )

    hopper = 227 * 1024
    assert problems([rec("sm_90a", 64, 0, 90_000, hopper)]) == []
    found = problems([rec("sm_90a", 64, 0, 90_000, hopper), rec("sm_90a", 128, 16, 90_000, hopper)])
    assert len(found) == 1 and "sm_90a" in found[0] and "128x64" in found[0], found
    ada = 99 * 1024
    assert problems([rec("sm_89", 64, 0, 120_000, ada), rec("sm_89", 32, 0, 60_000, ada)]) == []
    found = problems([rec("sm_89", 64, 0, 120_000, ada), rec("sm_89", 32, 8, 60_000, ada)])
    assert len(found) == 1 and "no candidate" in found[0] and "sm_89" in found[0], found
