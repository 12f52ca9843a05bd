"""The Triton kernels under the interpreter (CPU tensors), against the float64 reference.

Runs when triton is installed; ``TRITON_INTERPRET=1`` is set by tests/conftest.py before triton is
imported. fp32 and fp16 only: the interpreter mishandles bf16.
"""

import os
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
    assert_strided_routed_attention,
    assert_strided_velocity_energy,
    kernel_fn,
    make_routed,
    permuted_copy,
    reference_fn,
    routed_grads,
    run_ok,
)

import kvpo_kernels
from kvpo_kernels import _backend

if not (_backend.triton_available() and _backend.triton_interpreted()):
    pytest.skip("needs triton and TRITON_INTERPRET=1 at import", allow_module_level=True)
from kvpo_kernels.triton._common import interpreter_problem  # noqa: E402

if interpreter_problem() is not None:  # this Triton and NumPy together, not the kernels
    pytest.skip(interpreter_problem(), allow_module_level=True)
triton_fn = kernel_fn("triton")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_routed_attention_fp32(case):
    q, k, v, table, lens = make_routed(case, torch.float64, seed=1)
    dout = torch.randn_like(q)
    dlse = torch.randn(q.shape[:3], dtype=torch.float64)
    ref = routed_grads(reference_fn, q, k, v, table, lens, dout, dlse)
    got = routed_grads(
        triton_fn, q.float(), k.float(), v.float(), table, lens, dout.float(), dlse.float()
    )
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, ref, strict=True):
        assert_rel(a, b, 1e-5, f"triton {name}")


def _atomic_fn(q, k, v, table, lens):
    return kvpo_kernels.routed_attention(
        q, k, v, table, lens, backend="triton", deterministic=False
    )


@pytest.mark.parametrize("case", CASES, ids=str)
def test_routed_attention_backward_with_atomic_dq(case):
    """deterministic=False: no dq kernel; the dk/dv programs add dS K into a float32 dq."""
    q, k, v, table, lens = make_routed(case, torch.float64, seed=11)
    dout = torch.randn_like(q)
    dlse = torch.randn(q.shape[:3], dtype=torch.float64)
    ref = routed_grads(reference_fn, q, k, v, table, lens, dout, dlse)
    x = [t.float() for t in (q, k, v)]
    got = routed_grads(_atomic_fn, *x, table, lens, dout.float(), dlse.float())
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, ref, strict=True):
        assert_rel(a, b, 1e-5, f"triton atomic dq {name}")
    low = [t.half() for t in (q, k, v)]
    pt = routed_grads(reference_fn, *low, table, lens, dout.half(), dlse)
    got = routed_grads(_atomic_fn, *low, table, lens, dout.half(), dlse.half())
    assert got[2].dtype == torch.float16
    for name, a, b, c in zip(("dq", "dk", "dv"), got[2:], pt[2:], ref[2:], strict=True):
        assert_low_precision(a, b, c, f"triton atomic dq fp16 {name}")


def test_atomic_dq_launches_only_dkdv():
    from kvpo_kernels.triton import routed_attention as ra

    q, k, v, table, lens = make_routed(CASES[1], torch.float32, seed=12)
    lse = torch.zeros(q.shape[:3])
    args = (q, q, k, v, table, lens, lse, lse, 0.1)
    grads = (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v))
    split = ra.bwd_launches(*args, *grads)
    fused = ra.bwd_launches(*args, *grads, deterministic=False)
    assert [launch.kernel for launch in split] == [ra._bwd_dq_kernel, ra._bwd_dkdv_kernel]
    assert [launch.kernel for launch in fused] == [ra._bwd_fused_kernel]
    assert fused[0].meta["ATOMIC_DQ"] and not split[1].meta["ATOMIC_DQ"]


@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=str)
def test_routed_attention_gradient_of_lse_alone(case):
    assert_lse_grads(triton_fn, case, torch.float32, 1e-5, "triton")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_routed_attention_fp16_within_twice_torch_error(case):
    q, k, v, table, lens = make_routed(case, torch.float64, seed=2)
    dout = torch.randn_like(q)
    dlse = torch.zeros(q.shape[:3], dtype=torch.float64)
    ref = routed_grads(reference_fn, q, k, v, table, lens, dout, dlse)
    low = [t.half() for t in (q, k, v)]
    pt = routed_grads(reference_fn, *low, table, lens, dout.half(), dlse)
    got = routed_grads(triton_fn, *low, table, lens, dout.half(), dlse)
    for name, a, b, c in zip(("out", "lse", "dq", "dk", "dv"), got, pt, ref, strict=True):
        assert_low_precision(a, b, c, f"triton fp16 {name}")


