"""KV routing: per-branch page tables for KVPO's causal-semantic exploration.

Both helpers turn the deployment-time page tables of B prompts into B * G branch tables (row
``b * G + g`` is branch g of prompt b) that :func:`kvpo_kernels.routed_attention` reads; no page is
copied. They run on the host (a few hundred integers per row) with a CPU generator, so a rollout
is reproducible from its seed whatever device the cache lives on.

* :func:`route_pages` - *drop* routing: each droppable slot is kept with probability ``p_keep``.
* :func:`sample_pages` - *sample* routing (the public LongLive recipe): the sinks and the most
  recent pages stay; the other slots of a local attention window are refilled by pages drawn from
  the whole older history, so the window keeps its deployment size but remembers other moments.
"""

from __future__ import annotations

import torch

from . import _checks


def _tables(
    name: str, t: torch.Tensor, num_branches: int, generator: torch.Generator | None
) -> torch.Tensor:
    """The prompts' page tables as [B, N] int32, after checking them, ``num_branches`` and
    ``generator``."""
    _checks.require_tensor(name, t)
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {t.dtype}")
    table = t[None] if t.dim() == 1 else t
    if table.dim() != 2:
        raise ValueError(f"{name} must be [N] or [B, N], got shape {tuple(t.shape)}")
    if not isinstance(num_branches, int) or num_branches < 1:
        raise ValueError(f"num_branches must be a positive int, got {num_branches!r}")
    _checks.require_generator(generator)
    return table


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
    table = _tables("page_table", page_table, num_branches, generator)
    _checks.require_tensor("droppable", droppable)
    B, N = table.shape
    if not 0.0 <= float(p_keep) <= 1.0:
        raise ValueError(f"p_keep must be in [0, 1], got {p_keep}")
    if droppable.dtype != torch.bool or droppable.shape not in ((N,), (B, N)):
        raise ValueError(
            f"droppable must be bool [N]={[N]} or [B, N]={[B, N]}, got shape "
            f"{tuple(droppable.shape)}, dtype {droppable.dtype}"
        )
    if not isinstance(sink_pages, int) or not 0 <= sink_pages <= N:
        raise ValueError(f"sink_pages must be an int in [0, N={N}], got {sink_pages!r}")
    G = num_branches
    drop_ok = droppable.to(torch.bool).cpu().expand(B, N).clone()
    drop_ok[:, :sink_pages] = False
    u = torch.rand((B, G, N), generator=generator)
    routed_out = (u >= p_keep) & drop_ok[:, None, :]
    out = table.cpu()[:, None, :].expand(B, G, N).masked_fill(routed_out, -1)
    return out.reshape(B * G, N).contiguous().to(page_table.device)


def sample_pages(
    history: torch.Tensor,
    num_branches: int,
    slots: int,
    *,
    sink_pages: int = 0,
    recent_pages: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Build per-branch page tables by *sample* routing of a local attention window.

    Every branch keeps the first ``sink_pages`` and the last ``recent_pages`` pages of the history
    and fills ``slots`` more with pages drawn uniformly without replacement from the older pages
    between them, independently per branch. Drawn pages keep their chronological order.

    Args:
        history: [B, N] int32 (or [N]): every history page of each prompt in frame order, not only
            the ones the deployment window shows; -1 marks an older page that may not be drawn.
        num_branches: G, branches per prompt.
        slots: pages drawn per branch (the deployment window's size less sinks and recent pages).
            A row with fewer drawable pages than ``slots`` takes them all and pads with -1.
        sink_pages, recent_pages: pages at the start and end of ``history`` always kept;
            ``sink_pages + recent_pages <= N``.
        generator: ``torch.Generator`` (CPU) for reproducible routing.

    Returns:
        [B * G, sink_pages + slots + recent_pages] int32 on the device of ``history``: the sinks,
        the drawn pages, then the recent pages.
    """
    table = _tables("history", history, num_branches, generator)
    B, N = table.shape
    for name, v in (("slots", slots), ("sink_pages", sink_pages), ("recent_pages", recent_pages)):
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    if sink_pages + recent_pages > N:
        raise ValueError(
            f"sink_pages={sink_pages} + recent_pages={recent_pages} exceed the N={N} history pages"
        )
    G = num_branches
    host = table.cpu()
    older = host[:, sink_pages : N - recent_pages]  # [B, n]
    n = older.shape[1]
    # Uniform draws without replacement: the `slots` smallest random keys among drawable pages.
    keys = torch.rand((B, G, n), generator=generator)
    keys = keys.masked_fill((older < 0)[:, None, :], 2.0)
    take = min(slots, n)
    idx = keys.topk(take, dim=-1, largest=False).indices.sort(-1).values
    drawn = older[:, None, :].expand(B, G, n).gather(-1, idx)
    drawn = drawn.masked_fill(keys.gather(-1, idx) >= 2.0, -1)
    pad = torch.full((B, G, slots - take), -1, dtype=torch.int32)
    sinks = host[:, None, :sink_pages].expand(B, G, sink_pages)
    recent = host[:, None, N - recent_pages :].expand(B, G, recent_pages)
    out = torch.cat([sinks, drawn, pad, recent], dim=-1)
    return out.reshape(B * G, -1).contiguous().to(history.device)
