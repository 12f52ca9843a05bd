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
# each backward takes delta = rowsum(dout * out) - dlse and returns (dq, dk_pages, dv_pages);
# deterministic=False lets it add dq with atomics (the reference and CPU kernels ignore it).
# --------------------------------------------------------------------------------------------


def _fwd_reference(q, k_pages, v_pages, page_table, page_lens, scale):
    acc = _backend.acc_dtype(q.dtype)
    out, lse = routed_attention_reference(
        q.to(acc), k_pages.to(acc), v_pages.to(acc), page_table, page_lens, scale
    )
    return out.to(q.dtype), lse


def _bwd_reference(dout, q, k_pages, v_pages, page_table, page_lens, out, lse, delta, scale, det):
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


def _bwd_native(dout, q, k_pages, v_pages, page_table, page_lens, out, lse, delta, scale, det):
    return torch.ops.kvpo.routed_attn_bwd(
        dout, q, k_pages, v_pages, page_table, page_lens, lse, delta, scale, det
    )


# The CUDA C++ kernels cover the tensor-core cases.
CUDA_DTYPES = (torch.float16, torch.bfloat16)
CUDA_HEAD_DIMS = (64, 128)


def _fwd_cuda(q, k_pages, v_pages, page_table, page_lens, scale):
    if q.dtype not in CUDA_DTYPES or q.shape[-1] not in CUDA_HEAD_DIMS:
        raise TypeError(
            f"routed_attention backend 'cuda' takes {CUDA_DTYPES} with head dim in "
            f"{CUDA_HEAD_DIMS}, got {q.dtype} with head dim {q.shape[-1]} (use backend='triton')"
        )
    return _fwd_native(q, k_pages, v_pages, page_table, page_lens, scale)


def _fwd_triton(q, k_pages, v_pages, page_table, page_lens, scale):
    from .triton.routed_attention import routed_attention_fwd

    return routed_attention_fwd(q, k_pages, v_pages, page_table, page_lens, scale)


def _tma(q: torch.Tensor, *tensors: torch.Tensor):
    """The TMA kernels' module once it takes q's dtype and head dim, and ``tensors`` each
    starting on 16 bytes (TMA's requirement; a copy where not)."""
    from .triton import routed_attention_tma as tma

    if (why := tma.supported(q.dtype, q.shape[-1])) is not None:
        raise TypeError(f"routed_attention backend 'triton_tma' {why} (use backend='triton')")
    return tma, [t if t.data_ptr() % 16 == 0 else t.clone() for t in tensors]


def _fwd_triton_tma(q, k_pages, v_pages, page_table, page_lens, scale):
    tma, (q, k_pages, v_pages) = _tma(q, q, k_pages, v_pages)
    return tma.routed_attention_fwd(q, k_pages, v_pages, page_table, page_lens, scale)


def _bwd_triton_tma(dout, q, k_pages, v_pages, page_table, page_lens, out, lse, delta, scale, det):
    tma, (dout, q, k_pages, v_pages) = _tma(q, dout, q, k_pages, v_pages)
    args = (dout, q, k_pages, v_pages, page_table, page_lens, lse, delta, scale, det)
    return tma.routed_attention_bwd(*args)


def _bwd_triton(dout, q, k_pages, v_pages, page_table, page_lens, out, lse, delta, scale, det):
    from .triton.routed_attention import routed_attention_bwd

    args = (dout, q, k_pages, v_pages, page_table, page_lens, lse, delta, scale, det)
    return routed_attention_bwd(*args)


