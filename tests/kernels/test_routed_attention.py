"""routed_attention against the float64 reference, SDPA, gradcheck and opcheck (CPU backends)."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    CASES,
    RoutedCase,
    assert_low_precision,
    assert_lse_grads,
    assert_rel,
    assert_strided_routed_attention,
    kernel_fn,
    make_routed,
    permuted_copy,
    reference_fn,
    routed_grads,
)

import kvpo_kernels
from kvpo_kernels.routed_attention import _routed_attention_op

BACKENDS = ["cpu", "reference"]


def check_against_reference(backend: str, case: RoutedCase, dtype: torch.dtype) -> None:
    """out, lse and the gradients of q, k, v in dtype against float64: fp32 within 1e-5 of it,
    16-bit within twice the error of the reference computed in that dtype."""
    q, k, v, table, lens = make_routed(case, torch.float64)
    dout = torch.randn_like(q)
    # 16-bit: the loss is <out, dout> alone (the gradient through lse is checked in fp32)
    dlse = torch.randn(q.shape[:3], dtype=torch.float64)
    if dtype != torch.float32:
        dlse.zero_()
    ref = routed_grads(reference_fn, q, k, v, table, lens, dout, dlse)
    low = [t.to(dtype) for t in (q, k, v, dout)]
    got = routed_grads(kernel_fn(backend), *low[:3], table, lens, low[3], dlse.to(torch.float32))
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    names = ("out", "lse", "dq", "dk", "dv")
    if dtype == torch.float32:
        for name, a, b in zip(names, got, ref, strict=True):
            assert_rel(a, b, 1e-5, f"{backend} {name}")
        return
    pt = routed_grads(reference_fn, *low[:3], table, lens, low[3], dlse)
    for name, a, b, c in zip(names, got, pt, ref, strict=True):
        assert_low_precision(a, b, c, f"{backend} {dtype} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_fp32_matches_float64_reference(backend, case):
    check_against_reference(backend, case, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES[:4], ids=str)
def test_half_precision_within_twice_torch_error(backend, dtype, case):
    check_against_reference(backend, case, dtype)


# Shapes past the C++ kernels' blocking: query tiles (a GQA group's heads x a tile's queries are
# stacked up to 256 GEMM rows; the backward adds each tile's dk/dv partials to the row's), several
# staged key blocks per row (pages of 300 tokens), a group wider than a stack.
LARGE_CASES = [
    RoutedCase(3, 4, 2, 150, 32, 6, 20, 5, partial=True),
    RoutedCase(2, 2, 1, 40, 16, 5, 300, 4, partial=True, empty_row=True),
    RoutedCase(2, 260, 1, 3, 8, 3, 4, 3),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", LARGE_CASES, ids=str)
def test_cpu_kernel_past_its_blocking(case, dtype):
    check_against_reference("cpu", case, dtype)


@pytest.mark.parametrize(
    "case",
    [
        RoutedCase(6, 4, 2, 72, 32, 12, 36, 8, partial=True),  # the built-in generator's calls
        RoutedCase(5, 20, 1, 1, 16, 9, 5, 8),  # MQA decoding: 20 heads in 3 stacks of <= 8
    ],
    ids=str,
)
def test_cpu_kernel_row_does_not_depend_on_its_batch(case):
    """A row's output, lse and dq are the same bits computed alone, or beside other rows: the C++
    kernel splits its work by the head counts and Lq, never by the batch (the trainer's anchor
    branch, one row of a group, must repeat the deployment sample)."""
    q, k, v, table, lens = make_routed(case, torch.float32)
    dout = torch.randn_like(q)
    batch = routed_grads(kernel_fn("cpu"), q, k, v, table, lens, dout, torch.zeros(q.shape[:3]))
    for rows in (slice(0, 1), slice(2, 4)):
        alone = routed_grads(
            kernel_fn("cpu"),
            q[rows],
            k,
            v,
            table[rows],
            lens,
            dout[rows],
            torch.zeros(q[rows].shape[:3]),
        )
        for name, a, b in zip(("out", "lse", "dq"), alone, batch, strict=False):
            assert torch.equal(a, b[rows]), f"{name} of rows {rows}"


# 12 rows over 2 KV heads: with the workspace at 0 MiB the backward runs them in chunks of as few
# rows as keep the threads busy, so the pages' sums cross chunk boundaries.
CHUNKED = RoutedCase(12, 4, 2, 9, 32, 10, 24, 8, partial=True, empty_row=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cpu_backward_in_workspace_chunks(monkeypatch, dtype):
    monkeypatch.setenv("KVPO_CPU_WORKSPACE_MB", "0")
    check_against_reference("cpu", CHUNKED, dtype)


def test_cpu_backward_bits_do_not_depend_on_the_workspace_or_threads(monkeypatch):
    """dk and dv sum each page's rows in row order whatever the chunking and the thread count
    (which sets how many rows a chunk needs at least): the same bits."""
    q, k, v, table, lens = make_routed(CHUNKED, torch.float32)
    dout, dlse = torch.randn_like(q), torch.randn(q.shape[:3])
    grads = []
    threads = torch.get_num_threads()
    try:
        for mb, n in (("0", 1), ("0", 2), ("1", 2), ("1024", 2)):
            monkeypatch.setenv("KVPO_CPU_WORKSPACE_MB", mb)
            torch.set_num_threads(n)
            grads.append(routed_grads(kernel_fn("cpu"), q, k, v, table, lens, dout, dlse))
    finally:
        torch.set_num_threads(threads)
    for other in grads[1:]:
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), grads[0], other, strict=True):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("value", ["-1", "lots", "1.5"])
def test_cpu_workspace_setting_must_be_a_size(monkeypatch, value):
    q, k, v, table, lens = make_routed(CASES[1], torch.float32)
    monkeypatch.setenv("KVPO_CPU_WORKSPACE_MB", value)
    with pytest.raises(RuntimeError, match="KVPO_CPU_WORKSPACE_MB"):
        routed_grads(
            kernel_fn("cpu"), q, k, v, table, lens, torch.randn_like(q), torch.zeros(q.shape[:3])
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=str)
def test_strided_inputs_and_an_expanded_gradient(backend, case):
    assert_strided_routed_attention(backend, case, seed=5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=str)
def test_gradient_of_lse_alone(backend, case):
    assert_lse_grads(kernel_fn(backend), case, torch.float32, 1e-5, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rows_give_zero_and_minus_inf_without_nan(backend):
    case = RoutedCase(3, 4, 2, 5, 16, 4, 3, 4, empty_row=True)
    q, k, v, table, lens = make_routed(case, torch.float32)
    table[1] = -1
    q.requires_grad_()
    out, lse = kvpo_kernels.routed_attention(q, k, v, table, lens, backend=backend)
    assert torch.equal(out[1:], torch.zeros_like(out[1:]))
    assert torch.isneginf(lse[1:]).all() and torch.isfinite(lse[0]).all()
    (out.sum() + lse[0].sum()).backward()
    assert torch.isfinite(q.grad).all() and q.grad[1:].abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_table_equals_sdpa_on_concatenated_cache(backend):
    B, H, Hkv, Lq, D, P, ps = 3, 8, 2, 11, 32, 5, 6
    q = torch.randn(B, H, Lq, D, dtype=torch.float64)
    k = torch.randn(P, Hkv, ps, D, dtype=torch.float64)
    v = torch.randn(P, Hkv, ps, D, dtype=torch.float64)
    table = torch.arange(P, dtype=torch.int32).repeat(B, 1)
    out, _ = kvpo_kernels.routed_attention(q, k, v, table, backend=backend)
    kc = k.permute(1, 0, 2, 3).reshape(1, Hkv, P * ps, D).expand(B, -1, -1, -1)
    vc = v.permute(1, 0, 2, 3).reshape(1, Hkv, P * ps, D).expand(B, -1, -1, -1)
    expected = F.scaled_dot_product_attention(q, kc, vc, enable_gqa=True)
    assert_rel(out, expected, 1e-10, "full table vs SDPA")


@pytest.mark.parametrize("backend", BACKENDS)
def test_routed_table_equals_sdpa_on_gathered_kept_pages(backend):
    B, H, Hkv, Lq, D, P, ps = 4, 4, 4, 6, 16, 7, 4
    q = torch.randn(B, H, Lq, D, dtype=torch.float64)
    k = torch.randn(P, Hkv, ps, D, dtype=torch.float64)
    v = torch.randn(P, Hkv, ps, D, dtype=torch.float64)
    table = torch.arange(P, dtype=torch.int32).repeat(B, 1)
    gen = torch.Generator().manual_seed(3)
    table[torch.rand(B, P, generator=gen) < 0.5] = -1
    table[:, 0] = 0
    out, _ = kvpo_kernels.routed_attention(q, k, v, table, backend=backend)
    for b in range(B):
        kept = table[b][table[b] >= 0].long()
        kb = k[kept].permute(1, 0, 2, 3).reshape(1, Hkv, -1, D)
        vb = v[kept].permute(1, 0, 2, 3).reshape(1, Hkv, -1, D)
        expected = F.scaled_dot_product_attention(q[b : b + 1], kb, vb)
        assert_rel(out[b : b + 1], expected, 1e-10, f"row {b}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64_with_shared_page(backend):
    q = torch.randn(2, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 1, 3, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 1, 3, 4, dtype=torch.float64, requires_grad=True)
    table = torch.tensor([[0, 2], [0, -1]], dtype=torch.int32)  # page 0 shared by both rows
    lens = torch.tensor([3, 1, 2], dtype=torch.int32)

    def fn(q, k, v):
        return kvpo_kernels.routed_attention(q, k, v, table, lens, scale=0.7, backend=backend)

    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_lens", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "permuted"])
def test_opcheck(backend, with_lens, layout):
    """opcheck compares the fake kernel's output strides with the real ones: heads-second views of
    [B, Lq, H, D] / [P, page_size, Hkv, D] data too, which torch.compile would otherwise reject."""
    case = RoutedCase(3, 4, 2, 5, 8, 5, 3, 4, partial=with_lens)
    q, k, v, table, lens = make_routed(case, torch.float32)
    if layout == "permuted":
        q, k, v = (permuted_copy(t) for t in (q, k, v))
    for t in (q, k, v):
        t.requires_grad_()
    torch.library.opcheck(
        _routed_attention_op, (q, k, v, table, lens, 0.35, backend, backend, True)
    )


def test_compile_fullgraph_matches_eager():
    case = RoutedCase(2, 4, 2, 5, 8, 5, 3, 4, partial=True)
    q, k, v, table, lens = make_routed(case, torch.float32)

    def fn(q, k, v):
        out, lse = kvpo_kernels.routed_attention(q, k, v, table, lens)
        return out.square().sum() + lse.sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    q1 = q.clone().requires_grad_()
    q2 = q.clone().requires_grad_()
    eager, comp = fn(q1, k, v), compiled(q2, k, v)
    eager.backward()
    comp.backward()
    torch.testing.assert_close(comp, eager)
    torch.testing.assert_close(q2.grad, q1.grad)


def test_compile_with_dynamic_shapes_compiles_once():
    """One graph serves every batch, query length, cache size and table width: the fake kernel
    derives its shapes symbolically (nothing specializes on a size)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    def fn(q, k, v, table, lens):
        out, lse = kvpo_kernels.routed_attention(q, k, v, table, lens)
        return out.square().sum() + lse.exp().sum()

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=counter)
    # sizes chosen so no two dimensions coincide (duck sizing would tie them)
    for B, Lq, P, N in ((2, 5, 9, 7), (10, 11, 13, 12), (14, 15, 17, 16)):
        case = RoutedCase(B, 6, 3, Lq, 8, P, 4, N, partial=True)
        q, k, v, table, lens = make_routed(case, torch.float32)
        grads = []
        for f in (fn, compiled):
            qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
            loss = f(qg, kg, v, table, lens)
            loss.backward()
            grads.append((loss, qg.grad, kg.grad))
        for want, got in zip(*grads, strict=True):
            torch.testing.assert_close(got, want)
    assert counter.frame_count == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_of_two_halves_equals_whole(backend):
    B, H, Lq, D, P, ps = 3, 4, 5, 16, 8, 4
    q = torch.randn(B, H, Lq, D, dtype=torch.float64)
    k = torch.randn(P, 2, ps, D, dtype=torch.float64)
    v = torch.randn(P, 2, ps, D, dtype=torch.float64)
    table = torch.arange(P, dtype=torch.int32).repeat(B, 1)
    table[2, 4:] = -1  # row 2: the second half is empty, so its merge meets lse = -inf
    whole = kvpo_kernels.routed_attention(q, k, v, table, backend=backend)
    a = kvpo_kernels.routed_attention(q, k, v, table[:, :4].contiguous(), backend=backend)
    b = kvpo_kernels.routed_attention(q, k, v, table[:, 4:].contiguous(), backend=backend)
    out, lse = kvpo_kernels.merge_attention(*a, *b)
    assert_rel(out, whole[0], 1e-12, "merged out")
    assert_rel(lse, whole[1], 1e-12, "merged lse")


