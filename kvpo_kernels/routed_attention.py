"""Routed paged attention: many branches attend to one shared, paged KV cache through page tables.

This is how KV routing is expressed without copying the cache per branch: all rows of the batch
(prompts x branches) read the same physical pages, and each row sees only the pages its table lists.
"""

from __future__ import annotations

import torch

from . import _backend, _checks
from .reference import routed_attention_backward_reference, routed_attention_reference

OP = "routed_attention"


# --------------------------------------------------------------------------------------------
# Backend kernels. Each forward returns (out [B, H, Lq, D] dtype of q, lse [B, H, Lq] acc dtype);
# each backward takes delta = rowsum(dout * out) - dlse and returns (dq, dk_pages, dv_pages).
# --------------------------------------------------------------------------------------------


def _fwd_reference(q, k_pages, v_pages, page_table, page_lens, scale):
    acc = _backend.acc_dtype(q.dtype)
    out, lse = routed_attention_reference(
        q.to(acc), k_pages.to(acc), v_pages.to(acc), page_table, page_lens, scale
    )
    return out.to(q.dtype), lse


def _bwd_reference(dout, q, k_pages, v_pages, page_table, page_lens, out, lse, delta, scale):
    acc = _backend.acc_dtype(q.dtype)
    grads = routed_attention_backward_reference(
        *(t.to(acc) for t in (dout, q, k_pages, v_pages)),
        page_table,
        page_lens,
        lse.to(acc),
        delta.to(acc),
        scale,
    )
    return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k_pages, v_pages), strict=True))


def _fwd_native(q, k_pages, v_pages, page_table, page_lens, scale):
    return torch.ops.kvpo.routed_attn_fwd(q, k_pages, v_pages, page_table, page_lens, scale)


def _bwd_native(dout, q, k_pages, v_pages, page_table, page_lens, out, lse, delta, scale):
    return torch.ops.kvpo.routed_attn_bwd(
        dout, q, k_pages, v_pages, page_table, page_lens, lse, delta, scale
    )


# The CUDA C++ forward covers the tensor-core cases; its backward is the Triton one.
CUDA_DTYPES = (torch.float16, torch.bfloat16)
CUDA_HEAD_DIMS = (64, 128)


def _fwd_cuda(q, k_pages, v_pages, page_table, page_lens, scale):
    if q.dtype not in CUDA_DTYPES or q.shape[-1] not in CUDA_HEAD_DIMS:
        raise TypeError(
            f"routed_attention backend 'cuda' takes {CUDA_DTYPES} with head dim in "
            f"{CUDA_HEAD_DIMS}, got {q.dtype} with head dim {q.shape[-1]} (use backend='triton')"
        )
    return _fwd_native(q, k_pages, v_pages, page_table, page_lens, scale)


def _bwd_cuda(dout, q, k_pages, v_pages, page_table, page_lens, out, lse, delta, scale):
    if _backend.native_cuda_available("routed_attn_bwd"):
        return _bwd_native(dout, q, k_pages, v_pages, page_table, page_lens, out, lse, delta, scale)
    return _bwd_triton(dout, q, k_pages, v_pages, page_table, page_lens, out, lse, delta, scale)


def _fwd_triton(q, k_pages, v_pages, page_table, page_lens, scale):
    from .triton.routed_attention import routed_attention_fwd

    return routed_attention_fwd(q, k_pages, v_pages, page_table, page_lens, scale)


def _bwd_triton(dout, q, k_pages, v_pages, page_table, page_lens, out, lse, delta, scale):
    from .triton.routed_attention import routed_attention_bwd

    return routed_attention_bwd(dout, q, k_pages, v_pages, page_table, page_lens, lse, delta, scale)


_KERNELS = {
    "reference": (_fwd_reference, _bwd_reference),
    "cpu": (_fwd_native, _bwd_native),
    "cuda": (_fwd_cuda, _bwd_cuda),
    "triton": (_fwd_triton, _bwd_triton),
}


