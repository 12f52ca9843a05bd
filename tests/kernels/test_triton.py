"""The Triton kernels under the interpreter (CPU tensors), against the float64 reference.

Runs when triton is installed; ``TRITON_INTERPRET=1`` is set by tests/conftest.py before triton is
imported. fp32 and fp16 only: the interpreter mishandles bf16.
"""

import pytest
import torch
from helpers import (
    CASES,
    RoutedCase,
    assert_low_precision,
    assert_rel,
    kernel_fn,
    make_routed,
    reference_fn,
    routed_grads,
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


def test_page_rows_index():
    from kvpo_kernels.triton.routed_attention import page_rows_csr

    table = torch.tensor([[0, 2, -1], [2, 2, 1], [-1, -1, -1]], dtype=torch.int32)
    row_ptr, rows = page_rows_csr(table, 4)
    assert row_ptr.tolist() == [0, 1, 2, 5, 5]
    assert rows.tolist() == [0, 1, 0, 1, 1]


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 4, 333), (8, 2, 5, 7, 11)], ids=str)
def test_velocity_energy(reduction, dtype, shape):
    gen = torch.Generator().manual_seed(4)
    v_pred = torch.randn(shape, generator=gen, dtype=torch.float64)
    v_ref = v_pred + torch.randn(shape, generator=gen, dtype=torch.float64)
    weight = torch.rand(shape[:2], generator=gen, dtype=torch.float64)
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
        pt = run(kvpo_kernels.velocity_energy_reference, *low, weight.to(dtype))
        for name, a, b, c in zip(("energy", "d_pred", "d_ref"), got, pt, ref, strict=True):
            assert_low_precision(a, b, c, name)


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
    torch.library.opcheck(_routed_attention_op, (q, k, v, table, lens, 0.25, "triton"))
    a = torch.randn(3, 2, 7, requires_grad=True)
    b = torch.randn(3, 2, 7, requires_grad=True)
    torch.library.opcheck(_velocity_energy_op, (a, b, torch.rand(3, 2), True, "triton"))


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
