"""Triton velocity energy: one launch for all G energies, one launch for the backward.

The grid is (G * S rows, splits of N): a program streams a slice of one (branch, step) row of
v_pred and v_ref, reduces (a - b)^2 in fp32, and adds weight[g, s] * its partial sum to
``energy[g]`` with one atomic add. A row's weight is one scalar, so the loop is loads and FMAs
only (no per-element step index or weight gather). No ``v_pred - v_ref`` temporary is written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import Launch, interpreted, num_sms


@triton.jit
def _fwd_kernel(
    A, Bp, W, E, S, N, chunk, inv_n,
    BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)  # g * S + s
    sp = tl.program_id(1)
    base = row.to(tl.int64) * N
    lo = sp * chunk
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(lo, lo + chunk, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        mask = idx < N
        a = tl.load(A + base + idx, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(Bp + base + idx, mask=mask, other=0.0).to(tl.float32)
        d = a - b
        acc += d * d
    w = tl.load(W + row)
    tl.atomic_add(E + row // S, tl.sum(acc, 0) * (w * inv_n))


@triton.jit
def _bwd_kernel(
    GRAD, A, Bp, W, DA, DB, S, N, chunk, coef_n,
    NEED_REF: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    sp = tl.program_id(1)
    base = row.to(tl.int64) * N
    lo = sp * chunk
    c = tl.load(GRAD + row // S) * tl.load(W + row) * coef_n
    for off in range(lo, lo + chunk, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        mask = idx < N
        a = tl.load(A + base + idx, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(Bp + base + idx, mask=mask, other=0.0).to(tl.float32)
        d = c * (a - b)
        tl.store(DA + base + idx, d.to(DA.dtype.element_ty), mask=mask)
        if NEED_REF:
            tl.store(DB + base + idx, (-d).to(DB.dtype.element_ty), mask=mask)


def _split(rows: int, n: int, device: torch.device, block: int) -> tuple[int, int]:
    """(splits, chunk) of each row's n elements: about 8 programs per SM over all rows (a full
    SM of 8-warp programs), chunk a multiple of block."""
    want = max(1, (8 * num_sms(device) + rows - 1) // rows)
    splits = max(1, min(want, triton.cdiv(n, block)))
    chunk = triton.cdiv(triton.cdiv(n, splits), block) * block
    return triton.cdiv(n, chunk), chunk


def _block() -> int:
    # 4096 elements over 8 warps: each thread has two 16-byte loads of each operand in flight
    # (16-bit data) per iteration.
    return 256 if interpreted() else 4096


def _layout(v_pred: torch.Tensor) -> tuple[int, int, int, tuple[int, int], int]:
    """(S, N, block, grid, chunk) of a launch over v_pred [G, S, N]: forward and backward split
    the same way."""
    G, S, N = v_pred.shape
    block = _block()
    splits, chunk = _split(G * S, N, v_pred.device, block)
    return S, N, block, (G * S, splits), chunk


def fwd_launch(v_pred, v_ref, weight, mean, energy) -> Launch:
    """The forward launch; arguments as :func:`velocity_energy_fwd`, weight float32 contiguous,
    energy [G] float32 zeros."""
    S, N, block, grid, chunk = _layout(v_pred)
    args = (v_pred, v_ref, weight, energy, S, N, chunk, 1.0 / N if mean else 1.0)
    return Launch(_fwd_kernel, grid, args, dict(BLOCK=block, num_warps=8))


def bwd_launch(grad, v_pred, v_ref, weight, mean, need_ref, d_pred, d_ref) -> Launch:
    """The backward launch; grad and weight float32 contiguous, gradients given."""
    S, N, block, grid, chunk = _layout(v_pred)
    args = (
        grad, v_pred, v_ref, weight, d_pred, d_ref if need_ref else d_pred, S, N, chunk,
        2.0 / N if mean else 2.0,
    )  # fmt: skip
    return Launch(_bwd_kernel, grid, args, dict(NEED_REF=need_ref, BLOCK=block, num_warps=8))


def velocity_energy_fwd(
    v_pred: torch.Tensor, v_ref: torch.Tensor, weight: torch.Tensor, mean: bool
) -> torch.Tensor:
    """v_pred, v_ref: [G, S, N] contiguous; weight: [G, S] float32. Returns energy [G] float32."""
    energy = torch.zeros(v_pred.shape[0], device=v_pred.device, dtype=torch.float32)
    if v_pred.numel() > 0:
        fwd_launch(v_pred, v_ref, weight.float().contiguous(), mean, energy)()
    return energy


def velocity_energy_bwd(
    grad: torch.Tensor,
    v_pred: torch.Tensor,
    v_ref: torch.Tensor,
    weight: torch.Tensor,
    mean: bool,
    need_ref: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad: [G]. Returns d v_pred [G, S, N] and d v_ref (empty unless need_ref)."""
    d_pred = torch.empty_like(v_pred)
    d_ref = torch.empty_like(v_ref) if need_ref else v_ref.new_empty(0)
    if v_pred.numel() > 0:
        launch = bwd_launch(
            grad.float().contiguous(), v_pred, v_ref, weight.float().contiguous(), mean,
            need_ref, d_pred, d_ref,
        )  # fmt: skip
        launch()
    return d_pred, d_ref