# --------------------------------------------------------------------------------------------
# The custom ops (registered once; opaque to torch.compile; autograd through register_autograd).
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("kvpo::routed_attention", mutates_args=())
def _routed_attention_op(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_table: torch.Tensor,
    page_lens: torch.Tensor | None,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    _checks.check_page_values(page_table, page_lens, k_pages.shape[0], k_pages.shape[2])
    q, k_pages, v_pages = q.contiguous(), k_pages.contiguous(), v_pages.contiguous()
    page_table = page_table.contiguous()
    page_lens = None if page_lens is None else page_lens.contiguous()
    out, lse = _KERNELS[backend][0](q, k_pages, v_pages, page_table, page_lens, scale)
    return out, lse.to(_backend.acc_dtype(q.dtype))


@_routed_attention_op.register_fake
def _(q, k_pages, v_pages, page_table, page_lens, scale, backend):
    B, H, Lq, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, H, Lq), dtype=_backend.acc_dtype(q.dtype))


@torch.library.custom_op("kvpo::routed_attention_backward", mutates_args=())
def _routed_attention_backward_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_table: torch.Tensor,
    page_lens: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = [t.contiguous() for t in (dout, q, k_pages, v_pages, page_table)]
    page_lens = None if page_lens is None else page_lens.contiguous()
    return tuple(
        g.contiguous()
        for g in _KERNELS[backend][1](
            *args, page_lens, out.contiguous(), lse.contiguous(), delta.contiguous(), scale
        )
    )


@_routed_attention_backward_op.register_fake
def _(dout, q, k_pages, v_pages, page_table, page_lens, out, lse, delta, scale, backend):
    return torch.empty_like(q), torch.empty_like(k_pages), torch.empty_like(v_pages)


def _setup_context(ctx, inputs, output):
    q, k_pages, v_pages, page_table, page_lens, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k_pages, v_pages, page_table, page_lens, out, lse)
    ctx.scale, ctx.backend = scale, backend


def _backward(ctx, dout, dlse):
    q, k_pages, v_pages, page_table, page_lens, out, lse = ctx.saved_tensors
    acc = _backend.acc_dtype(q.dtype)
    if dout is None:
        dout = torch.zeros_like(out)
    delta = (dout.to(acc) * out.to(acc)).sum(-1)
    if dlse is not None:
        # Rows without a key have lse = -inf and no gradient path: ignore their dlse.
        delta = delta - torch.where(torch.isfinite(lse), dlse.to(acc), torch.zeros_like(delta))
    dq, dk, dv = _routed_attention_backward_op(
        dout, q, k_pages, v_pages, page_table, page_lens, out, lse, delta, ctx.scale, ctx.backend
    )
    return dq, dk, dv, None, None, None, None


