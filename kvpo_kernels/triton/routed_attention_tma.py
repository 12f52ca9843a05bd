"""Triton routed paged attention for Hopper and data-centre Blackwell: TMA loads, flat loops.

The FlashAttention-2 kernels of :mod:`.routed_attention` walk a row's page table in two nested
loops (pages, then key blocks of a page) with pointer loads. Here every loop is flat, so Triton's
software pipeliner (and, with ``WARP_SPEC``, its warp specialisation: a producer warp issuing the
loads, consumers doing the products) can schedule across pages:

- forward and dq: the host first lists, per row, the kept key blocks (``page * blocks_per_page +
  block``, :func:`key_blocks`); K and V blocks come through TMA (host tensor descriptors over
  ``[P * Hkv, page_size, D]``): keys past the page size are zero-filled by the copy engine, so a
  page of any token count (1560) needs no masked load; keys past a partly filled page's length
  are masked in the scores and zeroed in K and V;
- dk/dv: one program per (key block of a page, KV head), as the pointer kernel, loops once over
  (rows listing the page) x (the KV head's query heads) x (query blocks), Q and dO through TMA
  (descriptors over ``[B * H, Lq, D]``, queries past Lq zero-filled); with ``ATOMIC_DQ`` it also
  adds dS K into a float32 dq (``deterministic=False``).

16-bit operands, head dims that are a multiple of 8 (TMA needs 16-byte strides) up to 128 (at
256 every backward tile tried spills on Hopper: ``backend='triton'`` takes it).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._common import Launch, interpreted
from .routed_attention import (
    LOG2E,
    _row_runs,
    _runs,
    check_backward_size,
    dkdv_tile,
    dot_block,
    dq_tile,
    page_rows_csr,
    row_grid,
)
from .routed_attention import routed_attention_bwd as pointer_backward
from .routed_attention import routed_attention_fwd as pointer_forward


class TmaTiles(NamedTuple):
    block: int  # the autotuned block: queries (forward, dq) or keys (dk/dv)
    num_warps: int
    num_stages: int
    warp_spec: bool = False


# Keys per block for each padded head dim (fixed: the host's block list is built for it).
BLOCK_N = {64: 128, 128: 128}
# Candidates the autotuner times, per padded head dim (16-bit operands only). WARP_SPEC asks for
# Triton's warp specialisation of the loop: Triton 3.9 applies it on Blackwell (sm_100a), and
# compiles the same code with and without it on Hopper, where those candidates are dropped.
TILES: dict[int, list[TmaTiles]] = {
    64: [TmaTiles(128, 8, 3, False), TmaTiles(128, 8, 2, True), TmaTiles(64, 4, 3, False)],
    128: [TmaTiles(128, 8, 2, False), TmaTiles(128, 8, 2, True), TmaTiles(64, 8, 2, False)],
}
# The backward's candidates (no warp specialisation: Triton 3.9 declines it for these loops).
# dq walks key blocks of DQ_BLOCK_N (its own block list), dk/dv steps over BWD_BLOCK_M queries
# (fixed: the Q and dO descriptors are built for them); smaller than the forward's, or they spill.
DQ_BLOCK_N = {64: 128, 128: 64}
DQ_TILES: dict[int, list[TmaTiles]] = {
    64: [TmaTiles(128, 8, 2), TmaTiles(64, 4, 2), TmaTiles(64, 8, 3)],
    128: [TmaTiles(64, 4, 2), TmaTiles(64, 8, 2), TmaTiles(128, 8, 2)],
}
BWD_BLOCK_M = {64: 64, 128: 32}
DKDV_TILES: dict[int, list[TmaTiles]] = {
    64: [TmaTiles(128, 8, 2), TmaTiles(64, 4, 3), TmaTiles(64, 8, 2)],
    128: [TmaTiles(64, 4, 2), TmaTiles(64, 8, 2), TmaTiles(128, 8, 2)],
}
# with the atomic dq: 64 keys on 4 warps spill at D = 128
FUSED_TILES = {**DKDV_TILES, 128: [TmaTiles(64, 8, 2), TmaTiles(128, 8, 2)]}
INTERPRETER_TILES = TmaTiles(16, 4, 1, False)
DTYPES = (torch.float16, torch.bfloat16)


def supported(dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the TMA forward cannot take this dtype and head dim, or None when it can."""
    if dtype not in DTYPES:
        return f"takes float16 or bfloat16, got {dtype}"
    if head_dim % 8 != 0 or head_dim > 128:
        return f"takes a head dim that is a multiple of 8 up to 128, got {head_dim}"
    return None