_KERNELS = {
    "reference": (_fwd_reference, _bwd_reference),
    "cpu": (_fwd_native, _bwd_native),
    "cuda": (_fwd_cuda, _bwd_native),  # the binding refuses what the CUDA backward cannot take
    "triton": (_fwd_triton, _bwd_triton),
    "triton_tma": (_fwd_triton_tma, _bwd_triton_tma),
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
    backward_backend: str,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    _checks.check_page_values(page_table, page_lens, k_pages.shape[0], k_pages.shape[2])
    q, k_pages, v_pages = q.contiguous(), k_pages.contiguous(), v_pages.contiguous()
    page_table = page_table.contiguous()
    page_lens = None if page_lens is None else page_lens.contiguous()
    out, lse = _KERNELS[backend][0](q, k_pages, v_pages, page_table, page_lens, scale)
    return out, lse.to(_backend.acc_dtype(q.dtype))


@_routed_attention_op.register_fake
def _(q, k_pages, v_pages, page_table, page_lens, scale, backend, backward_backend, det):
    # contiguous, as every backend returns them, whatever q's strides (empty_like would keep a
    # permuted q's): torch.compile trusts these strides
    B, H, Lq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, Lq), dtype=_backend.acc_dtype(q.dtype))


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
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = [t.contiguous() for t in (dout, q, k_pages, v_pages, page_table)]
    page_lens = None if page_lens is None else page_lens.contiguous()
    rowwise = (out.contiguous(), lse.contiguous(), delta.contiguous())
    grads = _KERNELS[backend][1](*args, page_lens, *rowwise, scale, deterministic)
    return tuple(g.contiguous() for g in grads)


@_routed_attention_backward_op.register_fake
def _(dout, q, k_pages, v_pages, page_table, page_lens, out, lse, delta, scale, backend, det):
    return tuple(t.new_empty(t.shape) for t in (q, k_pages, v_pages))


def _setup_context(ctx, inputs, output):
    q, k_pages, v_pages, page_table, page_lens, scale, _, backward_backend, det = inputs
    out, lse = output
    ctx.save_for_backward(q, k_pages, v_pages, page_table, page_lens, out, lse)
    ctx.scale, ctx.backend, ctx.deterministic = scale, backward_backend, det


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
        dout, q, k_pages, v_pages, page_table, page_lens, out, lse, delta, ctx.scale, ctx.backend,
        ctx.deterministic,
    )  # fmt: skip
    return dq, dk, dv, None, None, None, None, None, None


_routed_attention_op.register_autograd(_backward, setup_context=_setup_context)
_routed_attention_backward_op.register_autograd(_backend.first_order_only("routed_attention"))


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
    deterministic: bool | None = None,
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
        backend: ``auto`` | ``reference`` | ``cpu`` | ``cuda`` | ``triton`` | ``triton_tma``
            (see :mod:`kvpo_kernels._backend`; ``auto`` picks per direction).
        deterministic: whether the backward gives the same bits on every run (the default).
            ``False`` lets the GPU backends compute the scores once and add ``dq`` with float32
            atomics. ``None``: the environment variable ``KVPO_DETERMINISTIC`` (``0`` turns it
            off), forced on by ``torch.use_deterministic_algorithms(True)``.

    Attention is full over the kept tokens (express causality by which pages a row lists).

    Returns:
        out: [B, H, Lq, D], dtype of q; lse: [B, H, Lq] float32 (float64 for float64 inputs), the
        log-sum-exp of the scaled scores. A row that keeps no token gives out = 0, lse = -inf.

    Differentiable in q, k_pages and v_pages (gradients of a page shared by rows are summed), and
    through both outputs. Page indices and lengths are validated (one host sync per call on
    CUDA). Any strides are taken (the kernels read contiguous copies of strided inputs).
    """
    _checks.check_routed_attention(q, k_pages, v_pages, page_table, page_lens)
    scale = _checks.check_scale(scale, q.shape[-1])
    fwd = _backend.resolve(OP, q.device, backend, "routed_attn_fwd", q.dtype, "forward")
    bwd = _backend.resolve(OP, q.device, backend, "routed_attn_bwd", q.dtype, "backward")
    det = _backend.deterministic(deterministic)
    return _routed_attention_op(q, k_pages, v_pages, page_table, page_lens, scale, fwd, bwd, det)


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attentions over disjoint key sets by their log-sum-exps.

    out_a, out_b: [..., D]; lse_a, lse_b: [...] (as returned by :func:`routed_attention`).
    Returns (out [..., D] in the dtype of out_a, lse [...] in the dtype of lse_a). Sides with
    lse = -inf contribute nothing; if both are empty, out = 0 and lse = -inf. Differentiable.
    """
    _checks.check_merge_attention(out_a, lse_a, out_b, lse_b)
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