def test_routed_attention_agrees_with_cpu_kernel_on_shared_pages_and_empty_rows():
    case = RoutedCase(6, 4, 2, 13, 32, 6, 5, 6, partial=True, empty_row=True)
    q, k, v, table, lens = make_routed(case, torch.float32, seed=3)
    dout = torch.randn_like(q)
    dlse = torch.randn(q.shape[:3])
    a = routed_grads(triton_fn, q, k, v, table, lens, dout, dlse)
    b = routed_grads(kernel_fn("cpu"), q, k, v, table, lens, dout, dlse)
    assert torch.isneginf(a[1][-1]).all() and torch.equal(a[0][-1], torch.zeros_like(a[0][-1]))
    for name, x, y in zip(("out", "lse", "dq", "dk", "dv"), a, b, strict=True):
        assert_rel(x, y, 1e-5, name)


@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=str)
def test_routed_attention_strided_inputs_and_an_expanded_gradient(case):
    assert_strided_routed_attention("triton", case, seed=5)


@pytest.mark.parametrize("limit", ["grid", "offset"])
@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=str)
def test_routed_attention_splits_a_large_problem_into_launches(case, limit, monkeypatch):
    """With a launch's grid limit shrunk to one row's heads (and a few pages' KV heads), or its
    offset limit to one row, the problem runs as a launch per row (forward, dq) and per run of
    pages (dk, dv): the same values."""
    from kvpo_kernels.triton import routed_attention as ra

    q, k, v, table, lens = make_routed(case, torch.float64, seed=9)
    dout = torch.randn_like(q)
    dlse = torch.randn(q.shape[:3], dtype=torch.float64)
    ref = routed_grads(reference_fn, q, k, v, table, lens, dout, dlse)
    B, H, Lq, D = q.shape
    if limit == "grid":
        monkeypatch.setattr(ra, "MAX_GRID_Y", H)
    else:
        monkeypatch.setattr(ra, "MAX_OFFSET", H * Lq * D + 1)
    x = [t.float() for t in (q, k, v)]
    assert len(ra.fwd_launches(*x, table, lens, 0.1, x[0], torch.empty(B, H, Lq))) == B > 1
    got = routed_grads(triton_fn, *x, table, lens, dout.float(), dlse.float())
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, ref, strict=True):
        assert_rel(a, b, 1e-5, f"triton, a launch per row ({limit}) {name}")


def test_routed_attention_grids_stay_within_cuda_limits():
    """More (row, head) and (page, KV head) pairs than a CUDA grid's second axis holds (65535):
    each launch's grid stays within it, and the launches cover every row and page."""
    from kvpo_kernels.triton import routed_attention as ra

    B, H, Hkv, Lq, D, P, T = 40000, 4, 2, 64, 64, 50000, 16
    q = torch.zeros(1, 1, 1, 1, dtype=torch.float16).expand(B, H, Lq, D)
    k = torch.zeros(1, 1, 1, 1, dtype=torch.float16).expand(P, Hkv, T, D)
    table = torch.zeros(1, 1, dtype=torch.int32).expand(B, 1)
    lse = torch.zeros(1, 1, 1).expand(B, H, Lq)
    launches = ra.fwd_launches(q, k, k, table, None, 0.125, q, lse)
    launches += ra.bwd_launches(q, q, k, k, table, None, lse, lse, 0.125, q, k, k)
    launches += ra.bwd_launches(q, q, k, k, table, None, lse, lse, 0.125, q, k, k, False)
    covered = {"_fwd_kernel": 0, "_bwd_dq_kernel": 0, "_bwd_dkdv": 0}
    for launch in launches:
        grid = launch.grid({"BLOCK_M": 16, "BLOCK_N": 16})
        assert grid[0] < 2**31 and all(g <= 65535 for g in grid[1:]), grid
        covered[launch.jit_fn.__name__] += grid[1]
    # dk/dv twice: the split backward's and the atomic-dq one's
    assert covered == {"_fwd_kernel": B * H, "_bwd_dq_kernel": B * H, "_bwd_dkdv": 2 * P * Hkv}


