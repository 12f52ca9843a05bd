"""Random inputs and error measures shared by the tests."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

import torch

import kvpo_kernels


@dataclass(frozen=True)
class RoutedCase:
    B: int
    H: int
    Hkv: int
    Lq: int
    D: int
    P: int
    page_size: int
    max_pages: int
    partial: bool = False  # some pages partly filled
    empty_row: bool = False  # one row keeps no page at all
    shared: bool = True  # rows list common pages

    def __str__(self) -> str:
        return (
            f"B{self.B}H{self.H}kv{self.Hkv}L{self.Lq}D{self.D}P{self.P}ps{self.page_size}"
            f"n{self.max_pages}{'p' if self.partial else ''}{'e' if self.empty_row else ''}"
        )


CASES = [
    RoutedCase(2, 2, 2, 4, 16, 5, 4, 4),
    RoutedCase(3, 4, 2, 7, 32, 8, 5, 6, partial=True),  # odd page_size, odd Lq, GQA
    RoutedCase(4, 6, 1, 9, 24, 6, 3, 6, empty_row=True),  # MQA, non power of two D
    RoutedCase(2, 4, 4, 17, 64, 7, 7, 5, partial=True, empty_row=True),
    RoutedCase(3, 2, 1, 1, 128, 4, 2, 3),  # a single query (decoding)
]


def make_table(case: RoutedCase, gen: torch.Generator) -> torch.Tensor:
    """Random tables: shared prefix pages, random routed-out slots, optionally one empty row."""
    table = torch.randint(0, case.P, (case.B, case.max_pages), generator=gen, dtype=torch.int32)
    if case.shared:
        table[:, 0] = 0  # every row lists physical page 0
        table[1:, 1] = table[0, 1]
    drop = torch.rand(case.B, case.max_pages, generator=gen) < 0.3
    drop[:, 0] = False
    table[drop] = -1
    if case.empty_row:
        table[-1] = -1
    return table


def make_routed(case: RoutedCase, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(case.B, case.H, case.Lq, case.D, generator=gen, dtype=torch.float64)
    k = torch.randn(case.P, case.Hkv, case.page_size, case.D, generator=gen, dtype=torch.float64)
    v = torch.randn(case.P, case.Hkv, case.page_size, case.D, generator=gen, dtype=torch.float64)
    table = make_table(case, gen)
    lens = None
    if case.partial:
        lens = torch.randint(1, case.page_size + 1, (case.P,), generator=gen, dtype=torch.int32)
        lens[0] = 0 if case.P > 2 else lens[0]  # an empty page listed by every row
    return q.to(dtype), k.to(dtype), v.to(dtype), table, lens


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    both_inf = torch.isinf(a) & torch.isinf(b) & (a == b)
    return (a - b).masked_fill(both_inf, 0).abs().max().item()


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str = "") -> None:
    """max |actual - expected| <= rel * max |expected| (inf entries must match exactly)."""
    assert not torch.isnan(actual).any(), f"{what}: NaN"
    scale = expected.double().masked_fill(torch.isinf(expected), 0).abs().max().item()
    err = max_err(actual, expected)
    assert err <= rel * max(scale, 1e-12), f"{what}: max err {err:.3e} vs scale {scale:.3e}"


def assert_low_precision(kernel, same_dtype_ref, ref64, what: str = "") -> None:
    """flash-attn's rule: the kernel's error is at most twice the same-dtype PyTorch reference's."""
    assert not torch.isnan(kernel).any(), f"{what}: NaN"
    err_k = max_err(kernel, ref64)
    err_pt = max_err(same_dtype_ref, ref64)
    assert err_k <= 2 * err_pt + 1e-6, (
        f"{what}: kernel err {err_k:.3e} > 2 x torch err {err_pt:.3e}"
    )


def routed_grads(fn, q, k, v, table, lens, dout, dlse):
    """Gradients of <out, dout> + <lse, dlse> (finite lse only) with respect to q, k, v."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v, table, lens)
    loss = (out.double() * dout.double()).sum()
    finite = torch.isfinite(lse)
    loss = loss + (lse.double()[finite] * dlse.double()[finite]).sum()
    loss.backward()
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def lse_grads(fn, q, k, v, table, lens, dlse):
    """Gradients of <lse, dlse> (finite lse only) with respect to q, k, v: a loss that never reads
    ``out`` (its gradient reaches the backward as zeros). v's is None (lse does not read v) or 0."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    _, lse = fn(q, k, v, table, lens)
    finite = torch.isfinite(lse)
    (lse.double()[finite] * dlse.double()[finite]).sum().backward()
    return q.grad, k.grad, v.grad


