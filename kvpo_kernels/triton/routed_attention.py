"""Triton routed paged attention: FlashAttention-2 forward and backward walking page tables.

Forward: one program per (query block, head, row); heads are the slow grid axis and rows the fast
one, so the branches of a prompt (adjacent rows) that read the same shared pages run together and
find them in L2. Each program walks its row's table, skips routed-out pages (-1) without touching
their memory, masks the tail of partly filled pages, and keeps an online softmax in fp32 (base-2
exponentials).

Backward: ``dk``/``dv`` run one program per (token block of a physical page, KV head) over a
page -> rows index (CSR), so the gradient of a page that several rows list is summed inside one
program: no atomics. ``dq`` comes in two ways. Deterministic (the default): a second kernel walks
the tables like the forward and computes the scores again. Otherwise the dk/dv programs add their
``dS K`` into a float32 ``dq`` with atomics, so the scores are computed once in the whole backward,
in an order that varies from run to run.

Size: a problem with more (row, head) or (page, KV head) pairs than a CUDA grid's second axis
holds, or whose q spans 2**31 elements and more, runs as several launches over runs of rows or
pages (:data:`MAX_GRID_Y`, :data:`MAX_OFFSET`).

Tiles: chosen per operand width and padded head dim from tables whose every entry compiles for
sm_80 and sm_90a without spilling registers and within the SM's shared memory, and each of whose
launches keeps at least one such entry on Ada (sm_89) and both Blackwells (sm_100a, sm_120)
(:mod:`kvpo_kernels.triton.aot` compiles them on a machine without a GPU;
tests/kernels/test_triton_aot.py keeps it so). Each kernel autotunes over its table's entries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from ._common import Launch, interpreted, next_pow2

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E)


class Tiles(NamedTuple):
    block_m: int  # query rows per block
    block_n: int  # keys per block (at most the page size rounded up to a power of two)
    num_warps: int
    num_stages: int


# (bytes per operand element, padded head dim) -> tiles. 16-bit operands run on tensor cores
# (wgmma on sm_90a); fp32 runs exact IEEE dots on CUDA cores, whose operands live in registers
# and shared memory: smaller tiles and shallower pipelines, or it spills and, at D = 256, asks for
# more shared memory than any SM has.
FWD_TILES: dict[tuple[int, int], list[Tiles]] = {
    (2, 64): [Tiles(64, 64, 4, 3), Tiles(64, 64, 8, 3), Tiles(128, 64, 8, 3), Tiles(128, 64, 8, 2)],
    (2, 128): [Tiles(64, 64, 8, 3), Tiles(64, 64, 8, 2), Tiles(128, 64, 8, 3), Tiles(32, 64, 4, 3)],
    (2, 256): [Tiles(32, 64, 8, 3), Tiles(64, 32, 8, 2), Tiles(64, 32, 8, 3), Tiles(64, 16, 8, 3)],
    (4, 64): [Tiles(64, 32, 8, 2), Tiles(32, 32, 8, 2), Tiles(64, 16, 8, 2)],
    (4, 128): [Tiles(64, 32, 8, 2), Tiles(64, 16, 8, 2), Tiles(32, 32, 8, 2)],
    (4, 256): [Tiles(32, 16, 8, 2), Tiles(32, 16, 8, 1), Tiles(16, 32, 8, 1)],
}
# Backward candidates that compile without a spill on sm_80 and sm_90a (python -m
# kvpo_kernels.triton.aot --check; per Triton version in benchmarks/RESULTS.md): larger query
# blocks for dq and key blocks for dk/dv re-read K/V and Q/dO less; the autotuner picks.
DQ_TILES: dict[tuple[int, int], list[Tiles]] = {
    (2, 64): [Tiles(64, 64, 8, 3), Tiles(128, 64, 8, 2), Tiles(128, 32, 8, 2), Tiles(64, 32, 4, 3)],
    (2, 128): [Tiles(64, 64, 8, 3), Tiles(128, 32, 8, 2), Tiles(64, 32, 4, 3), Tiles(64, 32, 8, 3)],
    # 32 x 32 / 8 / 2: on sm_120 at 1560-token pages the only one without a spill within 99 KiB
    (2, 256): [Tiles(32, 32, 8, 3), Tiles(32, 32, 8, 2), Tiles(64, 32, 8, 2), Tiles(64, 32, 8, 3)],
    (4, 64): [Tiles(32, 32, 8, 2)],
    (4, 128): [Tiles(32, 16, 8, 1)],
    (4, 256): [Tiles(16, 16, 8, 1)],
}
DKDV_TILES: dict[tuple[int, int], list[Tiles]] = {
    (2, 64): [Tiles(32, 64, 8, 3), Tiles(32, 128, 8, 2), Tiles(64, 64, 8, 2), Tiles(16, 128, 8, 2)],
    (2, 128): [Tiles(32, 64, 8, 3), Tiles(16, 128, 8, 2), Tiles(64, 64, 8, 2), Tiles(32, 64, 8, 2)],
    (2, 256): [Tiles(16, 32, 8, 3), Tiles(32, 32, 8, 2), Tiles(32, 32, 8, 3)],
    (4, 64): [Tiles(32, 32, 8, 1)],
    (4, 128): [Tiles(32, 16, 4, 1)],
    (4, 256): [Tiles(16, 16, 8, 1)],
}
# dk/dv over pages of at most 16 tokens: one 16-row key block, too few rows for 8 warps (fewer
# warps keep it from spilling; benchmarks/RESULTS.md).
DKDV_SMALL_PAGE_TILES: dict[tuple[int, int], list[Tiles]] = {
    (2, 64): [Tiles(32, 16, 2, 2)],
    (2, 128): [Tiles(16, 16, 4, 2)],
    (2, 256): [Tiles(32, 16, 4, 2)],
}
# The backward with atomic dq (dk/dv programs that also add dS K to dq): one more product and
# its operands live beside dk and dv, so smaller query blocks than DKDV_TILES'.
FUSED_TILES: dict[tuple[int, int], list[Tiles]] = {
    (2, 64): [Tiles(32, 64, 8, 3), Tiles(32, 128, 8, 2), Tiles(16, 128, 8, 2)],
    (2, 128): [Tiles(32, 64, 8, 3), Tiles(32, 64, 8, 2), Tiles(16, 64, 8, 2)],
    (2, 256): [Tiles(16, 32, 8, 3), Tiles(16, 32, 8, 2), Tiles(16, 16, 8, 2)],
    (4, 64): [Tiles(32, 32, 8, 1)],
    (4, 128): [Tiles(32, 16, 4, 1)],
    (4, 256): [Tiles(16, 16, 8, 1)],
}
FUSED_SMALL_PAGE_TILES: dict[tuple[int, int], list[Tiles]] = {
    # 16 x 16 on 4 warps spills on sm_100a (D 64) or sm_120 (D 256), on 8 warps on sm_120 (D 64)
    # or sm_100a (D 256): the pair leaves each a clean one
    (2, 64): [Tiles(16, 16, 4, 2), Tiles(16, 16, 8, 2)],
    (2, 128): [Tiles(16, 16, 8, 2)],
    (2, 256): [Tiles(16, 16, 4, 2), Tiles(16, 16, 8, 2)],
}
INTERPRETER_TILES = Tiles(16, 16, 4, 1)


def dot_block(n: int) -> int:
    """A tile holding ``n`` (head dims, a page's keys): a power of two, at least 16, tl.dot's
    smallest operand dimension on the GPU; masked loads fill the rest, as for a head dim of 33."""
    return max(16, next_pow2(n))


def tiles_key(dtype: torch.dtype, head_dim: int) -> tuple[int, int]:
    return (4 if dtype == torch.float32 else 2, max(64, next_pow2(head_dim)))


def _cap_n(t: Tiles, page_size: int) -> Tiles:
    """A block of keys never spans pages: cap it at the page size's :func:`dot_block`."""
    return t._replace(block_n=min(t.block_n, dot_block(page_size)))


def _config(t: Tiles) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": t.block_m, "BLOCK_N": t.block_n}, num_warps=t.num_warps, num_stages=t.num_stages
    )