def test_routed_attention_refuses_what_no_launch_holds():
    """More heads than a grid axis holds, one row of more than 2**31 elements, or 2**31 queries x
    heads x rows in the backward (whose dk/dv indexes lse in int32): a ValueError naming the
    limits, before any launch."""
    from kvpo_kernels.triton import routed_attention as ra

    with pytest.raises(ValueError, match="at most 65535 heads and rows of fewer than 2147483648"):
        ra._runs(4, 70000)
    q = torch.empty(0, device="meta").as_strided((2, 1, 2**20 + 1, 2**11), (2**32, 2**32, 2**11, 1))
    with pytest.raises(ValueError, match="rows of 2147485696 elements"):
        ra.fwd_launches(q, q, q, torch.zeros(2, 1, dtype=torch.int32), None, 1.0, q, q[..., 0])
    q = torch.empty(0, device="meta").as_strided((2**16, 2**8, 2**7, 1), (0, 0, 0, 1))
    with pytest.raises(ValueError, match="fewer than 2\\*\\*31 queries x heads x rows"):
        ra.bwd_launches(
            q,
            q,
            q,
            q,
            torch.zeros(2**16, 1, dtype=torch.int32),
            None,
            *[q[..., 0]] * 2,
            1.0,
            q,
            q,
            q,
        )


def test_velocity_energy_refuses_a_row_past_2_31_elements():
    """A (branch, step) row of 2**31 elements, which the kernels' int32 indices within a row
    cannot reach: a ValueError naming the shape, before any launch (rows are offset in int64)."""
    from kvpo_kernels.triton import velocity_energy as ve

    big = torch.zeros(1, dtype=torch.float16).expand(2, 1, 2**31)
    with pytest.raises(
        ValueError, match=r"rows of fewer than 2\*\*31 elements.*\(2, 1, 2147483648\)"
    ):
        ve.fwd_launch(big, big, None, True, torch.zeros(2))
    ok = torch.zeros(1, dtype=torch.float16).expand(2, 1, 2**31 - 2**20)
    assert ve.fwd_launch(ok, ok, None, True, torch.zeros(2)).grid[0] == 2


def test_velocity_energy_tiling_knobs_refuse_what_cannot_compile():
    from kvpo_kernels.triton import velocity_energy as ve

    a = torch.randn(2, 3, 700)
    with pytest.raises(ValueError, match="block must be a power of two >= 256, got 3000"):
        ve.fwd_launch(a, a, None, True, torch.zeros(2), block=3000)
    with pytest.raises(ValueError, match="eviction must be .*got 'evict'"):
        ve.fwd_launch(a, a, None, True, torch.zeros(2), eviction="evict")
    assert ve.fwd_launch(a, a, None, True, torch.zeros(2), block=512).meta["BLOCK"] == 512


def _rows_past_2_31_elements() -> None:
    from kvpo_kernels.triton import routed_attention as ra

    B, H, Lq, D, P, T = 3, 2, 20, 16, 4, 8
    stride = 2**30 + 2**20  # between rows: row 2 starts past 2**31
    buf = torch.empty(2 * stride + 2**20, dtype=torch.float16)  # untouched pages cost no memory
    rows = [buf.as_strided((B, H, Lq, D), (stride, Lq * D, D, 1), i * 2**18) for i in range(4)]
    q, dout, out, dq = rows
    assert dq[-1].data_ptr() - buf.data_ptr() >= 2**31 * buf.element_size()
    gen = torch.Generator().manual_seed(8)
    for t in (q, dout):
        t.copy_(torch.randn(t.shape, generator=gen))
    k, v = (torch.randn(P, 1, T, D, generator=gen).half() for _ in range(2))
    table = torch.tensor([[0, 1, 2], [0, -1, 3], [2, 3, 1]], dtype=torch.int32)
    lse = torch.empty(B, H, Lq)
    for launch in ra.fwd_launches(q, k, v, table, None, D**-0.5, out, lse):
        launch()
    delta = (dout.float() * out.float()).sum(-1)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for launch in ra.bwd_launches(dout, q, k, v, table, None, lse, delta, D**-0.5, dq, dk, dv):
        launch()
    zero = torch.zeros(B, H, Lq, dtype=torch.float64)
    ref = routed_grads(reference_fn, q.double(), k.double(), v.double(), table, None, dout, zero)
    for name, a, b in zip(
        ("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), ref, strict=True
    ):
        assert_rel(a.double(), b, 5e-3, f"triton past 2**31 {name}")


def test_routed_attention_rows_past_2_31_elements():
    """Rows of q, out, dout and dq more than 2**31 elements into one buffer (views of a 4 GiB
    allocation, of which only what they hold is ever written), read and written by the kernels
    as they are: the launches' int32 row offsets never wrap (runs of rows), nor dk/dv's (int64).
    In a process of its own: a wrapped offset reads outside the buffer, which may crash it."""
    here = Path(__file__).parent
    path = os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")])
    run_ok(
        [sys.executable, "-c", "import test_triton; test_triton._rows_past_2_31_elements()"],
        cwd=here,
        env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path},
        timeout=600,
    )


