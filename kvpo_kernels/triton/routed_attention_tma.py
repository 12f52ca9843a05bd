"""Triton routed paged attention forward for Hopper and data-centre Blackwell: TMA loads over a
flat block list.

The FlashAttention-2 forward of :mod:`.routed_attention` walks a row's page table in two nested
loops (pages, then key blocks of a page) with pointer loads. Here the host first lists, per row,
the kept key blocks (``page * blocks_per_page + block``, :func:`key_blocks`), so the kernel runs
one flat loop that Triton's software pipeliner (and, with ``WARP_SPEC``, its warp specialisation:
a producer warp issuing the loads, consumers doing the products) can schedule across pages. K and
V blocks come through TMA (host tensor descriptors over ``[P * Hkv, page_size, D]``): keys past
the page size are zero-filled by the copy engine, so a page of any token count (1560) needs no
masked load; keys past a partly filled page's length are masked in the scores and zeroed in V.

16-bit operands, head dims that are a multiple of 8 up to 256 (TMA needs 16-byte strides).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._common import Launch, interpreted
from .routed_attention import LOG2E, _row_runs, dot_block, row_grid
from .routed_attention import routed_attention_fwd as pointer_forward


class TmaTiles(NamedTuple):
    block_m: int
    num_warps: int
    num_stages: int
    warp_spec: bool


# Keys per block for each padded head dim (fixed: the host's block list is built for it).
BLOCK_N = {64: 128, 128: 128, 256: 64}
# Candidates the autotuner times, per padded head dim (16-bit operands only). WARP_SPEC asks for
# Triton's warp specialisation of the loop: Triton 3.9 applies it on Blackwell (sm_100a), and
# compiles the same code with and without it on Hopper, where those candidates are dropped.
TILES: dict[int, list[TmaTiles]] = {
    64: [TmaTiles(128, 8, 3, False), TmaTiles(128, 8, 2, True), TmaTiles(64, 4, 3, False)],
    128: [TmaTiles(128, 8, 2, False), TmaTiles(128, 8, 2, True), TmaTiles(64, 8, 2, False)],
    256: [TmaTiles(64, 8, 2, False), TmaTiles(64, 8, 2, True)],
}
INTERPRETER_TILES = TmaTiles(16, 4, 1, False)
DTYPES = (torch.float16, torch.bfloat16)


def supported(dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the TMA forward cannot take this dtype and head dim, or None when it can."""
    if dtype not in DTYPES:
        return f"takes float16 or bfloat16, got {dtype}"
    if head_dim % 8 != 0 or head_dim > 256:
        return f"takes a head dim that is a multiple of 8 up to 256, got {head_dim}"
    return None


def block_n(head_dim: int, page_size: int) -> int:
    """Keys per block: the head dim's, capped at the page size's power of two."""
    return min(BLOCK_N[max(64, dot_block(head_dim))], dot_block(page_size))


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


def _config(t: TmaTiles) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": t.block_m, "WARP_SPEC": t.warp_spec},
        num_warps=t.num_warps,
        num_stages=t.num_stages,
    )


def _configs() -> list[triton.Config]:
    if interpreted():
        return [_config(INTERPRETER_TILES)]
    return [_config(t) for t in sorted({t for ts in TILES.values() for t in ts})]


def _prune(configs, named_args, **meta) -> list[triton.Config]:
    wanted = TILES[meta["BLOCK_D"]]
    q = named_args["Q"]
    hopper = q.is_cuda and torch.cuda.get_device_capability(q.device)[0] < 10
    return [
        c
        for c in configs
        if TmaTiles(c.kwargs["BLOCK_M"], c.num_warps, c.num_stages, c.kwargs["WARP_SPEC"]) in wanted
        and not (hopper and c.kwargs["WARP_SPEC"])
    ]


@triton.autotune(
    configs=_configs(),
    key=["Lq", "page_size", "D", "GROUP"],
    prune_configs_by={"early_config_prune": None if interpreted() else _prune},
)
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
    bd = max(64, dot_block(D)) if not interpreted() else dot_block(D)
    bn = block_n(D, page_size) if not interpreted() else min(16, dot_block(page_size))
    per_page = triton.cdiv(page_size, bn)
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
            b - a, H, Lq, Hkv, blocks.shape[1], per_page, page_size, D,
        )  # fmt: skip
        launches.append(Launch(_fwd_tma_kernel, row_grid(Lq, H, b - a), args, constexprs))
    return launches


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
