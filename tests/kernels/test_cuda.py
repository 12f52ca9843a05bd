"""GPU tests: every GPU backend against the float64 reference (skipped without a CUDA device)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    CASES,
    RoutedCase,
    assert_low_precision,
    assert_lse_grads,
    assert_rel,
    make_routed,
    routed_grads,
)

import kvpo_kernels
from kvpo_kernels import _backend

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _gpu_backends(op: str):
    names = []
    if _backend.triton_available() and not _backend.triton_interpreted():
        names.append("triton")
        if op == "routed_attn_fwd" and _backend._tma_capable(torch.device("cuda")):
            names.append("triton_tma")
    if _backend.native_cuda_available(op):
        names.append("cuda")
    return names


def _fn(backend, deterministic=True):
    return lambda q, k, v, t, lens: kvpo_kernels.routed_attention(
        q, k, v, t, lens, backend=backend, deterministic=deterministic
    )


def _takes(backend: str, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether ``backend`` takes this dtype and head dim (the CUDA C++ kernels: fp16/bf16, D 64
    or 128; triton_tma: fp16/bf16, D a multiple of 8 up to 128)."""
    if backend == "cuda":
        return dtype != torch.float32 and head_dim in (64, 128)
    if backend == "triton_tma":
        return dtype != torch.float32 and head_dim % 8 == 0 and head_dim <= 128
    return True


def _ref(q, k, v, t, lens):
    return kvpo_kernels.routed_attention_reference(q, k, v, t, lens)


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_routed_attention_gpu_backends(case, dtype, deterministic):
    backends = _gpu_backends("routed_attn_fwd")
    if not backends:
        pytest.skip("no GPU backend built")
    q, k, v, table, lens = make_routed(case, torch.float64)
    dout = torch.randn_like(q)
    dlse = torch.zeros(q.shape[:3], dtype=torch.float64)
    ref = routed_grads(_ref, q, k, v, table, lens, dout, dlse)
    dev = [t.cuda() for t in (q, k, v, table)] + [None if lens is None else lens.cuda()]
    q, k, v, table, lens = dev
    low = [t.to(dtype) for t in (q, k, v)]
    pt = routed_grads(_ref, *low, table, lens, dout.cuda().to(dtype), dlse.cuda())
    for backend in backends:
        if not _takes(backend, dtype, case.D):
            continue
        fn = _fn(backend, deterministic)
        got = routed_grads(fn, *low, table, lens, dout.cuda().to(dtype), dlse.cuda())
        for name, a, b, c in zip(("out", "lse", "dq", "dk", "dv"), got, pt, ref, strict=True):
            if dtype == torch.float32:
                assert_rel(a.cpu(), c, 1e-5, f"{backend} {name}")
            else:
                assert_low_precision(a.cpu(), b.cpu(), c, f"{backend} {dtype} {name}")


def test_tma_backend_on_a_wan_sized_page():
    """triton_tma against the Triton pointer kernels on 1560-token pages (TMA zero-fills the last
    block past the page), partial pages, both backward modes."""
    if "triton_tma" not in _gpu_backends("routed_attn_fwd"):
        pytest.skip("needs compiled Triton on a GPU of compute capability 9.x or 10.x")
    case = RoutedCase(4, 4, 2, 300, 128, 5, 1560, 4, partial=True)
    q, k, v, table, lens = (
        None if t is None else t.cuda() for t in make_routed(case, torch.bfloat16, seed=4)
    )
    dout = torch.randn_like(q)
    dlse = torch.zeros(q.shape[:3], device="cuda")
    want = routed_grads(_fn("triton"), q, k, v, table, lens, dout, dlse)
    for deterministic in (True, False):
        got = routed_grads(_fn("triton_tma", deterministic), q, k, v, table, lens, dout, dlse)
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want, strict=True):
            assert_rel(a.float().cpu(), b.float().cpu(), 2e-2, f"triton_tma {name}")


@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=str)
def test_routed_attention_gpu_gradient_of_lse_alone(case):
    if "triton" not in _gpu_backends("routed_attn_fwd"):
        pytest.skip("needs compiled Triton")
    assert_lse_grads(_fn("triton"), case, torch.float32, 1e-5, "triton", device="cuda")