def _configs(table: dict[tuple[int, int], list[Tiles]]) -> list[triton.Config]:
    if interpreted():
        return [_config(INTERPRETER_TILES)]
    return [_config(t) for t in sorted({t for ts in table.values() for t in ts})]


def _pruner(
    table: dict[tuple[int, int], list[Tiles]],
    small_pages: dict[tuple[int, int], list[Tiles]] | None,
):
    """An early_config_prune keeping ``table``'s entries for this dtype and head dim, keys capped
    at the page size (``small_pages``' entries instead, where given, for pages of <= 16 tokens)."""

    def prune(configs, named_args, **meta) -> list[triton.Config]:
        key = tiles_key(named_args["Q"].dtype, meta["BLOCK_D"])
        if small_pages and key in small_pages and named_args["page_size"] <= 16:
            return [_config(t) for t in small_pages[key]]
        wanted = table[key]
        kept: dict[Tiles, triton.Config] = {}
        for c in configs:
            t = Tiles(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
            if t in wanted:
                t = _cap_n(t, named_args["page_size"])
                kept.setdefault(t, _config(t))
        return list(kept.values())

    return prune


def _autotune(
    table: dict[tuple[int, int], list[Tiles]],
    small_pages: dict[tuple[int, int], list[Tiles]] | None = None,
    reset: tuple[str, ...] = (),
):
    # Keyed on what changes the best tiles, never on the table or row count: a new routing
    # reuses the compiled kernels and the tuning.
    return triton.autotune(
        configs=_configs(table),
        key=["Lq", "page_size", "D", "GROUP"],
        prune_configs_by={"early_config_prune": _pruner(table, small_pages)},
        reset_to_zero=list(reset) or None,
    )


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def dq_tile(q, do, k, v, lse, delta, kept, qk_scale, IEEE: tl.constexpr):
    """dS K of one tile (unscaled): q, do [M, D]; k, v [N, D]; lse (log2 units), delta [M];
    kept [N] (keys that count). Returns [M, D] float32."""
    s = _dot(q, tl.trans(k), IEEE) * qk_scale
    pr = tl.where(kept[None, :], tl.exp2(s - lse[:, None]), 0.0)
    dp = _dot(do, tl.trans(v), IEEE)
    ds = pr * (dp - delta[:, None])
    return _dot(ds.to(k.dtype), k, IEEE)


@triton.jit
def dkdv_tile(k, v, q, do, lse, delta, kept, qk_scale, dk, dv, IEEE: tl.constexpr):
    """One tile of the backward, transposed (keys x queries): every product has the keys as its
    M dimension, which Hopper's wgmma wants at least 64 wide. k, v [N, D]; q, do [M, D]; lse
    (log2 units), delta [M]; kept [N, M]; dk, dv [N, D] float32 accumulators (unscaled).
    Returns dk + dS^T Q, dv + P^T dO and dS^T ([N, M], dtype of q)."""
    s_t = _dot(k, tl.trans(q), IEEE) * qk_scale
    p_t = tl.where(kept, tl.exp2(s_t - lse[None, :]), 0.0)
    dv += _dot(p_t.to(do.dtype), do, IEEE)
    dp_t = _dot(v, tl.trans(do), IEEE)
    ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
    dk += _dot(ds_t, q, IEEE)
    return dk, dv, ds_t


@_autotune(FWD_TILES)
@triton.jit(do_not_specialize=["B", "max_pages"])
def _fwd_kernel(
    Q, K, V, TABLE, LENS, OUT, LSE,
    sm_scale,
    s_qb, s_qh, s_qm,
    s_kp, s_kh, s_kt,
    s_tb,
    B, H, Lq, max_pages, page_size, D,
    GROUP: tl.constexpr, HAS_LENS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
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
    d_mask = offs_d < D
    q_ptrs = Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    qk_scale = sm_scale * LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for j in range(0, max_pages):
        p = tl.load(TABLE + b * s_tb + j)
        if p >= 0:
            if HAS_LENS:
                n_valid = tl.load(LENS + p)
            else:
                n_valid = page_size
            page = p.to(tl.int64) * s_kp + hk * s_kh
            for n0 in range(0, n_valid, BLOCK_N):
                cols = n0 + offs_n
                n_mask = cols < n_valid
                kv_mask = n_mask[:, None] & d_mask[None, :]
                k = tl.load(
                    K + page + cols[:, None] * s_kt + offs_d[None, :], mask=kv_mask, other=0.0
                )
                s = _dot(q, tl.trans(k), IEEE) * qk_scale
                s = tl.where(n_mask[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.exp2(m_i - m_new)
                pexp = tl.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(pexp, 1)
                v = tl.load(
                    V + page + cols[:, None] * s_kt + offs_d[None, :], mask=kv_mask, other=0.0
                )
                acc = acc * alpha[:, None] + _dot(pexp.to(v.dtype), v, IEEE)
                m_i = m_new
    empty = l_i == 0.0
    inv = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))
    out = acc * inv[:, None]
    lse = tl.where(
        empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453
    )
    o_ptrs = OUT + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    tl.store(LSE + (b * H + h) * Lq + offs_m, lse, mask=m_mask)


@_autotune(DQ_TILES)
@triton.jit(do_not_specialize=["B", "max_pages"])
def _bwd_dq_kernel(
    Q, K, V, TABLE, LENS, DO, LSE, DELTA, DQ,
    sm_scale,
    s_qb, s_qh, s_qm,
    s_kp, s_kh, s_kt,
    s_tb,
    B, H, Lq, max_pages, page_size, D,
    GROUP: tl.constexpr, HAS_LENS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
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
    d_mask = offs_d < D
    md_mask = m_mask[:, None] & d_mask[None, :]
    row = b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :]
    q = tl.load(Q + row, mask=md_mask, other=0.0)
    do = tl.load(DO + row, mask=md_mask, other=0.0)
    lse = tl.load(LSE + (b * H + h) * Lq + offs_m, mask=m_mask, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse) * LOG2E
    delta = tl.load(DELTA + (b * H + h) * Lq + offs_m, mask=m_mask, other=0.0)
    qk_scale = sm_scale * LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for j in range(0, max_pages):
        p = tl.load(TABLE + b * s_tb + j)
        if p >= 0:
            if HAS_LENS:
                n_valid = tl.load(LENS + p)
            else:
                n_valid = page_size
            page = p.to(tl.int64) * s_kp + hk * s_kh
            for n0 in range(0, n_valid, BLOCK_N):
                cols = n0 + offs_n
                n_mask = cols < n_valid
                kv_mask = n_mask[:, None] & d_mask[None, :]
                k = tl.load(
                    K + page + cols[:, None] * s_kt + offs_d[None, :], mask=kv_mask, other=0.0
                )
                v = tl.load(
                    V + page + cols[:, None] * s_kt + offs_d[None, :], mask=kv_mask, other=0.0
                )
                dq += dq_tile(q, do, k, v, lse, delta, n_mask, qk_scale, IEEE)
    tl.store(DQ + row, (dq * sm_scale).to(DQ.dtype.element_ty), mask=md_mask)


@triton.jit(do_not_specialize=["B", "Lq"])
def _bwd_dkdv(
    Q, K, V, LENS, DO, LSE, DELTA, DK, DV, DQ_ACC, ROW_PTR, ROWS,
    sm_scale,
    s_qb, s_qh, s_qm,
    s_kp, s_kh, s_kt,
    B, H, Lq, Hkv, page_size, D,
    GROUP: tl.constexpr, HAS_LENS: tl.constexpr, IEEE: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
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
    page = p.to(tl.int64) * s_kp + hk * s_kh
    kv_ptrs = page + offs_n[:, None] * s_kt + offs_d[None, :]
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(K + kv_ptrs, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_ptrs, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * LOG2E
    start = tl.load(ROW_PTR + p)
    end = tl.load(ROW_PTR + p + 1)
    for e in range(start, end):
        b = tl.load(ROWS + e)
        row = b.to(tl.int64) * s_qb  # any row: q may hold 2**31 elements and more
        for g in range(0, GROUP):
            h = hk * GROUP + g
            for m0 in range(0, Lq, BLOCK_M):
                rows = m0 + offs_m
                m_mask = rows < Lq
                md_mask = m_mask[:, None] & d_mask[None, :]
                ptrs = h * s_qh + rows[:, None] * s_qm + offs_d[None, :]
                q = tl.load(Q + row + ptrs, mask=md_mask, other=0.0)
                do = tl.load(DO + row + ptrs, mask=md_mask, other=0.0)
                stat = (b * H + h) * Lq + rows
                lse = tl.load(LSE + stat, mask=m_mask, other=0.0)
                lse = tl.where(lse == float("-inf"), 0.0, lse) * LOG2E
                delta = tl.load(DELTA + stat, mask=m_mask, other=0.0)
                kept = n_mask[:, None] & m_mask[None, :]
                dk, dv, ds_t = dkdv_tile(k, v, q, do, lse, delta, kept, qk_scale, dk, dv, IEEE)
                if ATOMIC_DQ:  # DQ_ACC: float32 with q's strides, zeroed by the caller
                    dq = _dot(tl.trans(ds_t), k, IEEE) * sm_scale
                    tl.atomic_add(DQ_ACC + row + ptrs, dq, mask=md_mask, sem="relaxed")
    tl.store(DK + kv_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


_bwd_dkdv_kernel = _autotune(DKDV_TILES, DKDV_SMALL_PAGE_TILES)(_bwd_dkdv)
# The autotuner runs each candidate on the same accumulator: it zeroes DQ_ACC before every run.
_bwd_fused_kernel = _autotune(FUSED_TILES, FUSED_SMALL_PAGE_TILES, reset=("DQ_ACC",))(_bwd_dkdv)


# CUDA caps a grid's second axis at 65535 programs, and the forward and dq kernels address a
# launch's rows of q, out, dout and dq with int32 offsets: one launch takes at most MAX_GRID_Y
# (row, head) or (page, KV head) pairs and rows spanning fewer than MAX_OFFSET elements; a larger
# problem runs as several launches over runs of rows (pages). The dk/dv kernel reads any row of
# q, and offsets it in int64.
MAX_GRID_Y = 65535
MAX_OFFSET = 2**31


def _meta(q, k_pages):
    B, H, Lq, D = q.shape
    Hkv, page_size = k_pages.shape[1], k_pages.shape[2]
    return B, H, Lq, D, Hkv, page_size


def _runs(n: int, per_grid: int, stride: int = 0, extent: int = 0) -> list[tuple[int, int]]:
    """[start, end) runs of ``n`` rows (pages), one launch each: at most MAX_GRID_Y // per_grid
    of them, and with ``stride`` elements from one to the next and ``extent`` from one's first
    element to past its last, all within MAX_OFFSET."""
    step = MAX_GRID_Y // per_grid
    if stride > 0:
        step = min(step, (MAX_OFFSET - extent) // stride + 1)
    if step < 1:
        raise ValueError(
            f"routed_attention's Triton kernels take at most {MAX_GRID_Y} heads and rows of fewer "
            f"than {MAX_OFFSET} elements, got {per_grid} heads, rows of {extent} elements"
        )
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def _row_runs(q: torch.Tensor) -> list[tuple[int, int]]:
    B, H, Lq, D = q.shape
    extent = (H - 1) * q.stride(1) + (Lq - 1) * q.stride(2) + D
    return _runs(B, H, q.stride(0), extent)


def _constexprs(q: torch.Tensor, k_pages: torch.Tensor, page_lens: torch.Tensor | None) -> dict:
    return dict(
        GROUP=q.shape[1] // k_pages.shape[1], HAS_LENS=page_lens is not None,
        IEEE=q.dtype == torch.float32, BLOCK_D=dot_block(q.shape[3]),
    )  # fmt: skip


def _row_launches(
    kernel: Any,
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_table: torch.Tensor,
    page_lens: torch.Tensor | None,
    rowwise: tuple[torch.Tensor, ...],
    scale: float,
) -> list[Launch]:
    """Launches of ``kernel`` (the forward or dq: arguments Q, K, V, TABLE, LENS, the row-wise
    tensors, then scale, strides and sizes) over runs of q's rows, each taking its rows of q, the
    table and ``rowwise`` (tensors [B, ...] with q's strides, or lse-like and contiguous)."""
    _, H, Lq, D, _, page_size = _meta(q, k_pages)
    constexprs = _constexprs(q, k_pages, page_lens)
    launches = []
    for a, b in _row_runs(q):
        table = page_table[a:b]
        args = (
            q[a:b], k_pages, v_pages, table, page_lens if page_lens is not None else table,
            *(t[a:b] for t in rowwise), scale,
            q.stride(0), q.stride(1), q.stride(2),
            k_pages.stride(0), k_pages.stride(1), k_pages.stride(2),
            table.stride(0),
            b - a, H, Lq, table.shape[1], page_size, D,
        )  # fmt: skip
        launches.append(Launch(kernel, row_grid(Lq, H, b - a), args, constexprs))
    return launches


def row_grid(Lq: int, H: int, rows: int) -> Callable[[dict], tuple[int, int]]:
    """The grid of a launch over ``rows`` rows: (query blocks, rows x heads), heads slowest."""
    return lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), rows * H)


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
    """The forward's launches, one per run of rows (:data:`MAX_GRID_Y`, :data:`MAX_OFFSET`);
    arguments as :func:`routed_attention_fwd`, outputs given (out with q's strides)."""
    return _row_launches(_fwd_kernel, q, k_pages, v_pages, page_table, page_lens, (out, lse), scale)


def routed_attention_fwd(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_table: torch.Tensor,
    page_lens: torch.Tensor | None,
    scale: float,
    launches: Callable[..., list[Launch]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [B, H, Lq, D]; k_pages, v_pages: [P, Hkv, page_size, D] (contiguous); page_table:
    [B, max_pages] int32. Returns out [B, H, Lq, D] (dtype of q) and lse [B, H, Lq] float32.
    ``launches``: the forward's launch builder (default :func:`fwd_launches`; the TMA forward
    passes its own)."""
    B, H, Lq, _ = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)
    if out.numel() > 0:
        build = launches or fwd_launches
        for launch in build(q, k_pages, v_pages, page_table, page_lens, scale, out, lse):
            launch()
    return out, lse


def page_rows_csr(page_table: torch.Tensor, num_pages: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Page -> rows index: rows[row_ptr[p]:row_ptr[p + 1]] are the rows listing physical page p
    (once per listing). page_table: [B, N] int32. Returns row_ptr [P + 1] and rows [nnz], int32."""
    B, N = page_table.shape
    flat = page_table.reshape(-1).long()
    kept = flat >= 0
    pages = flat[kept]
    rows = torch.arange(B * N, device=flat.device)[kept] // N
    order = torch.argsort(pages, stable=True)
    counts = torch.bincount(pages, minlength=num_pages)
    row_ptr = torch.zeros(num_pages + 1, dtype=torch.int64, device=flat.device)
    row_ptr[1:] = torch.cumsum(counts, 0)
    return row_ptr.to(torch.int32), rows[order].to(torch.int32)


def check_backward_size(q: torch.Tensor) -> None:
    """dk/dv indexes every row's lse and delta in int32: fewer than 2**31 of them."""
    B, H, Lq, _ = q.shape
    if B * H * Lq >= 2**31:
        raise ValueError(
            f"routed_attention's Triton backward takes fewer than 2**31 queries x heads x rows, "
            f"got q {tuple(q.shape)}"
        )


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
    """The backward's launches, arguments as :func:`routed_attention_bwd`, gradients given (dout
    and dq with q's strides, dk and dv with k_pages'): dq per run of rows, then dk and dv per run
    of pages (:data:`MAX_GRID_Y`, :data:`MAX_OFFSET`). lse and delta: float32, contiguous.
    ``deterministic=False``: no dq launch; dq must be float32 and zero, and the dk/dv launches
    add into it."""
    B, H, Lq, D, Hkv, page_size = _meta(q, k_pages)
    check_backward_size(q)
    launches = []
    if deterministic:
        rowwise = (dout, lse, delta, dq)
        launches = _row_launches(
            _bwd_dq_kernel, q, k_pages, v_pages, page_table, page_lens, rowwise, scale
        )
    constexprs = dict(_constexprs(q, k_pages, page_lens), ATOMIC_DQ=not deterministic)
    kernel = _bwd_dkdv_kernel if deterministic else _bwd_fused_kernel
    row_ptr, rows = page_rows_csr(page_table, k_pages.shape[0])
    for a, b in _runs(k_pages.shape[0], Hkv):
        lens = page_lens[a:b] if page_lens is not None else row_ptr
        dkdv_args = (
            q, k_pages[a:b], v_pages[a:b], lens, dout, lse, delta, dk[a:b], dv[a:b], dq,
            row_ptr[a:], rows, scale,
            q.stride(0), q.stride(1), q.stride(2),
            k_pages.stride(0), k_pages.stride(1), k_pages.stride(2),
            B, H, Lq, Hkv, page_size, D,
        )  # fmt: skip
        grid = lambda meta, pages=b - a: (triton.cdiv(page_size, meta["BLOCK_N"]), pages * Hkv)  # noqa: E731
        launches.append(Launch(kernel, grid, dkdv_args, constexprs))
    return launches


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
    launches: Callable[..., list[Launch]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """delta = rowsum(dout * out) - dlse [B, H, Lq] float32. Returns dq, dk_pages, dv_pages.
    ``deterministic=False`` computes the scores once (dq by float32 atomics; bits vary).
    ``launches``: the backward's launch builder (default :func:`bwd_launches`)."""
    dq = torch.empty_like(q) if deterministic else torch.zeros_like(q, dtype=torch.float32)
    dk = torch.zeros_like(k_pages)
    dv = torch.zeros_like(v_pages)
    if q.numel() > 0:
        lse, delta = lse.float().contiguous(), delta.float().contiguous()
        build = launches or bwd_launches
        for launch in build(
            dout, q, k_pages, v_pages, page_table, page_lens, lse, delta, scale, dq, dk, dv,
            deterministic,
        ):  # fmt: skip
            launch()
    return dq.to(q.dtype), dk, dv
