"""Triton velocity energy: one launch for all G energies, one launch for the backward.

The grid is (G * S rows, splits of N): a program streams a slice of one (branch, step) row of
v_pred and v_ref, reduces (a - b)^2 in fp32, and adds weight[g, s] * its partial sum to
``energy[g]`` with one atomic add. A row's weight is one scalar, so the loop is loads and FMAs
only (no per-element step index or weight gather). No ``v_pred - v_ref`` temporary is written.

The weight is read through its strides (a [S] weight broadcast to [G, S] has stride 0 over G) or
not at all (None: ones), so a call launches no kernel to materialise it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from ._common import Launch, interpreted, num_sms, programs_per_sm


@triton.jit
def _row_weight(W, row, S, w_sg, w_ss, HAS_W: tl.constexpr):
    """weight[g, s] of row g * S + s (1 without a weight)."""
    if HAS_W:
        g = row // S
        return tl.load(W + g * w_sg + (row - g * S) * w_ss)
    else:
        return 1.0


@triton.jit
def _fwd_kernel(
    A, Bp, W, E, S, N, chunk, inv_n, w_sg, w_ss,
    HAS_W: tl.constexpr, PARTIALS: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr,
    EVICT: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)  # g * S + s
    sp = tl.program_id(1)
    base = row.to(tl.int64) * N
    lo = sp * chunk
    # Each thread folds the VEC contiguous elements of each of its 16-byte loads as it goes: an
    # accumulator of BLOCK / VEC rather than BLOCK values keeps the 16-bit kernel at <= 32
    # registers, so 8 programs of 8 warps fill an SM (40 registers and 6 programs with [BLOCK]).
    acc = tl.zeros([BLOCK // VEC], dtype=tl.float32)
    for off in range(lo, lo + chunk, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        mask = idx < N
        a = tl.load(A + base + idx, mask=mask, other=0.0, eviction_policy=EVICT).to(tl.float32)
        b = tl.load(Bp + base + idx, mask=mask, other=0.0, eviction_policy=EVICT).to(tl.float32)
        d = a - b
        acc += tl.sum(tl.reshape(d * d, (BLOCK // VEC, VEC)), 1)
    part = tl.sum(acc, 0) * (_row_weight(W, row, S, w_sg, w_ss, HAS_W) * inv_n)
    if PARTIALS:  # E: [G * S * splits], summed per branch by the caller in a fixed order
        tl.store(E + row * tl.num_programs(1) + sp, part)
    else:
        # Relaxed: the sum needs no ordering against other memory (no fence before the atomic).
        tl.atomic_add(E + row // S, part, sem="relaxed")


@triton.jit
def _bwd_kernel(
    GRAD, A, Bp, W, DA, DB, S, N, chunk, coef_n, w_sg, w_ss,
    HAS_W: tl.constexpr, NEED_REF: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    sp = tl.program_id(1)
    base = row.to(tl.int64) * N
    lo = sp * chunk
    c = tl.load(GRAD + row // S) * _row_weight(W, row, S, w_sg, w_ss, HAS_W) * coef_n
    for off in range(lo, lo + chunk, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        mask = idx < N
        a = tl.load(A + base + idx, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(Bp + base + idx, mask=mask, other=0.0).to(tl.float32)
        d = c * (a - b)
        tl.store(DA + base + idx, d.to(DA.dtype.element_ty), mask=mask)
        if NEED_REF:
            tl.store(DB + base + idx, (-d).to(DB.dtype.element_ty), mask=mask)


# Programs of 8 warps per SM the grid assumes before the compiled kernel has said how many fit
# (off CUDA, under the interpreter): 8 at <= 32 registers (64 warps, 2048 threads per SM).
PROGRAMS_PER_SM = 8


def _split(rows: int, n: int, device: torch.device, block: int, per_sm: int) -> tuple[int, int]:
    """(splits, chunk) of each row's n elements. Every program streams the same amount, so the
    launch is sized to one wave: rows * splits <= per_sm programs per SM (rounding the splits up
    would leave a second wave of a few programs, streaming at a fraction of the bandwidth, for
    the last percent of the data); chunk is a multiple of block."""
    slots = per_sm * num_sms(device)
    splits = max(1, min(slots // rows, triton.cdiv(n, block)))
    chunk = triton.cdiv(triton.cdiv(n, splits), block) * block
    return triton.cdiv(n, chunk), chunk


def _block(element_size: int) -> int:
    # 8 KiB of each operand per iteration over 8 warps: each thread has two 16-byte loads of each
    # in flight (4096 16-bit or 2048 fp32 elements).
    return 256 if interpreted() else 8192 // element_size


def _one_wave(kernel, v_pred: torch.Tensor, args: Callable[[int, int, int], tuple], meta) -> Launch:
    """The launch of kernel over v_pred [G, S, N]'s G * S rows, its splits sized to one wave of
    the programs an SM holds (asked of the compiled kernel once per dtype, constexprs and device).
    args(S, N, chunk) gives the kernel's arguments."""
    G, S, N = v_pred.shape

    def build(per_sm: int) -> Launch:
        splits, chunk = _split(G * S, N, v_pred.device, meta["BLOCK"], per_sm)
        if splits * chunk >= 2**31:  # a program's element indices within its row are int32
            raise ValueError(
                f"velocity_energy's Triton kernels take (branch, step) rows of fewer than 2**31 "
                f"elements, got v_pred {tuple(v_pred.shape)} (N = {N}); backend='cuda' takes them"
            )
        return Launch(kernel, (G * S, splits), args(S, N, chunk), meta)

    # The probe runs the launch's binary: chunk, the one argument that changes with the programs
    # per SM, is a multiple of BLOCK either way, so its specialization does not change.
    probe = build(PROGRAMS_PER_SM)
    per_sm = programs_per_sm(probe, v_pred.device, PROGRAMS_PER_SM)
    return probe if per_sm == PROGRAMS_PER_SM else build(per_sm)