def block_n(head_dim: int, page_size: int, table: dict[int, int] = BLOCK_N) -> int:
    """Keys per block: the head dim's in ``table`` (the forward's, or dq's), capped at the page
    size's power of two; 16 under the interpreter."""
    if interpreted():
        return min(16, dot_block(page_size))
    return min(table[max(64, dot_block(head_dim))], dot_block(page_size))


def key_blocks(
    page_table: torch.Tensor, page_lens: torch.Tensor | None, page_size: int, bn: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's kept key blocks in table order, as ``page * ceil(page_size / bn) + block``.

    page_table: [B, N] int32; page_lens: [P] int32 or None. Returns blocks [B, max(1, most
    blocks of a row)] int32 (-1 past a row's count) and counts [B] int32."""
    B, N = page_table.shape
    per_page = triton.cdiv(page_size, bn)
    pages = page_table.long().clamp(min=0)
    if page_lens is None:
        fill = torch.full_like(pages, page_size)
    else:
        fill = page_lens.long().clamp(min=0, max=page_size)[pages]
    blk = torch.arange(per_page, device=page_table.device)
    kept = (page_table >= 0)[:, :, None] & (blk * bn < fill[:, :, None])  # [B, N, per_page]
    ids = (pages[:, :, None] * per_page + blk).reshape(B, -1)
    kept = kept.reshape(B, -1)
    order = torch.argsort((~kept).to(torch.int8), dim=1, stable=True)  # kept first, in order
    counts = kept.sum(1)
    width = max(1, int(counts.max())) if B > 0 else 1
    blocks = torch.where(kept, ids, -1).gather(1, order)[:, :width]
    return blocks.to(torch.int32).contiguous(), counts.to(torch.int32)


def _config(t: TmaTiles, block: str) -> triton.Config:
    return triton.Config(
        {block: t.block, "WARP_SPEC": t.warp_spec}, num_warps=t.num_warps, num_stages=t.num_stages
    )


def _autotune(table: dict[int, list[TmaTiles]], block: str, reset: tuple[str, ...] = ()):
    """Autotuning over ``table``'s candidates for the padded head dim (``block`` names the tuned
    constexpr: BLOCK_M or BLOCK_N, capped at the page size's power of two for keys); warp
    specialisation only where Triton applies it (compute capability 10)."""
    configs = [_config(INTERPRETER_TILES, block)] if interpreted() else [
        _config(t, block) for t in sorted({t for ts in table.values() for t in ts})
    ]  # fmt: skip

    def prune(configs, named_args, **meta) -> list[triton.Config]:
        wanted = table[meta["BLOCK_D"]]
        device = next(a for a in named_args.values() if isinstance(a, torch.Tensor)).device
        hopper = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 10
        kept: dict[TmaTiles, triton.Config] = {}
        for c in configs:
            t = TmaTiles(c.kwargs[block], c.num_warps, c.num_stages, c.kwargs["WARP_SPEC"])
            if t not in wanted or (hopper and t.warp_spec):
                continue
            if block == "BLOCK_N":
                t = t._replace(block=min(t.block, dot_block(named_args["page_size"])))
            kept.setdefault(t, _config(t, block))
        return list(kept.values())

    return triton.autotune(
        configs=configs,
        key=["Lq", "page_size", "D", "GROUP"],
        prune_configs_by={"early_config_prune": None if interpreted() else prune},
        reset_to_zero=list(reset) or None,
    )


@_autotune(TILES, "BLOCK_M")
@triton.jit(do_not_specialize=["B", "max_blocks"])
def _fwd_tma_kernel(
    Q, K_DESC, V_DESC, BLOCKS, COUNTS, LENS, OUT, LSE,
    sm_scale,
    s_qb, s_qh, s_qm,
    B, H, Lq, Hkv, max_blocks, per_page, page_size, D,
    GROUP: tl.constexpr, HAS_LENS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, WARP_SPEC: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_hb = tl.program_id(1)
    h = pid_hb // B
    b = pid_hb % B
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    md_mask = (offs_m < Lq)[:, None] & (offs_d < D)[None, :]
    q_ptrs = Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=md_mask, other=0.0)
    qk_scale = sm_scale * LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_blocks = tl.load(COUNTS + b)
    for i in tl.range(0, n_blocks, warp_specialize=WARP_SPEC):
        e = tl.load(BLOCKS + b * max_blocks + i)
        p = e // per_page
        n0 = (e % per_page) * BLOCK_N
        if HAS_LENS:
            n_valid = tl.load(LENS + p)
        else:
            n_valid = page_size
        n_mask = n0 + offs_n < n_valid
        k = K_DESC.load([p * Hkv + hk, n0, 0]).reshape([BLOCK_N, BLOCK_D])
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        pexp = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(pexp, 1)
        v = V_DESC.load([p * Hkv + hk, n0, 0]).reshape([BLOCK_N, BLOCK_D])
        if HAS_LENS:  # a partly filled page's tail may hold anything, NaN included
            v = tl.where(n_mask[:, None], v, 0.0)
        acc = acc * alpha[:, None] + tl.dot(pexp.to(v.dtype), v)
        m_i = m_new
    empty = l_i == 0.0
    inv = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))
    lse = tl.where(
        empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453
    )
    o_ptrs = OUT + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :]
    tl.store(o_ptrs, (acc * inv[:, None]).to(OUT.dtype.element_ty), mask=md_mask)
    tl.store(LSE + (b * H + h) * Lq + offs_m, lse, mask=offs_m < Lq)