def assert_lse_grads(
    fn, case: RoutedCase, dtype: torch.dtype, rel: float, what: str, device: str = "cpu"
) -> None:
    """:func:`lse_grads` of ``fn`` in ``dtype`` on ``device`` against the float64 reference's."""
    q, k, v, table, lens = make_routed(case, torch.float64, seed=3)
    dlse = torch.randn(q.shape[:3], dtype=torch.float64)
    args = [None if t is None else t.to(device) for t in (q, k, v, table, lens, dlse)]
    dq, dk, dv = lse_grads(fn, *(t.to(dtype) for t in args[:3]), *args[3:])
    ref_dq, ref_dk, ref_dv = lse_grads(reference_fn, q, k, v, table, lens, dlse)
    assert_rel(dq.cpu(), ref_dq, rel, f"{what} dq")
    assert_rel(dk.cpu(), ref_dk, rel, f"{what} dk")
    assert ref_dv is None and (dv is None or not dv.any()), f"{what}: lse does not read v"


def kernel_fn(backend: str):
    return lambda q, k, v, t, lens: kvpo_kernels.routed_attention(q, k, v, t, lens, backend=backend)


def reference_fn(q, k, v, t, lens):
    return kvpo_kernels.routed_attention_reference(q, k, v, t, lens)


def strided_copy(t: torch.Tensor) -> torch.Tensor:
    """t's values in a layout no kernel may assume away: dims in reverse order in memory and every
    other element of the last dim (a head split off a fused projection, a sliced table)."""
    shape = (*t.shape[:-1], 2 * t.shape[-1])
    buf = torch.zeros(shape[::-1], dtype=t.dtype).permute(*reversed(range(t.dim())))
    view = buf[..., ::2]
    view.copy_(t)
    assert not view.is_contiguous() and torch.equal(view, t)
    return view


def permuted_copy(t: torch.Tensor, dim0: int = 1, dim1: int = 2) -> torch.Tensor:
    """t's values, dense in memory with dims dim0 and dim1 swapped: q as [B, Lq, H, D] viewed as
    [B, H, Lq, D], the layout attention inputs usually come in."""
    return t.transpose(dim0, dim1).contiguous().transpose(dim0, dim1)


def routed_sum_grads(fn, q, k, v, table, lens):
    """out, lse and the gradients of out.sum() + the finite lse's sum with respect to q, k, v,
    keeping the inputs' strides: the gradient reaching the op for out is a stride-0 expansion."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v, table, lens)
    (out.double().sum() + lse.double()[torch.isfinite(lse)].sum()).backward()
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def assert_strided_routed_attention(backend: str, case: RoutedCase, seed: int) -> None:
    """Strided q, k, v, table and page_lens, and an expanded gradient, against float64 contiguous."""
    q, k, v, table, lens = make_routed(case, torch.float64, seed=seed)
    ref = routed_sum_grads(reference_fn, q, k, v, table, lens)
    args = [strided_copy(t.float()) for t in (q, k, v)] + [strided_copy(table)]
    lens = None if lens is None else strided_copy(lens)
    got = routed_sum_grads(kernel_fn(backend), *args, lens)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, ref, strict=True):
        assert_rel(a, b, 1e-5, f"{backend} strided {name}")


def assert_strided_velocity_energy(backend: str) -> None:
    """Strided v_pred and v_ref (and a transposed [G, S] weight) against float64 contiguous,
    forward and the gradients of the energies' sum (a stride-0 gradient at the op)."""
    gen = torch.Generator().manual_seed(6)
    a = torch.randn(3, 4, 5, 7, generator=gen, dtype=torch.float64)
    b = a + torch.randn(3, 4, 5, 7, generator=gen, dtype=torch.float64)
    w = torch.rand(4, 3, generator=gen, dtype=torch.float64).t()

    def run(fn, a, b):
        a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
        e = fn(a, b, w, "mean")
        e.sum().backward()
        return e.detach(), a.grad, b.grad

    ref = run(kvpo_kernels.velocity_energy_reference, a, b)

    def kernel(a, b, w, r):
        return kvpo_kernels.velocity_energy(a, b, w, r, backend=backend)

    got = run(kernel, strided_copy(a.float()), strided_copy(b.float()))
    for name, x, y in zip(("energy", "d_pred", "d_ref"), got, ref, strict=True):
        assert_rel(x, y, 1e-5, f"{backend} strided {name}")


def run_ok(cmd, **kw) -> subprocess.CompletedProcess:
    """``cmd`` run to completion, its output captured; a failure shows the command and the
    ends of its output."""
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert res.returncode == 0, (
        f"{' '.join(map(str, cmd))}\n{res.stdout[-6000:]}\n{res.stderr[-6000:]}"
    )
    return res


def torch_cmake_args() -> list[str]:
    """CMake's arguments to find this torch; a CUDA build's CMake config also wants the CUDA
    toolkit, which CMake misses where nvcc on the PATH is not inside it: the one torch's
    extensions build with (``CUDA_HOME``) is named."""
    args = [f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    if torch.version.cuda is not None:
        from torch.utils.cpp_extension import CUDA_HOME

        if CUDA_HOME:
            args.append(f"-DCUDA_TOOLKIT_ROOT_DIR={CUDA_HOME}")
    return args