def test_page_rows_index():
    from kvpo_kernels.triton.routed_attention import page_rows_csr

    table = torch.tensor([[0, 2, -1], [2, 2, 1], [-1, -1, -1]], dtype=torch.int32)
    row_ptr, rows = page_rows_csr(table, 4)
    assert row_ptr.tolist() == [0, 1, 2, 5, 5]
    assert rows.tolist() == [0, 1, 0, 1, 1]


def _weight(kind, G, S, gen):
    """[G, S], [S] (a stride-0 view over G at the op) or [G, S] with strides (1, G); None."""
    return {
        "branch_step": lambda: torch.rand(G, S, generator=gen, dtype=torch.float64),
        "step": lambda: torch.rand(S, generator=gen, dtype=torch.float64),
        "strided": lambda: torch.rand(S, G, generator=gen, dtype=torch.float64).t(),
        "none": lambda: None,
    }[kind]()


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 4, 333), (8, 2, 5, 7, 11)], ids=str)
@pytest.mark.parametrize("weight_kind", ["branch_step", "step", "strided", "none"])
def test_velocity_energy(reduction, dtype, shape, weight_kind):
    gen = torch.Generator().manual_seed(4)
    v_pred = torch.randn(shape, generator=gen, dtype=torch.float64)
    v_ref = v_pred + torch.randn(shape, generator=gen, dtype=torch.float64)
    weight = _weight(weight_kind, *shape[:2], gen)
    grad = torch.randn(shape[0], dtype=torch.float64)

    def run(fn, a, b, w):
        a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
        e = fn(a, b, w, reduction)
        (e.double() * grad).sum().backward()
        return e.detach(), a.grad, b.grad

    ref = run(kvpo_kernels.velocity_energy_reference, v_pred, v_ref, weight)
    low = (v_pred.to(dtype), v_ref.to(dtype))

    def kernel(a, b, w, r):
        return kvpo_kernels.velocity_energy(a, b, w, r, backend="triton")

    got = run(kernel, *low, weight)
    if dtype == torch.float32:
        for name, a, b in zip(("energy", "d_pred", "d_ref"), got, ref, strict=True):
            assert_rel(a, b, 1e-5, name)
    else:
        w_low = None if weight is None else weight.to(dtype)
        pt = run(kvpo_kernels.velocity_energy_reference, *low, w_low)
        for name, a, b, c in zip(("energy", "d_pred", "d_ref"), got, pt, ref, strict=True):
            assert_low_precision(a, b, c, name)


def test_velocity_energy_strided_inputs():
    assert_strided_velocity_energy("triton")


def test_velocity_energy_deterministic_mode_sums_partials_in_a_fixed_order():
    """Under torch.use_deterministic_algorithms(True) the forward writes one partial sum per
    program (no atomics) and sums them per branch: the same energies as the reference, and the
    launch it makes is the partials one."""
    from kvpo_kernels.triton import velocity_energy as ve

    gen = torch.Generator().manual_seed(5)
    a = torch.randn(3, 4, 1000, generator=gen)
    b = a + torch.randn(3, 4, 1000, generator=gen)
    w = torch.rand(4, generator=gen)
    want = kvpo_kernels.velocity_energy_reference(a.double(), b.double(), w.double(), "mean")
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        got = kvpo_kernels.velocity_energy(a, b, w, "mean", backend="triton")
    finally:
        torch.use_deterministic_algorithms(before)
    assert_rel(got.double(), want, 1e-5, "deterministic energy")
    launch = ve.fwd_launch(a, b, w.expand(3, 4), True, None)
    assert launch.meta["PARTIALS"] and launch.args[3].numel() == 12 * launch.grid[1]
    launch()
    assert_rel(launch.args[3].view(3, -1).sum(1).double(), want, 1e-5, "partials")