@_autotune(DQ_TILES, "BLOCK_M")
@triton.jit(do_not_specialize=["B", "max_blocks"])
def _bwd_dq_tma_kernel(
    Q, K_DESC, V_DESC, BLOCKS, COUNTS, LENS, DO, LSE, DELTA, DQ,
    sm_scale,
    s_qb, s_qh, s_qm,
    B, H, Lq, Hkv, max_blocks, per_page, page_size, D,
    GROUP: tl.constexpr, HAS_LENS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, WARP_SPEC: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_hb = tl.program_id(1)
    h = pid_hb // B
    b = pid_hb % B
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    m_mask = offs_m < Lq
    md_mask = m_mask[:, None] & (offs_d < D)[None, :]
    row = b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :]
    q = tl.load(Q + row, mask=md_mask, other=0.0)
    do = tl.load(DO + row, mask=md_mask, other=0.0)
    lse = tl.load(LSE + (b * H + h) * Lq + offs_m, mask=m_mask, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse) * LOG2E
    delta = tl.load(DELTA + (b * H + h) * Lq + offs_m, mask=m_mask, other=0.0)
    qk_scale = sm_scale * LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_blocks = tl.load(COUNTS + b)
    for i in tl.range(0, n_blocks, warp_specialize=WARP_SPEC):
        e = tl.load(BLOCKS + b * max_blocks + i)
        p = e // per_page
        n0 = (e % per_page) * BLOCK_N
        if HAS_LENS:
            n_valid = tl.load(LENS + p)
        else:
            n_valid = page_size
        n_mask = n0 + offs_n < n_valid
        k = K_DESC.load([p * Hkv + hk, n0, 0]).reshape([BLOCK_N, BLOCK_D])
        v = V_DESC.load([p * Hkv + hk, n0, 0]).reshape([BLOCK_N, BLOCK_D])
        if HAS_LENS:  # a partly filled page's tail may hold anything: 0 x NaN is NaN
            k = tl.where(n_mask[:, None], k, 0.0)
            v = tl.where(n_mask[:, None], v, 0.0)
        dq += dq_tile(q, do, k, v, lse, delta, n_mask, qk_scale, False)
    tl.store(DQ + row, (dq * sm_scale).to(DQ.dtype.element_ty), mask=md_mask)