_routed_attention_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def routed_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_table: torch.Tensor,
    page_lens: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of many rows over one shared paged KV cache, each row through its page table.

    Args:
        q: [B, H, Lq, D] float16 / bfloat16 / float32 / float64 (B = prompts x branches).
        k_pages, v_pages: [P, Hkv, page_size, D], dtype of q; physical pages shared by all rows.
            ``H % Hkv == 0`` (grouped-query attention: query head h reads KV head h // (H // Hkv)).
        page_table: [B, max_pages] int32; entry j of row b is the physical page of the row's j-th
            logical page, or -1 (routed out / absent). Rows may list the same page.
        page_lens: [P] int32, optional: valid tokens of each physical page (a partly filled page).
        scale: softmax scale, default ``D ** -0.5``.
        backend: ``auto`` | ``reference`` | ``cpu`` | ``cuda`` | ``triton`` (see
            :mod:`kvpo_kernels._backend`).

    Attention is full over the kept tokens (express causality by which pages a row lists).

    Returns:
        out: [B, H, Lq, D], dtype of q; lse: [B, H, Lq] float32 (float64 for float64 inputs), the
        log-sum-exp of the scaled scores. A row that keeps no token gives out = 0, lse = -inf.

    Differentiable in q, k_pages and v_pages (gradients of a page shared by rows are summed), and
    through both outputs. Page indices are validated (one reduction; a host sync on CUDA).
    """
    _checks.check_routed_attention(q, k_pages, v_pages, page_table, page_lens)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    name = _backend.resolve(OP, q.device, backend, native_op="routed_attn_fwd", dtype=q.dtype)
    return _routed_attention_op(q, k_pages, v_pages, page_table, page_lens, scale, name)


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attentions over disjoint key sets by their log-sum-exps.

    out_a, out_b: [..., D]; lse_a, lse_b: [...] (as returned by :func:`routed_attention`).
    Returns (out [..., D] in the dtype of out_a, lse [...] in the dtype of lse_a). Sides with
    lse = -inf contribute nothing; if both are empty, out = 0 and lse = -inf. Differentiable.
    """
    if out_a.shape != out_b.shape or lse_a.shape != lse_b.shape:
        raise ValueError(
            f"merge_attention: shapes differ: out {tuple(out_a.shape)} vs {tuple(out_b.shape)}, "
            f"lse {tuple(lse_a.shape)} vs {tuple(lse_b.shape)}"
        )
    if out_a.shape[:-1] != lse_a.shape:
        raise ValueError(
            f"merge_attention: lse must be out's shape without D: out {tuple(out_a.shape)}, "
            f"lse {tuple(lse_a.shape)}"
        )
    acc = _backend.acc_dtype(out_a.dtype)
    la, lb = lse_a.to(acc), lse_b.to(acc)
    m = torch.maximum(la, lb)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    wa, wb = torch.exp(la - m), torch.exp(lb - m)
    total = wa + wb
    nonempty = total > 0
    safe_total = torch.where(nonempty, total, torch.ones_like(total))
    out = (wa[..., None] * out_a.to(acc) + wb[..., None] * out_b.to(acc)) / safe_total[..., None]
    lse = torch.where(nonempty, m + torch.log(safe_total), torch.full_like(m, float("-inf")))
    return out.to(out_a.dtype), lse.to(lse_a.dtype)


def route_pages(
    page_table: torch.Tensor,
    num_branches: int,
    p_keep: float,
    droppable: torch.Tensor,
    *,
    sink_pages: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Build per-branch page tables by stochastic KV routing (KVPO's causal-semantic exploration).

    Args:
        page_table: [B, N] int32 (or [N]): each prompt's unperturbed, deployment-time table.
        num_branches: G, branches per prompt.
        p_keep: probability in [0, 1] that a droppable page is kept, independently per branch.
        droppable: [N] or [B, N] bool: logical slots that may be routed out (the historical pages
            of the perturbed window). The current chunk and the most recent frame should not be
            droppable.
        sink_pages: the first ``sink_pages`` logical slots are always kept, even if droppable.
        generator: ``torch.Generator`` (CPU) for reproducible routing.

    Returns:
        [B * G, N] int32 on the device of ``page_table``; row ``b * G + g`` is branch g of prompt b,
        routed-out slots hold -1. Slots that are not droppable are copied unchanged.
    """
    _checks.require_tensor("page_table", page_table)
    _checks.require_tensor("droppable", droppable)
    if page_table.dtype != torch.int32:
        raise TypeError(f"page_table must be int32, got {page_table.dtype}")
    table = page_table[None] if page_table.dim() == 1 else page_table
    if table.dim() != 2:
        raise ValueError(f"page_table must be [N] or [B, N], got shape {tuple(page_table.shape)}")
    B, N = table.shape
    if not isinstance(num_branches, int) or num_branches < 1:
        raise ValueError(f"num_branches must be a positive int, got {num_branches!r}")
    if not 0.0 <= float(p_keep) <= 1.0:
        raise ValueError(f"p_keep must be in [0, 1], got {p_keep}")
    if droppable.dtype != torch.bool or droppable.shape not in ((N,), (B, N)):
        raise ValueError(
            f"droppable must be bool [N]={[N]} or [B, N]={[B, N]}, got shape "
            f"{tuple(droppable.shape)}, dtype {droppable.dtype}"
        )
    if not 0 <= sink_pages <= N:
        raise ValueError(f"sink_pages must be in [0, N={N}], got {sink_pages}")
    G = num_branches
    drop_ok = droppable.to(torch.bool).cpu().expand(B, N).clone()
    drop_ok[:, :sink_pages] = False
    u = torch.rand((B, G, N), generator=generator)
    routed_out = (u >= p_keep) & drop_ok[:, None, :]
    out = table.cpu()[:, None, :].expand(B, G, N).masked_fill(routed_out, -1)
    return out.reshape(B * G, N).contiguous().to(page_table.device)