@pytest.mark.parametrize("sms", [4, 108, 132])
@pytest.mark.parametrize("per_sm", [3, 8])
def test_velocity_energy_launch_is_one_wave(sms, per_sm):
    """Every (rows, N): rows * splits programs fit the device's resident slots (no second wave
    of a few programs) unless the rows alone exceed them, the slices cover N, every slice is a
    whole number of blocks, and no program takes more blocks than the fullest split needs."""
    from unittest import mock

    from kvpo_kernels.triton import velocity_energy as ve

    def cdiv(a, b):
        return -(-a // b)

    slots = per_sm * sms
    gen = torch.Generator().manual_seed(0)
    with mock.patch.object(ve, "num_sms", lambda device: sms):
        for _ in range(300):
            rows = int(torch.randint(1, 3 * slots, (1,), generator=gen))
            n = int(torch.randint(1, 2**22, (1,), generator=gen))
            for block in (256, 4096):
                splits, chunk = ve._split(rows, n, torch.device("cpu"), block, per_sm)
                assert chunk % block == 0 and splits * chunk >= n > (splits - 1) * chunk
                assert rows * splits <= max(slots, rows), (rows, n, splits)
                most = max(1, min(slots // rows, cdiv(n, block)))
                assert chunk // block == cdiv(cdiv(n, block), most), (rows, n, splits)


def test_resident_programs_match_the_occupancy_rules():
    from kvpo_kernels.triton._common import resident_programs

    # H100 / A100: 64K registers, 64 warps per SM; registers go to warps in units of 256
    assert resident_programs(31, 8, 65536, 64) == 8  # 32 x 32 x 8 = 8K per program
    assert resident_programs(33, 8, 65536, 64) == 6  # 40 x 32 x 8 = 10K
    assert resident_programs(40, 8, 65536, 64) == 6
    assert resident_programs(80, 8, 65536, 64) == 3
    assert resident_programs(16, 8, 65536, 64) == 8  # warp slots bind first
    assert resident_programs(31, 8, 65536, 48) == 6  # sm_86 / sm_89: 1536 threads
    assert resident_programs(255, 8, 65536, 64) == 1


def test_programs_per_sm_asks_the_compiled_kernel_once(monkeypatch):
    """The CUDA branch's plumbing, with the GPU parts stood in for (the device's properties,
    the compiled kernel's registers): the answer follows the occupancy rules, is cached per key,
    and a Triton that cannot report registers gets the default with a warning instead of a
    failed call; off CUDA nothing is built. tests/kernels/test_cuda.py checks it on a GPU."""
    import contextlib
    import types

    from kvpo_kernels.triton import _common

    compiled = types.SimpleNamespace(n_regs=40, _init_handles=lambda: None)
    warmups = []

    def warmup(*args, grid, **meta):
        warmups.append((args, grid, meta))
        return compiled

    jit = type("Jit", (), {"warmup": staticmethod(warmup), "__name__": "_fwd_kernel"})()
    monkeypatch.setattr(_common, "interpreted", lambda: False)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    props = types.SimpleNamespace(
        regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048
    )
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setattr(_common, "_RESIDENT", {})
    gpu = torch.device("cuda", 0)

    def launch(block=256, n=32, grid=(7, 1)):
        return _common.Launch(jit, grid, (torch.zeros(4), n), {"BLOCK": block, "num_warps": 8})

    assert _common.programs_per_sm(launch(), torch.device("cpu"), 8) == 8
    assert warmups == []  # off CUDA: the default, nothing built
    assert _common.programs_per_sm(launch(), gpu, 8) == 6  # 40 registers x 8 warps
    assert _common.programs_per_sm(launch(grid=(7, 3)), gpu, 8) == 6  # the grid is not the key
    assert len(warmups) == 1 and warmups[0][1] == (7, 1) and warmups[0][2]["num_warps"] == 8
    compiled.n_regs = 31
    assert _common.programs_per_sm(launch(n=33), gpu, 8) == 8  # n % 16 != 0: another binary
    assert _common.programs_per_sm(launch(block=512), gpu, 8) == 8  # another constexpr
    assert len(warmups) == 3
    del compiled._init_handles  # a Triton whose compiled kernels lack it
    with pytest.warns(UserWarning, match="did not report _fwd_kernel's registers"):
        assert _common.programs_per_sm(launch(block=1024), gpu, 5) == 5


def test_velocity_energy_asks_registers_per_specialization(monkeypatch):
    """A row length Triton compiles apart (not a multiple of 16: no 16-byte loads, more
    registers) gets its own occupancy answer, not the one cached for another length: on an
    H200 an odd length asked first held later aligned launches to half the programs per SM."""
    from kvpo_kernels.triton import _common
    from kvpo_kernels.triton import velocity_energy as ve

    keys = []

    def programs_per_sm(launch, device, default):  # what the cache is keyed on, per launch
        keys.append(_common.specialization(launch.args))
        return 4 if keys[-1][5][1] else 8  # the stand-in: aligned N fits 4, odd N 8

    monkeypatch.setattr(ve, "programs_per_sm", programs_per_sm)
    gen = torch.Generator().manual_seed(3)
    grids = {}
    for n in (4096, 4097, 8192):
        a, b = (torch.randn(2, 3, n, generator=gen) for _ in range(2))
        grids[n] = ve.fwd_launch(a, b, None, True, torch.zeros(2)).grid
    assert keys[0] != keys[1] and keys[0] == keys[2]
    assert grids[4097][1] > grids[4096][1]  # 8 programs per SM: more splits of the row
    spec = _common.specialization
    assert spec((torch.zeros(4), 1, 32, 33, 2**31, 0.5)) == (
        (torch.float32, True),
        (True, False, True),
        (False, True, True),
        (False, False, True),
        (False, True, False),
        float,
    )
    assert spec((torch.zeros(5)[1:],))[0] == (torch.float32, False)  # 4 bytes past alignment


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("shape", [(2, 3, 0), (0, 3, 5), (2, 0, 5)], ids=str)
def test_velocity_energy_empty_dimensions_agree_with_torch(reduction, shape):
    v_pred, v_ref = torch.randn(shape, requires_grad=True), torch.randn(shape)
    got = kvpo_kernels.velocity_energy(v_pred, v_ref, None, reduction, backend="triton")
    want = kvpo_kernels.velocity_energy_reference(v_pred.detach(), v_ref, None, reduction)
    torch.testing.assert_close(got, want, equal_nan=True)
    got.sum().backward()
    assert v_pred.grad.shape == shape


def test_float64_is_refused_not_downgraded():
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        kvpo_kernels.velocity_energy(x, x, backend="triton")


def test_opcheck_both_ops():
    from kvpo_kernels.routed_attention import _routed_attention_op
    from kvpo_kernels.velocity_energy import _velocity_energy_op

    case = RoutedCase(3, 4, 2, 5, 16, 5, 3, 4, partial=True)
    q, k, v, table, lens = make_routed(case, torch.float32)
    for t in (q, k, v):
        t.requires_grad_()
    torch.library.opcheck(
        _routed_attention_op, (q, k, v, table, lens, 0.25, "triton", "triton", True)
    )
    a = torch.randn(3, 2, 7, requires_grad=True)
    b = torch.randn(3, 2, 7, requires_grad=True)
    torch.library.opcheck(_velocity_energy_op, (a, b, torch.rand(3, 2), True, "triton", "triton"))
    torch.library.opcheck(
        _velocity_energy_op, (a, b, torch.rand(2).expand(3, 2), False, "triton", "triton")
    )
    torch.library.opcheck(_velocity_energy_op, (a, b, None, True, "triton", "triton"))
    # heads-second / step-major views: the fake kernels' strides must be the real ones'
    q, k, v = (permuted_copy(t.detach()).requires_grad_() for t in (q, k, v))
    torch.library.opcheck(
        _routed_attention_op, (q, k, v, table, lens, 0.25, "triton", "triton", True)
    )
    a, b = (permuted_copy(t.detach(), 0, 1).requires_grad_() for t in (a, b))
    torch.library.opcheck(_velocity_energy_op, (a, b, torch.rand(3, 2), True, "triton", "triton"))


def test_an_unusable_interpreter_stops_with_its_reason(monkeypatch):
    from kvpo_kernels.triton import _common

    reason = "Triton 0.0's interpreter cannot run a loop over a scalar argument"
    monkeypatch.setattr(_common, "interpreter_problem", lambda: reason)
    a, b = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    with pytest.raises(RuntimeError, match="cannot run a loop"):
        kvpo_kernels.velocity_energy(a, b, backend="triton")
    q, k, v, table, lens = make_routed(CASES[0], torch.float32)
    with pytest.raises(RuntimeError, match="cannot run a loop"):
        kvpo_kernels.routed_attention(q, k, v, table, lens, backend="triton")


def _tma_fn(q, k, v, table, lens, deterministic=True):
    return kvpo_kernels.routed_attention(
        q, k, v, table, lens, backend="triton_tma", deterministic=deterministic
    )


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("case", [c for c in CASES if c.D % 8 == 0], ids=str)
def test_tma_kernels_fp16_within_twice_torch_error(case, deterministic):
    """backend='triton_tma': the flat block-list forward and dq, the flat-loop dk/dv (with dq by
    atomics when not deterministic), descriptor loads; fp16 against the float64 reference."""
    q, k, v, table, lens = make_routed(case, torch.float64, seed=13)
    dout = torch.randn_like(q)
    dlse = torch.randn(q.shape[:3], dtype=torch.float64)
    ref = routed_grads(reference_fn, q, k, v, table, lens, dout, dlse)
    low = [t.half() for t in (q, k, v)]
    pt = routed_grads(reference_fn, *low, table, lens, dout.half(), dlse)
    fn = lambda *a: _tma_fn(*a, deterministic=deterministic)  # noqa: E731
    got = routed_grads(fn, *low, table, lens, dout.half(), dlse.half())
    if case.empty_row:
        assert torch.isneginf(got[1][-1]).all() and not got[0][-1].any()
    for name, a, b, c in zip(("out", "lse", "dq", "dk", "dv"), got, pt, ref, strict=True):
        assert_low_precision(a, b, c, f"triton_tma fp16 {name}")


@pytest.mark.parametrize("deterministic", [True, False])
def test_tma_kernels_ignore_what_lies_past_a_page_length(deterministic):
    """A partly filled page's tail (NaN here) reaches no output and no gradient; its keys' dk and
    dv are 0."""
    case = RoutedCase(3, 4, 2, 9, 32, 5, 24, 4, partial=True)
    q, k, v, table, lens = make_routed(case, torch.float16, seed=14)
    for p, n in enumerate(lens.tolist()):
        k[p, :, n:] = float("nan")
        v[p, :, n:] = float("nan")
    dout = torch.randn(q.shape, dtype=torch.float64)
    dlse = torch.randn(q.shape[:3], dtype=torch.float64)
    fn = lambda *a: _tma_fn(*a, deterministic=deterministic)  # noqa: E731
    got = routed_grads(fn, q, k, v, table, lens, dout.half(), dlse.half())
    clean = [t.double().nan_to_num() for t in (q, k, v)]
    ref = routed_grads(reference_fn, *clean, table, lens, dout, dlse)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, ref, strict=True):
        assert_rel(a.double(), b, 2e-2, name)


def test_tma_key_blocks_lists_each_rows_kept_blocks_in_order():
    from kvpo_kernels.triton.routed_attention_tma import key_blocks

    table = torch.tensor([[2, -1, 0], [-1, -1, -1], [1, 1, 2]], dtype=torch.int32)
    lens = torch.tensor([5, 0, 16], dtype=torch.int32)  # page 1 is empty
    blocks, counts = key_blocks(table, lens, page_size=16, bn=8)
    assert counts.tolist() == [3, 0, 2]
    assert blocks.tolist() == [[4, 5, 0], [-1, -1, -1], [4, 5, -1]]
    blocks, counts = key_blocks(table, None, page_size=16, bn=16)
    assert counts.tolist() == [2, 0, 3] and blocks[2].tolist() == [1, 1, 2]


def test_tma_backend_refuses_what_it_cannot_take():
    case = RoutedCase(2, 2, 2, 4, 12, 3, 4, 2)
    q, k, v, table, _ = make_routed(case, torch.float32)
    with pytest.raises(TypeError, match="triton_tma.*float16 or bfloat16"):
        _tma_fn(q, k, v, table, None)
    with pytest.raises(TypeError, match="triton_tma.*multiple of 8 .*up to 128, got 12"):
        _tma_fn(q.half(), k.half(), v.half(), table, None)
    x = torch.randn(2, 3, 12, dtype=torch.float16)
    with pytest.raises(ValueError, match="triton_tma.*routed_attention.*only"):
        kvpo_kernels.velocity_energy(x, x, backend="triton_tma")