def _weight_args(weight: torch.Tensor | None, dummy: torch.Tensor) -> tuple:
    """(pointer, stride over G, stride over S) of weight [G, S] float32; a never-read pointer
    without a weight."""
    if weight is None:
        return dummy, 0, 0
    return weight, weight.stride(0), weight.stride(1)


def fwd_launch(
    v_pred: torch.Tensor,
    v_ref: torch.Tensor,
    weight: torch.Tensor | None,
    mean: bool,
    energy: torch.Tensor | None,
    *,
    block: int | None = None,
    num_warps: int = 8,
    eviction: str = "",
) -> Launch:
    """The forward launch; arguments as :func:`velocity_energy_fwd`. energy: [G] float32 zeros,
    which the programs add into (float atomics: the order of the adds varies from run to run), or
    None: each program writes its weighted partial sum into a new [G * S * splits] float32 buffer,
    ``launch.args[3]``, for the caller to sum per branch in a fixed order.

    block, num_warps, eviction: the tile (elements of each operand per program per iteration, a
    power of two, default 8 KiB of it), the warps per program and the loads' eviction policy
    ("", "evict_first" or "evict_last"), for benchmarks to compare tilings; the op uses the
    defaults."""
    if block is not None and (block < 256 or block & (block - 1)):
        raise ValueError(f"block must be a power of two >= 256, got {block}")
    if eviction not in ("", "evict_first", "evict_last"):
        raise ValueError(f"eviction must be '', 'evict_first' or 'evict_last', got {eviction!r}")
    inv_n = 1.0 / v_pred.shape[2] if mean else 1.0
    meta = dict(
        HAS_W=weight is not None,
        PARTIALS=energy is None,
        BLOCK=block or _block(v_pred.element_size()),
        VEC=16 // v_pred.element_size(),  # elements per 16-byte load
        EVICT=eviction,
        num_warps=num_warps,
    )

    def args(S, N, chunk):
        splits = triton.cdiv(N, chunk)
        out = energy
        if out is None:
            out = torch.empty(v_pred.shape[0] * S * splits, device=v_pred.device)
        w, w_sg, w_ss = _weight_args(weight, out)
        return (v_pred, v_ref, w, out, S, N, chunk, inv_n, w_sg, w_ss)

    return _one_wave(_fwd_kernel, v_pred, args, meta)


def bwd_launch(
    grad: torch.Tensor,
    v_pred: torch.Tensor,
    v_ref: torch.Tensor,
    weight: torch.Tensor | None,
    mean: bool,
    need_ref: bool,
    d_pred: torch.Tensor,
    d_ref: torch.Tensor,
) -> Launch:
    """The backward launch; grad float32 contiguous, weight as the forward's, gradients given."""
    w, w_sg, w_ss = _weight_args(weight, grad)
    coef_n = 2.0 / v_pred.shape[2] if mean else 2.0
    d_ref = d_ref if need_ref else d_pred
    meta = dict(
        HAS_W=weight is not None,
        NEED_REF=need_ref,
        BLOCK=_block(v_pred.element_size()),
        num_warps=8,
    )
    return _one_wave(
        _bwd_kernel,
        v_pred,
        lambda S, N, chunk: (
            grad,
            v_pred,
            v_ref,
            w,
            d_pred,
            d_ref,
            S,
            N,
            chunk,
            coef_n,
            w_sg,
            w_ss,
        ),  # fmt: skip
        meta,
    )


def velocity_energy_fwd(
    v_pred: torch.Tensor, v_ref: torch.Tensor, weight: torch.Tensor | None, mean: bool
) -> torch.Tensor:
    """v_pred, v_ref: [G, S, N] contiguous; weight: [G, S] float32 (any strides) or None (ones).
    Returns energy [G] float32.

    One launch, its programs adding into energy with float atomics; under
    ``torch.use_deterministic_algorithms(True)`` the programs write partial sums instead and a
    second launch sums them per branch in a fixed order, so equal inputs give equal bits."""
    G, S, N = v_pred.shape
    if v_pred.numel() == 0:
        # a mean over no elements is NaN, as torch.mean and the other backends give
        fill = float("nan") if mean and N == 0 and S > 0 else 0.0
        return torch.full((G,), fill, device=v_pred.device, dtype=torch.float32)
    if torch.are_deterministic_algorithms_enabled():
        launch = fwd_launch(v_pred, v_ref, weight, mean, None)
        launch()
        return launch.args[3].view(G, -1).sum(1)
    energy = torch.zeros(G, device=v_pred.device, dtype=torch.float32)
    fwd_launch(v_pred, v_ref, weight, mean, energy)()
    return energy


def velocity_energy_bwd(
    grad: torch.Tensor,
    v_pred: torch.Tensor,
    v_ref: torch.Tensor,
    weight: torch.Tensor | None,
    mean: bool,
    need_ref: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad: [G]. Returns d v_pred [G, S, N] and d v_ref (empty unless need_ref)."""
    d_pred = torch.empty_like(v_pred)
    d_ref = torch.empty_like(v_ref) if need_ref else v_ref.new_empty(0)
    if v_pred.numel() > 0:
        launch = bwd_launch(
            grad.float().contiguous(), v_pred, v_ref, weight, mean, need_ref, d_pred, d_ref
        )
        launch()
    return d_pred, d_ref
