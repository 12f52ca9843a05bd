"""Pure-PyTorch references of the kvpo ops, written for clarity; the ground truth of every test.

They run in the dtype of their inputs (call them on float64 inputs for the ground truth) and are
differentiable by autograd, so their gradients are the reference gradients too.
"""

from __future__ import annotations

import math

import torch


def gather_pages(
    pages: torch.Tensor, page_table: torch.Tensor, page_lens: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather each row's pages into a dense sequence.

    pages: [P, Hkv, page_size, D]; page_table: [B, N] int (-1 = absent); page_lens: [P] int or None.
    Returns seq [B, Hkv, N * page_size, D] (absent slots hold page 0, masked out) and the validity
    mask [B, N * page_size] bool.
    """
    P, Hkv, S, D = pages.shape
    B, N = page_table.shape
    idx = page_table.long().clamp_min(0)
    seq = pages[idx]  # [B, N, Hkv, S, D]
    seq = seq.permute(0, 2, 1, 3, 4).reshape(B, Hkv, N * S, D)
    valid = (page_table >= 0)[:, :, None].expand(B, N, S)
    if page_lens is not None:
        tok = torch.arange(S, device=pages.device)
        valid = valid & (tok[None, None, :] < page_lens.long()[idx][:, :, None])
    return seq, valid.reshape(B, N * S)


def routed_attention_reference(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_table: torch.Tensor,
    page_lens: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each row of q over the tokens of the pages its table row lists.

    q: [B, H, Lq, D]; k_pages, v_pages: [P, Hkv, page_size, D]; page_table: [B, N] int;
    page_lens: [P] int or None. Returns out [B, H, Lq, D] and lse [B, H, Lq], both in the dtype of
    q; rows without a kept token give out = 0 and lse = -inf.
    """
    B, H, Lq, D = q.shape
    Hkv = k_pages.shape[1]
    scale = D**-0.5 if scale is None else scale
    k, valid = gather_pages(k_pages, page_table, page_lens)
    v, _ = gather_pages(v_pages, page_table, page_lens)
    k = k.repeat_interleave(H // Hkv, dim=1)
    v = v.repeat_interleave(H // Hkv, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    mask = valid[:, None, None, :]
    scores = scores.masked_fill(~mask, float("-inf"))
    has_key = mask.any(-1)  # [B, 1, 1]
    # Empty rows get a finite stand-in so that neither the forward nor autograd meets -inf - -inf.
    lse_safe = torch.logsumexp(scores.masked_fill(~has_key[..., None], 0.0), dim=-1)
    probs = torch.exp(scores - lse_safe[..., None])
    out = probs @ v
    lse = lse_safe.masked_fill(~has_key, float("-inf"))
    return out, lse


def velocity_energy_reference(
    v_pred: torch.Tensor,
    v_ref: torch.Tensor,
    weight: torch.Tensor | None = None,
    reduction: str = "sum",
) -> torch.Tensor:
    """energy[g] = sum_s weight[g, s] * reduce_n (v_pred[g, s, n] - v_ref[g, s, n])^2.

    v_pred, v_ref: [G, S, ...]; weight: [S], [G, S] or None (ones); reduction: "sum" or "mean" over
    the trailing dims. Returns energy [G] in the dtype of the inputs.
    """
    G, S = v_pred.shape[:2]
    diff = (v_pred - v_ref).reshape(G, S, math.prod(v_pred.shape[2:]))
    per_step = diff.pow(2).sum(-1) if reduction == "sum" else diff.pow(2).mean(-1)
    if weight is None:
        return per_step.sum(-1)
    return (weight.to(per_step.dtype).expand(G, S) * per_step).sum(-1)


def routed_attention_backward_reference(
    dout: torch.Tensor,
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_table: torch.Tensor,
    page_lens: torch.Tensor | None,
    lse: torch.Tensor,
    delta: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Closed-form gradients of :func:`routed_attention_reference`.

    dout: [B, H, Lq, D]; lse, delta: [B, H, Lq] with delta = rowsum(dout * out) - dlse.
    Returns dq [B, H, Lq, D], dk_pages and dv_pages [P, Hkv, page_size, D] (pages listed by several
    rows receive the sum of their gradients).
    """
    B, H, Lq, D = q.shape
    P, Hkv, S, _ = k_pages.shape
    N = page_table.shape[1]
    group = H // Hkv
    k, valid = gather_pages(k_pages, page_table, page_lens)
    v, _ = gather_pages(v_pages, page_table, page_lens)
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    mask = valid[:, None, None, :]
    lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    scores = ((q @ k.transpose(-1, -2)) * scale).masked_fill(~mask, float("-inf"))
    probs = torch.exp(scores - lse_safe[..., None])
    dprobs = dout @ v.transpose(-1, -2)
    dscores = probs * (dprobs - delta[..., None])
    dq = (dscores @ k) * scale
    dk_seq = (dscores.transpose(-1, -2) @ q) * scale  # [B, H, N*S, D]
    dv_seq = probs.transpose(-1, -2) @ dout

    def scatter(seq: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        seq = seq.reshape(B, Hkv, group, N, S, D).sum(2).permute(0, 2, 1, 3, 4)  # [B, N, Hkv, S, D]
        kept = page_table.reshape(-1) >= 0
        grad = torch.zeros_like(like)
        grad.index_add_(0, page_table.reshape(-1)[kept].long(), seq.reshape(B * N, Hkv, S, D)[kept])
        return grad

    return dq, scatter(dk_seq, k_pages), scatter(dv_seq, v_pages)