def test_merge_of_two_empty_sides_is_empty_and_differentiable():
    out_a = torch.randn(2, 3, 4, requires_grad=True)
    lse = torch.full((2, 3), float("-inf"))
    out, merged = kvpo_kernels.merge_attention(out_a, lse, torch.randn(2, 3, 4), lse)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(merged).all()
    out.sum().backward()
    assert torch.isfinite(out_a.grad).all()


def test_the_routed_branches_example_runs_and_matches_sdpa(capsys):
    """examples/routed_branches.py, as the README shows it: every branch equals SDPA over the
    frames it kept, and the TVE objective has a gradient."""
    path = Path(__file__).resolve().parents[2] / "examples" / "routed_branches.py"
    spec = importlib.util.spec_from_file_location("routed_branches", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    res = example.main([])
    assert res["max_abs_error"] < 1e-5 and 0 < res["grad_norm"] < float("inf")
    out = capsys.readouterr().out
    assert out.count("attends to frames [0, ") == 4 and "TVE" in out


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_double_backward_is_refused_naming_the_op(backend):
    """First-order gradients only: differentiating a gradient raises an error that says so (not
    PyTorch's 'no autograd formula was registered' for the backward op), and the first-order
    gradient a double backward's graph holds is the plain one."""
    q = torch.randn(2, 4, 5, 16, dtype=torch.float64, requires_grad=True)
    k, v = (
        torch.randn(6, 2, 8, 16, dtype=torch.float64),
        torch.randn(6, 2, 8, 16, dtype=torch.float64),
    )
    table = torch.tensor([[0, 1, 2], [3, 4, -1]], dtype=torch.int32)
    out, _ = kvpo_kernels.routed_attention(q, k, v, table, backend=backend)
    (g,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    out, _ = kvpo_kernels.routed_attention(q, k, v, table, backend=backend)
    (plain,) = torch.autograd.grad(out.square().sum(), q)
    assert torch.equal(g.detach(), plain)
    with pytest.raises(NotImplementedError, match="routed_attention has first-order gradients"):
        torch.autograd.grad(g.sum(), q)


def test_deterministic_setting(monkeypatch):
    """The backward's determinism: on by default, off by argument or KVPO_DETERMINISTIC=0, always
    on under torch.use_deterministic_algorithms(True); a bad value is named."""
    from kvpo_kernels._backend import deterministic

    monkeypatch.delenv("KVPO_DETERMINISTIC", raising=False)
    assert deterministic(None) and not deterministic(False)
    monkeypatch.setenv("KVPO_DETERMINISTIC", "0")
    assert not deterministic(None) and deterministic(True)
    prior = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert deterministic(None) and deterministic(False)
    finally:
        torch.use_deterministic_algorithms(prior)
    monkeypatch.setenv("KVPO_DETERMINISTIC", "yes")
    with pytest.raises(ValueError, match="KVPO_DETERMINISTIC"):
        deterministic(None)
    with pytest.raises(TypeError, match="deterministic"):
        deterministic("no")