def _energy_and_grad(fn, v_pred, v_ref, weight):
    """Energies and d(sum_g c_g energy_g) / d v_pred for fixed random c."""
    v_pred = v_pred.detach().clone().requires_grad_()
    e = fn(v_pred, v_ref, weight)
    c = torch.linspace(0.5, 1.5, e.shape[0], dtype=e.dtype, device=e.device)
    (grad,) = torch.autograd.grad((e * c).sum(), v_pred)
    return e.detach(), grad


# (G, S, N): a Wan chunk's step at 1560 tokens; N long enough for the CUDA kernels' unrolled
# loop; N odd (no 16-byte vectors).
ENERGY_SHAPES = [(8, 4, 3 * 1560), (2, 3, 2**20 + 8), (3, 2, 2**18 + 3)]


def _energy_weight(kind: str, G: int, S: int):
    """[S] (a stride-0 view over G at the kernels), [G, S] with strides (1, G), or None."""
    return {
        "step": lambda: torch.rand(S, dtype=torch.float64),
        "strided": lambda: torch.rand(S, G, dtype=torch.float64).t(),
        "none": lambda: None,
    }[kind]()


@pytest.mark.parametrize("weight_kind", ["step", "strided", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", ENERGY_SHAPES, ids=str)
def test_velocity_energy_gpu_backends(shape, dtype, weight_kind):
    backends = _gpu_backends("velocity_energy_fwd")
    if not backends:
        pytest.skip("no GPU backend built")
    G, S, N = shape
    v_pred = torch.randn(G, S, N, dtype=torch.float64)
    v_ref = v_pred + torch.randn_like(v_pred)
    weight = _energy_weight(weight_kind, G, S)
    w_dev = None if weight is None else weight.cuda()

    def ref(a, b, w):
        return kvpo_kernels.velocity_energy_reference(a, b, w, "mean")

    want = _energy_and_grad(ref, v_pred, v_ref, weight)
    low = [t.cuda().to(dtype) for t in (v_pred, v_ref)]
    pt = _energy_and_grad(ref, *low, None if weight is None else w_dev.to(dtype))
    for backend in backends:

        def fn(a, b, w, backend=backend):
            return kvpo_kernels.velocity_energy(a, b, w, "mean", backend=backend)

        got = _energy_and_grad(fn, *low, w_dev)
        for name, a, b, c in zip(("energy", "grad"), got, pt, want, strict=True):
            if dtype == torch.float32:
                assert_rel(a.cpu(), c, 1e-5, f"{backend} {name}")
            else:
                assert_low_precision(a.cpu(), b.cpu(), c, f"{backend} {dtype} {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_velocity_energy_launch_is_one_wave_of_its_resident_programs(dtype):
    """The grid is sized from the compiled kernel's registers: rows * splits programs fit the
    SMs at the occupancy the registers allow (8 of 8 warps at <= 32 registers)."""
    if "triton" not in _gpu_backends("velocity_energy_fwd"):
        pytest.skip("needs compiled Triton")
    from kvpo_kernels.triton import _common
    from kvpo_kernels.triton import velocity_energy as ve

    a = torch.randn(8, 4, 3 * 16 * 60 * 104, device="cuda", dtype=dtype)  # a Wan chunk
    b = torch.randn_like(a)
    energy = torch.zeros(8, device="cuda")
    launch = ve.fwd_launch(a, b, None, True, energy)
    launch()
    compiled = launch.jit_fn.warmup(*launch.args, grid=launch.grid, **launch.meta)
    compiled._init_handles()
    props = torch.cuda.get_device_properties(a.device)
    per_sm = _common.resident_programs(
        compiled.n_regs,
        8,
        getattr(props, "regs_per_multiprocessor", 65536),
        props.max_threads_per_multi_processor // 32,
    )
    slots = per_sm * props.multi_processor_count
    rows, splits = launch.grid
    assert rows == 32 and rows * splits <= slots
    blocks = -(-a.shape[2] // launch.meta["BLOCK"])  # and no program loops more than it must
    assert launch.args[6] // launch.meta["BLOCK"] == -(-blocks // min(slots // rows, blocks))
    want = kvpo_kernels.velocity_energy_reference(a.double(), b.double(), None, "mean")
    assert_rel(energy.cpu().double(), want.cpu(), 1e-5, "one-wave launch")


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("shape", [(2, 3, 0), (0, 3, 5), (2, 0, 5)], ids=str)
def test_velocity_energy_empty_dimensions_on_gpu(shape, reduction):
    backends = _gpu_backends("velocity_energy_fwd")
    if not backends:
        pytest.skip("no GPU backend built")
    a, b = torch.randn(shape, device="cuda"), torch.randn(shape, device="cuda")
    want = kvpo_kernels.velocity_energy_reference(a, b, None, reduction)  # 0, NaN or []
    for backend in backends:
        got = kvpo_kernels.velocity_energy(a, b, None, reduction, backend=backend)
        torch.testing.assert_close(got, want, equal_nan=True, msg=backend)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_velocity_energy_is_bitwise_repeatable(backend):
    """The CUDA kernel (partial sums, then a fixed-order sum) always; Triton under
    torch.use_deterministic_algorithms(True), when it takes the same path (its default one launch
    adds with float atomics, which need not repeat)."""
    if backend not in _gpu_backends("velocity_energy_fwd"):
        pytest.skip(f"no {backend} kernel")
    a = torch.randn(8, 4, 3 * 16 * 60 * 104, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    w = torch.rand(4, device="cuda")
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(backend == "triton")
    try:
        first = kvpo_kernels.velocity_energy(a, b, w, "mean", backend=backend)
        for _ in range(10):
            assert torch.equal(
                kvpo_kernels.velocity_energy(a, b, w, "mean", backend=backend), first
            )
    finally:
        torch.use_deterministic_algorithms(before)
    want = kvpo_kernels.velocity_energy_reference(a.double(), b.double(), w.double(), "mean")
    assert_rel(first.cpu().double(), want.cpu(), 1e-5, f"{backend} energy")


def test_triton_does_not_recompile_when_only_the_table_changes():
    if "triton" not in _gpu_backends("routed_attn_fwd"):
        pytest.skip("needs compiled Triton")
    from kvpo_kernels.triton.routed_attention import _fwd_kernel

    q = torch.randn(8, 4, 64, 64, device="cuda", dtype=torch.float16)
    k = torch.randn(16, 4, 32, 64, device="cuda", dtype=torch.float16)
    base = torch.arange(16, dtype=torch.int32)
    droppable = torch.ones(16, dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    table = kvpo_kernels.route_pages(base, 8, 0.5, droppable, generator=gen).cuda()

    def compiled_variants() -> int:
        # JITFunction.device_caches[device] = (kernel_cache, kernel_key_cache, target, backend, binder)
        return sum(len(cache[0]) for cache in _fwd_kernel.fn.device_caches.values())

    kvpo_kernels.routed_attention(q, k, k, table, backend="triton")
    before = compiled_variants()
    assert before >= 1
    for _ in range(5):
        table = kvpo_kernels.route_pages(base, 8, 0.5, droppable, generator=gen).cuda()
        kvpo_kernels.routed_attention(q, k, k, table, backend="triton")
    assert compiled_variants() == before


# Shapes for the CUDA C++ tensor-core forward: several 64-key blocks per page with a masked tail,
# two query tiles with a partial one, GQA, shared pages, an empty row.
CUDA_CASES = [
    RoutedCase(3, 4, 2, 100, 64, 6, 70, 5, partial=True, empty_row=True),
    RoutedCase(4, 4, 1, 65, 128, 5, 130, 4),
    RoutedCase(2, 2, 2, 16, 128, 3, 64, 3, partial=True),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CUDA_CASES, ids=str)
def test_cuda_forward_against_reference_and_triton(case, dtype):
    if not _backend.native_cuda_available("routed_attn_fwd"):
        pytest.skip("kvpo_kernels._C built without CUDA")
    q, k, v, table, lens = make_routed(case, torch.float64)
    ref_out, ref_lse = _ref(q, k, v, table, lens)
    dev = [t.cuda().to(dtype) for t in (q, k, v)]
    tab, ln = table.cuda(), None if lens is None else lens.cuda()
    pt_out, pt_lse = _ref(*dev, tab, ln)
    out, lse = kvpo_kernels.routed_attention(*dev, tab, ln, backend="cuda")
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_low_precision(out.cpu(), pt_out.cpu(), ref_out, f"cuda {dtype} out")
    assert_low_precision(lse.cpu(), pt_lse.cpu(), ref_lse, f"cuda {dtype} lse")
    if _backend.triton_available():
        t_out, t_lse = kvpo_kernels.routed_attention(*dev, tab, ln, backend="triton")
        torch.testing.assert_close(out.float(), t_out.float(), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(lse, t_lse, rtol=1e-3, atol=1e-3)


def test_cuda_backend_rejects_unsupported_inputs():
    if not _backend.native_cuda_available("routed_attn_fwd"):
        pytest.skip("kvpo_kernels._C built without CUDA")
    q, k, v, table, lens = make_routed(CUDA_CASES[0], torch.float32)
    with pytest.raises(TypeError, match="backend 'cuda'"):
        kvpo_kernels.routed_attention(q.cuda(), k.cuda(), v.cuda(), table.cuda(), backend="cuda")
    # a row of more query tiles (64 queries) than a grid axis holds, 65535
    q = torch.zeros(1, 1, 65535 * 64 + 1, 64, device="cuda", dtype=torch.float16)
    k = torch.zeros(1, 1, 16, 64, device="cuda", dtype=torch.float16)
    table = torch.zeros(1, 1, device="cuda", dtype=torch.int32)
    with pytest.raises(ValueError, match="past the CUDA forward's grid"):
        kvpo_kernels.routed_attention(q, k, k, table, backend="cuda")


def test_triton_routed_attention_past_a_grid_axis():
    """More (row, head) pairs (forward, dq) and (page, KV head) pairs (dk/dv) than a CUDA grid's
    second axis holds, 65535: the launches split, every row and page against float64."""
    if "triton" not in _gpu_backends("routed_attn_fwd"):
        pytest.skip("no Triton GPU backend")
    gen = torch.Generator().manual_seed(10)
    B, H, Hkv, Lq, D, P, T = 17000, 4, 2, 3, 64, 33000, 16
    q = torch.randn(B, H, Lq, D, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(P, Hkv, T, D, generator=gen, dtype=torch.float64) for _ in range(2))
    table = torch.stack([torch.arange(B) % P, (7 * torch.arange(B) + 1) % P], 1).to(torch.int32)
    table[::5, 1] = -1
    dout = torch.randn_like(q)
    dlse = torch.zeros(B, H, Lq, dtype=torch.float64)
    ref = routed_grads(_ref, q, k, v, table, None, dout, dlse)
    dev = [t.cuda().float() for t in (q, k, v)]
    got = routed_grads(_fn("triton"), *dev, table.cuda(), None, dout.cuda(), dlse.cuda())
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, ref, strict=True):
        assert_rel(a.cpu(), b, 1e-4, f"triton past a grid axis {name}")


def _cuda_fn(deterministic: bool):
    return lambda q, k, v, t, lens: kvpo_kernels.routed_attention(
        q, k, v, t, lens, backend="cuda", deterministic=deterministic
    )


def _needs_cuda_backward():
    if not _backend.native_cuda_available("routed_attn_bwd"):
        pytest.skip("kvpo_kernels._C built without the CUDA backward")


# The CUDA C++ backward's cases: the shared ones it takes (head dim 64, 128) and the forward's.
CUDA_BWD_CASES = [c for c in CASES if c.D in (64, 128)] + CUDA_CASES


@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "atomic_dq"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CUDA_BWD_CASES, ids=str)
def test_cuda_backward_against_reference(case, dtype, deterministic):
    """dq, dk, dv of <out, dout> + <lse, dlse> in both dq modes against float64."""
    _needs_cuda_backward()
    q, k, v, table, lens = make_routed(case, torch.float64, seed=1)
    table[0, 1:3] = 1  # a row listing a (non-empty) page twice: its gradient counts twice
    dout = torch.randn_like(q)
    dlse = torch.randn(q.shape[:3], dtype=torch.float64)
    ref = routed_grads(_ref, q, k, v, table, lens, dout, dlse)
    low = [t.cuda().to(dtype) for t in (q, k, v)]
    tab, ln = table.cuda(), None if lens is None else lens.cuda()
    dout_low, dlse_dev = dout.cuda().to(dtype), dlse.cuda()
    pt = routed_grads(_ref, *low, tab, ln, dout_low, dlse_dev)
    got = routed_grads(_cuda_fn(deterministic), *low, tab, ln, dout_low, dlse_dev)
    for name, a, b, c in zip(("dq", "dk", "dv"), got[2:], pt[2:], ref[2:], strict=True):
        assert a.dtype == dtype, name
        assert_low_precision(a.cpu(), b.cpu(), c, f"cuda {dtype} {name} ({deterministic=})")


def test_cuda_backward_deterministic_mode_is_bitwise_repeatable():
    """Rows sharing pages (dk/dv summed inside a CTA) and many query tiles (dq): the same bits on
    every call; the atomic mode agrees to rounding."""
    _needs_cuda_backward()
    case = RoutedCase(8, 4, 2, 300, 128, 6, 200, 6, partial=True)
    q, k, v, table, lens = make_routed(case, torch.float64, seed=2)
    args = [t.cuda().to(torch.bfloat16) for t in (q, k, v)]
    args += [table.cuda(), lens.cuda()]
    dout = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)
    dlse = torch.zeros(q.shape[:3], device="cuda")
    first = routed_grads(_cuda_fn(True), *args, dout, dlse)[2:]
    for _ in range(3):
        again = routed_grads(_cuda_fn(True), *args, dout, dlse)[2:]
        for name, a, b in zip(("dq", "dk", "dv"), again, first, strict=True):
            assert torch.equal(a, b), f"deterministic {name} differs between calls"
    atomic = routed_grads(_cuda_fn(False), *args, dout, dlse)[2:]
    for name, a, b in zip(("dq", "dk", "dv"), atomic, first, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2, msg=name)


def test_cuda_backward_rejects_a_grid_past_its_limits():
    """More KV heads than a grid axis holds (65535): a ValueError naming the grid."""
    _needs_cuda_backward()
    H = 65536
    q = torch.zeros(1, H, 1, 64, device="cuda", dtype=torch.float16)
    k = torch.zeros(1, H, 16, 64, device="cuda", dtype=torch.float16)
    table = torch.zeros(1, 1, device="cuda", dtype=torch.int32)
    stat = torch.zeros(1, H, 1, device="cuda")
    for deterministic in (True, False):
        with pytest.raises(ValueError, match="past the CUDA backward's grids"):
            torch.ops.kvpo.routed_attn_bwd(
                q, q, k, k, table, None, stat, stat, 0.125, deterministic
            )


# The Hopper forward (csrc/cuda/routed_attention_sm90.cu, compute capability 9.0): 176-key blocks,
# 128-query tiles. Pages of the target's 1560 tokens (8 full blocks and one of 152), of 400 (a
# last block overlapping the one before), of 37 and 100 (one block starting below key 0); partly
# filled pages whose memory past the fill holds NaN; an empty page every row lists; a row without
# a kept page; GQA and MQA; query counts off the 128-query tile.
HOPPER_CASES = [
    RoutedCase(2, 4, 4, 200, 128, 5, 1560, 4, partial=True),
    RoutedCase(2, 2, 2, 129, 128, 4, 1560, 3),
    RoutedCase(3, 4, 2, 300, 64, 5, 400, 4, partial=True),
    RoutedCase(3, 4, 2, 130, 64, 7, 37, 6, partial=True, empty_row=True),
    RoutedCase(2, 2, 1, 77, 128, 6, 100, 5, partial=True, empty_row=True),
]
ROOT = Path(__file__).resolve().parents[2]


def _hopper() -> bool:
    return torch.cuda.get_device_capability() == (9, 0)


def _with_nan_tails(t: torch.Tensor, lens: torch.Tensor | None) -> torch.Tensor:
    """t [P, Hkv, page_size, D] with NaN past each page's fill: memory no kernel may read."""
    if lens is None:
        return t
    t = t.clone()
    for page, n in enumerate(lens.tolist()):
        t[page, :, n:] = float("nan")
    return t


def _fwd_kernels(fn) -> list[str]:
    """The routed attention forward kernels fn launches, by the profiler's names."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted({e.name for e in prof.events() if "routed_attn_fwd" in e.name})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", HOPPER_CASES, ids=str)
def test_hopper_forward_against_reference(case, dtype):
    if not _backend.native_cuda_available("routed_attn_fwd"):
        pytest.skip("kvpo_kernels._C built without CUDA")
    if not _hopper():
        pytest.skip("needs a compute capability 9.0 GPU")
    q, k, v, table, lens = make_routed(case, torch.float64, seed=1)
    ref_out, ref_lse = _ref(q, k, v, table, lens)
    tab, ln = table.cuda(), None if lens is None else lens.cuda()
    clean = [t.cuda().to(dtype) for t in (q, k, v)]
    pt_out, pt_lse = _ref(*clean, tab, ln)
    k_nan, v_nan = _with_nan_tails(clean[1], lens), _with_nan_tails(clean[2], lens)
    out, lse = kvpo_kernels.routed_attention(clean[0], k_nan, v_nan, tab, ln, backend="cuda")
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_low_precision(out.cpu(), pt_out.cpu(), ref_out, f"hopper {dtype} out")
    assert_low_precision(lse.cpu(), pt_lse.cpu(), ref_lse, f"hopper {dtype} lse")
    empty = torch.isinf(ref_lse)  # rows without a kept key: out = 0, lse = -inf exactly
    assert empty.any() or not case.empty_row
    assert (out.cpu()[empty] == 0).all() and (lse.cpu()[empty] == float("-inf")).all()


_SM80_SCRIPT = """
import sys, torch, kvpo_kernels
from torch.profiler import ProfilerActivity, profile
q, k, v, table, lens = torch.load(sys.argv[1])
dev = [None if t is None else t.cuda() for t in (q, k, v, table, lens)]
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    out, lse = kvpo_kernels.routed_attention(*dev, backend="cuda")
    torch.cuda.synchronize()
names = sorted({e.name for e in prof.events() if "routed_attn_fwd" in e.name})
torch.save({"out": out.cpu(), "lse": lse.cpu(), "kernels": names}, sys.argv[2])
"""


@pytest.mark.parametrize("case", [HOPPER_CASES[0], HOPPER_CASES[3]], ids=str)
def test_hopper_forward_runs_and_matches_the_sm80_kernel(case, tmp_path):
    """The cuda backend runs the Hopper kernel on a 9.0 GPU; KVPO_CUDA_HOPPER=0 (set for a
    subprocess) runs the sm80 kernel instead, and both agree."""
    if not _backend.native_cuda_available("routed_attn_fwd"):
        pytest.skip("kvpo_kernels._C built without CUDA")
    if not _hopper():
        pytest.skip("needs a compute capability 9.0 GPU")
    q, k, v, table, lens = make_routed(case, torch.float64, seed=2)
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    k, v = _with_nan_tails(k, lens), _with_nan_tails(v, lens)
    dev = [None if t is None else t.cuda() for t in (q, k, v, table, lens)]
    got = {}

    def run():
        got["out"], got["lse"] = kvpo_kernels.routed_attention(*dev, backend="cuda")

    kernels = _fwd_kernels(run)
    assert any("routed_attn_fwd_sm90_kernel" in n for n in kernels), (
        f"the cuda backend ran {kernels}, not the Hopper kernel: build kvpo_kernels._C with 9.0a "
        "in TORCH_CUDA_ARCH_LIST (sm_90a code)"
    )
    torch.save((q, k, v, table, lens), tmp_path / "inputs.pt")
    env = {**os.environ, "KVPO_CUDA_HOPPER": "0"}
    cmd = [sys.executable, "-c", _SM80_SCRIPT, str(tmp_path / "inputs.pt"), str(tmp_path / "o.pt")]
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    sm80 = torch.load(tmp_path / "o.pt")
    assert sm80["kernels"] and not any("sm90" in n for n in sm80["kernels"]), sm80["kernels"]
    torch.testing.assert_close(got["out"].cpu().float(), sm80["out"].float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got["lse"].cpu(), sm80["lse"], rtol=1e-3, atol=1e-3)


# The Hopper backward (csrc/cuda/routed_attention_bwd_sm90.cu, compute capability 9.0): dK/dV
# blocks of 128 keys by 64-query tiles, dQ tiles of 128 queries by 64 (D = 128) or 128 (D = 64)
# keys; the forward's cases, a row listing a page twice, gradients past a page's fill exactly 0.


def _bwd_kernels(fn) -> list[str]:
    """The routed attention backward kernels fn launches, by the profiler's names."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted({e.name for e in prof.events() if "routed_attn_d" in e.name})


def _needs_hopper_backward():
    _needs_cuda_backward()
    if not _hopper():
        pytest.skip("needs a compute capability 9.0 GPU")


def _hopper_inputs(case: RoutedCase, dtype: torch.dtype, seed: int):
    """float64 inputs (a row listing page 1 twice), and on the GPU in dtype with NaN past each
    page's fill in k and v."""
    q, k, v, table, lens = make_routed(case, torch.float64, seed=seed)
    table[0, 1:3] = 1
    gen = torch.Generator().manual_seed(seed + 100)
    dout = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    dlse = torch.randn(q.shape[:3], generator=gen, dtype=torch.float64)
    tab, ln = table.cuda(), None if lens is None else lens.cuda()
    clean = [t.cuda().to(dtype) for t in (q, k, v)]
    nan = [clean[0], _with_nan_tails(clean[1], lens), _with_nan_tails(clean[2], lens)]
    return (q, k, v, table, lens, dout, dlse), clean, nan, tab, ln


def _assert_zero_past_fill(grad: torch.Tensor, lens: torch.Tensor | None, what: str) -> None:
    if lens is None:
        return
    for page, n in enumerate(lens.tolist()):
        assert (grad[page, :, n:] == 0).all(), f"{what}: page {page} past its fill {n}"


@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "atomic_dq"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", HOPPER_CASES, ids=str)
def test_hopper_backward_against_reference(case, dtype, deterministic):
    """dq, dk, dv of <out, dout> + <lse, dlse> by the Hopper kernels against float64, with NaN in
    the page memory past each fill (never read: its dk and dv are written 0)."""
    _needs_hopper_backward()
    (q, k, v, table, lens, dout, dlse), clean, nan, tab, ln = _hopper_inputs(case, dtype, 1)
    ref = routed_grads(_ref, q, k, v, table, lens, dout, dlse)
    dout_low, dlse_dev = dout.cuda().to(dtype), dlse.cuda()
    pt = routed_grads(_ref, *clean, tab, ln, dout_low, dlse_dev)
    got = {}

    def run():
        got["g"] = routed_grads(_cuda_fn(deterministic), *nan, tab, ln, dout_low, dlse_dev)

    kernels = _bwd_kernels(run)
    assert any("routed_attn_dkdv_sm90_kernel" in n for n in kernels), (
        f"the cuda backend ran {kernels}, not the Hopper backward: build kvpo_kernels._C with "
        "9.0a in TORCH_CUDA_ARCH_LIST (sm_90a code)"
    )
    second = "routed_attn_dq_sm90_kernel" if deterministic else "routed_attn_dq_convert_sm90"
    assert any(second in n for n in kernels), kernels
    assert not any("sm90" not in n for n in kernels), f"sm80 kernels ran too: {kernels}"
    for name, a, b, c in zip(("dq", "dk", "dv"), got["g"][2:], pt[2:], ref[2:], strict=True):
        assert a.dtype == dtype, name
        assert_low_precision(a.cpu(), b.cpu(), c, f"hopper {dtype} {name} ({deterministic=})")
    _assert_zero_past_fill(got["g"][3].cpu(), lens, "hopper dk")
    _assert_zero_past_fill(got["g"][4].cpu(), lens, "hopper dv")


_SM80_BWD_SCRIPT = """
import sys, torch, kvpo_kernels
from torch.profiler import ProfilerActivity, profile
q, k, v, table, lens, dout, dlse, deterministic = torch.load(sys.argv[1])
q, k, v = (t.cuda().requires_grad_() for t in (q, k, v))
lens = None if lens is None else lens.cuda()
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    out, lse = kvpo_kernels.routed_attention(
        q, k, v, table.cuda(), lens, backend="cuda", deterministic=deterministic
    )
    finite = torch.isfinite(lse)
    loss = (out.double() * dout.cuda().double()).sum()
    loss = loss + (lse.double()[finite] * dlse.cuda().double()[finite]).sum()
    loss.backward()
    torch.cuda.synchronize()
names = sorted({e.name for e in prof.events() if "routed_attn_d" in e.name})
grads = [t.grad.cpu() for t in (q, k, v)]
torch.save({"grads": grads, "kernels": names}, sys.argv[2])
"""


@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "atomic_dq"])
@pytest.mark.parametrize("case", [HOPPER_CASES[0], HOPPER_CASES[3]], ids=str)
def test_hopper_backward_matches_the_sm80_kernels(case, deterministic, tmp_path):
    """KVPO_CUDA_HOPPER=0 (set for a subprocess) runs the sm80 backward instead; its gradients
    agree with the Hopper kernels'."""
    _needs_hopper_backward()
    (_, _, _, table, lens, dout, dlse), _, nan, tab, ln = _hopper_inputs(case, torch.bfloat16, 2)
    dout_low = dout.to(torch.bfloat16)
    got = {}

    def run():
        got["g"] = routed_grads(
            _cuda_fn(deterministic), *nan, tab, ln, dout_low.cuda(), dlse.float().cuda()
        )

    kernels = _bwd_kernels(run)
    assert any("routed_attn_dkdv_sm90_kernel" in n for n in kernels), kernels
    inputs = [t.cpu() for t in nan] + [table, lens, dout_low, dlse.float(), deterministic]
    torch.save(inputs, tmp_path / "inputs.pt")
    env = {**os.environ, "KVPO_CUDA_HOPPER": "0"}
    cmd = [
        sys.executable,
        "-c",
        _SM80_BWD_SCRIPT,
        str(tmp_path / "inputs.pt"),
        str(tmp_path / "g.pt"),
    ]
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    sm80 = torch.load(tmp_path / "g.pt")
    assert sm80["kernels"] and not any("sm90" in n for n in sm80["kernels"]), sm80["kernels"]
    for name, a, b in zip(("dq", "dk", "dv"), got["g"][2:], sm80["grads"], strict=True):
        assert not torch.isnan(a).any() and not torch.isnan(b).any(), name
        torch.testing.assert_close(a.cpu().float(), b.float(), rtol=2e-2, atol=2e-2, msg=name)


def test_hopper_backward_deterministic_mode_is_bitwise_repeatable():
    """Pages of 1560 keys shared by every row (dk/dv summed inside a CTA over many tiles) and dq
    by the walking kernel: the same bits on every call; the atomic mode agrees to rounding."""
    _needs_hopper_backward()
    case = RoutedCase(4, 4, 2, 300, 128, 5, 1560, 4, partial=True)
    (_, _, _, _, _, dout, dlse), _, nan, tab, ln = _hopper_inputs(case, torch.bfloat16, 3)
    args = [*nan, tab, ln, dout.cuda().to(torch.bfloat16), dlse.cuda()]
    got = {}

    def run():
        got["first"] = routed_grads(_cuda_fn(True), *args)[2:]

    kernels = _bwd_kernels(run)
    assert any("routed_attn_dq_sm90_kernel" in n for n in kernels), kernels
    for _ in range(3):
        again = routed_grads(_cuda_fn(True), *args)[2:]
        for name, a, b in zip(("dq", "dk", "dv"), again, got["first"], strict=True):
            assert torch.equal(a, b), f"deterministic {name} differs between calls"
    atomic = routed_grads(_cuda_fn(False), *args)[2:]
    for name, a, b in zip(("dq", "dk", "dv"), atomic, got["first"], strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2, msg=name)