@triton.jit(do_not_specialize=["B", "Lq"])
def _bwd_dkdv_tma(
    Q_DESC, DO_DESC, K, V, LENS, LSE, DELTA, DK, DV, DQ_ACC, ROW_PTR, ROWS,
    sm_scale,
    s_qb, s_qh, s_qm,
    s_kp, s_kh, s_kt,
    B, H, Lq, Hkv, page_size, D,
    GROUP: tl.constexpr, HAS_LENS: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, WARP_SPEC: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_ph = tl.program_id(1)
    p = pid_ph // Hkv
    hk = pid_ph % Hkv
    if HAS_LENS:
        n_valid = tl.load(LENS + p)
    else:
        n_valid = page_size
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_m = tl.arange(0, BLOCK_M)
    d_mask = offs_d < D
    n_mask = offs_n < n_valid
    kv_ptrs = p.to(tl.int64) * s_kp + hk * s_kh + offs_n[:, None] * s_kt + offs_d[None, :]
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(K + kv_ptrs, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_ptrs, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * LOG2E
    start = tl.load(ROW_PTR + p)
    blocks_m = tl.cdiv(Lq, BLOCK_M)
    steps = (tl.load(ROW_PTR + p + 1) - start) * GROUP * blocks_m
    for it in tl.range(0, steps, warp_specialize=WARP_SPEC):  # (listing, head, query block)
        b = tl.load(ROWS + start + it // (GROUP * blocks_m))
        h = hk * GROUP + (it // blocks_m) % GROUP
        m0 = (it % blocks_m) * BLOCK_M
        q = Q_DESC.load([b * H + h, m0, 0]).reshape([BLOCK_M, BLOCK_D])
        do = DO_DESC.load([b * H + h, m0, 0]).reshape([BLOCK_M, BLOCK_D])
        rows = m0 + offs_m
        m_mask = rows < Lq
        stat = (b * H + h) * Lq + rows
        lse = tl.load(LSE + stat, mask=m_mask, other=0.0)
        lse = tl.where(lse == float("-inf"), 0.0, lse) * LOG2E
        delta = tl.load(DELTA + stat, mask=m_mask, other=0.0)
        kept = n_mask[:, None] & m_mask[None, :]
        dk, dv, ds_t = dkdv_tile(k, v, q, do, lse, delta, kept, qk_scale, dk, dv, False)
        if ATOMIC_DQ:  # DQ_ACC: float32 with q's strides, zeroed by the caller
            dq = tl.dot(tl.trans(ds_t), k) * sm_scale
            ptrs = b.to(tl.int64) * s_qb + h * s_qh + rows[:, None] * s_qm + offs_d[None, :]
            tl.atomic_add(DQ_ACC + ptrs, dq, mask=m_mask[:, None] & d_mask[None, :], sem="relaxed")
    tl.store(DK + kv_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


_bwd_dkdv_tma_kernel = _autotune(DKDV_TILES, "BLOCK_N")(_bwd_dkdv_tma)
# The autotuner runs each candidate on the same accumulator: it zeroes DQ_ACC before every run.
_bwd_fused_tma_kernel = _autotune(FUSED_TILES, "BLOCK_N", reset=("DQ_ACC",))(_bwd_dkdv_tma)


def _descriptor(pages: torch.Tensor, bn: int, bd: int) -> TensorDescriptor:
    """[P, Hkv, page_size, D] as [P * Hkv, page_size, D] with [1, bn, bd] blocks."""
    P, Hkv, page_size, D = pages.shape
    flat = pages.reshape(P * Hkv, page_size, D)
    return TensorDescriptor(flat, list(flat.shape), list(flat.stride()), [1, bn, bd])


def fwd_launches(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_table: torch.Tensor,
    page_lens: torch.Tensor | None,
    scale: float,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> list[Launch]:
    """The TMA forward's launches, one per run of rows (grid and offset limits as the pointer
    forward's); arguments as :func:`routed_attention_fwd`, outputs given."""
    B, H, Lq, D = q.shape
    P, Hkv, page_size, _ = k_pages.shape
    bd = _blocks(D)
    bn = block_n(D, page_size)
    blocks, counts = key_blocks(page_table, page_lens, page_size, bn)
    k_desc, v_desc = _descriptor(k_pages, bn, bd), _descriptor(v_pages, bn, bd)
    constexprs = dict(
        GROUP=H // Hkv, HAS_LENS=page_lens is not None, BLOCK_N=bn, BLOCK_D=bd,
    )  # fmt: skip
    launches = []
    for a, b in _row_runs(q):
        lens = page_lens if page_lens is not None else counts
        args = (
            q[a:b], k_desc, v_desc, blocks[a:b], counts[a:b], lens, out[a:b], lse[a:b], scale,
            q.stride(0), q.stride(1), q.stride(2),
            b - a, H, Lq, Hkv, blocks.shape[1], per_page(page_size, bn), page_size, D,
        )  # fmt: skip
        launches.append(Launch(_fwd_tma_kernel, row_grid(Lq, H, b - a), args, constexprs))
    return launches


def _blocks(d: int) -> int:
    """The head dim's block: its power of two (at least 64 on the GPU, where TMA and wgmma want
    128-byte rows)."""
    return dot_block(d) if interpreted() else max(64, dot_block(d))


def _query_descriptor(x: torch.Tensor, bm: int, bd: int) -> TensorDescriptor:
    """[B, H, Lq, D] (contiguous) as [B * H, Lq, D] with [1, bm, bd] blocks."""
    B, H, Lq, D = x.shape
    flat = x.reshape(B * H, Lq, D)
    return TensorDescriptor(flat, list(flat.shape), list(flat.stride()), [1, bm, bd])


def bwd_launches(
    dout: torch.Tensor,
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_table: torch.Tensor,
    page_lens: torch.Tensor | None,
    lse: torch.Tensor,
    delta: torch.Tensor,
    scale: float,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    deterministic: bool = True,
) -> list[Launch]:
    """The TMA backward's launches, arguments as the pointer backward's
    (:func:`.routed_attention.bwd_launches`; q and dout contiguous): dq per run of rows over
    each row's block list, then dk/dv per run of pages over one flat loop."""
    B, H, Lq, D = q.shape
    P, Hkv, page_size, _ = k_pages.shape
    check_backward_size(q)
    bd = _blocks(D)
    launches = []
    constexprs = dict(GROUP=H // Hkv, HAS_LENS=page_lens is not None, BLOCK_D=bd)
    if deterministic:
        bn = block_n(D, page_size, DQ_BLOCK_N)
        blocks, counts = key_blocks(page_table, page_lens, page_size, bn)
        k_desc, v_desc = _descriptor(k_pages, bn, bd), _descriptor(v_pages, bn, bd)
        lens = page_lens if page_lens is not None else counts
        for a, b in _row_runs(q):
            args = (
                q[a:b], k_desc, v_desc, blocks[a:b], counts[a:b], lens, dout[a:b], lse[a:b],
                delta[a:b], dq[a:b], scale,
                q.stride(0), q.stride(1), q.stride(2),
                b - a, H, Lq, Hkv, blocks.shape[1], per_page(page_size, bn), page_size, D,
            )  # fmt: skip
            meta = dict(constexprs, BLOCK_N=bn)
            launches.append(Launch(_bwd_dq_tma_kernel, row_grid(Lq, H, b - a), args, meta))
    bm = 16 if interpreted() else BWD_BLOCK_M[bd]
    q_desc, do_desc = _query_descriptor(q, bm, bd), _query_descriptor(dout, bm, bd)
    kernel = _bwd_dkdv_tma_kernel if deterministic else _bwd_fused_tma_kernel
    meta = dict(constexprs, ATOMIC_DQ=not deterministic, BLOCK_M=bm)
    row_ptr, rows = page_rows_csr(page_table, P)
    for a, b in _runs(P, Hkv):
        lens = page_lens[a:b] if page_lens is not None else row_ptr
        args = (
            q_desc, do_desc, k_pages[a:b], v_pages[a:b], lens, lse, delta, dk[a:b], dv[a:b], dq,
            row_ptr[a:], rows, scale,
            q.stride(0), q.stride(1), q.stride(2),
            k_pages.stride(0), k_pages.stride(1), k_pages.stride(2),
            B, H, Lq, Hkv, page_size, D,
        )  # fmt: skip
        grid = lambda m, pages=b - a: (triton.cdiv(page_size, m["BLOCK_N"]), pages * Hkv)  # noqa: E731
        launches.append(Launch(kernel, grid, args, meta))
    return launches


def per_page(page_size: int, bn: int) -> int:
    return triton.cdiv(page_size, bn)


def routed_attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_table: torch.Tensor,
    page_lens: torch.Tensor | None,
    lse: torch.Tensor,
    delta: torch.Tensor,
    scale: float,
    deterministic: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pointer backward's arguments and results (:func:`.routed_attention.routed_attention_bwd`),
    through TMA and flat loops; q, dout, k_pages, v_pages contiguous and 16-byte aligned."""
    args = (dout, q, k_pages, v_pages, page_table, page_lens, lse, delta, scale, deterministic)
    return pointer_backward(*args, launches=bwd_launches)


def routed_attention_fwd(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_table: torch.Tensor,
    page_lens: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [B, H, Lq, D] float16/bfloat16; k_pages, v_pages: [P, Hkv, page_size, D] (contiguous,
    16-byte aligned); page_table: [B, max_pages] int32. Returns out [B, H, Lq, D] (dtype of q)
    and lse [B, H, Lq] float32."""
    args = (q, k_pages, v_pages, page_table, page_lens, scale)
    return pointer_forward(*args, launches=fwd_launches)
