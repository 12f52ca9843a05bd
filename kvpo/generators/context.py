"""Page tables of the deployment-time context, shared by pretraining, rollout and replay.

A video's frame ``a`` lives in some physical page; ``page_map[n, a]`` says which (pages of frames
shared by several branches have the same id in each branch's map). A row denoising chunk ``j``
sees the sink frames, the local window of frames before the chunk, and its own pages.

At a prompt switch a generator with KV re-cache (its ``recache`` attribute) re-encodes history
under the new prompt, by one of two policies:

* ``longlive`` (LongLive's ``_recache_after_switch``): the last ``min(W, a)`` frames before the
  switch frame ``a`` (``W`` = LongLive's ``local_attn_size`` = sinks + local window + chunk) in
  ONE pass at t = 0, each frame of the pass attending to the cache as the pass leaves it. With
  ``global_sink`` (LongLive's inference default) the sink frames keep their old-prompt K/V and
  the pass's frames after its first ``sink_frames`` replace theirs (the first ones are computed
  and dropped); without it the cache is cleared, every frame of the pass is written and its
  first ``sink_frames`` frames are the sinks for the rest of the video.
* ``chunkwise`` (this project's variant): every chunk holding a frame the switch chunk sees is
  re-encoded in order, block-causally, each attending to its deployment context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from kvpo.generators.interface import StreamingVideoGenerator


def chunk_conditioning(model: StreamingVideoGenerator, prompts: list[list[str]]) -> torch.Tensor:
    """Prompt conditioning of every chunk, [N, chunks, C], from N lists of one prompt per chunk;
    each distinct prompt is encoded once."""
    uniq = sorted({p for ps in prompts for p in ps})
    emb = model.encode_prompts(uniq)
    where = {p: i for i, p in enumerate(uniq)}
    return emb[torch.tensor([[where[p] for p in ps] for ps in prompts], device=emb.device)]


RECACHE_POLICIES = ("none", "longlive", "chunkwise")


def recache_policy(value: object, what: str = "recache") -> str:
    """The KV re-cache policy ``value`` names: one of :data:`RECACHE_POLICIES`; a bool (or
    ``"true"`` / ``"false"``) is ``longlive`` or ``none``. A ValueError naming ``what`` otherwise."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if isinstance(value, bool) or value is None:
        return "longlive" if value else "none"
    if value not in RECACHE_POLICIES:
        raise ValueError(f"{what}={value!r} must be one of {', '.join(RECACHE_POLICIES)} or a bool")
    return value


def recache_of(model: StreamingVideoGenerator) -> str:
    """The generator's KV re-cache policy (its ``recache`` attribute; none without one)."""
    return recache_policy(getattr(model, "recache", None), f"{type(model).__name__}.recache")


def recaches(model: StreamingVideoGenerator) -> bool:
    """Whether the generator re-caches its KV at a prompt switch."""
    return recache_of(model) != "none"


def visible_frames(model: StreamingVideoGenerator, chunk: int, sinks_from: int = 0) -> list[int]:
    """Absolute indices of the history frames chunk ``chunk`` attends to at deployment: the
    ``sink_frames`` frames from ``sinks_from`` (0 but after a LongLive re-cache without global
    sinks) and the ``local_window`` frames before the chunk."""
    start = chunk * model.chunk_frames
    if model.local_window is None:
        return list(range(start))
    sinks = list(range(sinks_from, min(sinks_from + model.sink_frames, start)))
    return sinks + list(
        range(max(sinks_from + model.sink_frames, start - model.local_window), start)
    )


def prompt_switches(prompts: list[str]) -> list[int]:
    """Chunks at which a video's prompt changes; each starts a new prompt segment."""
    return [j for j in range(1, len(prompts)) if prompts[j] != prompts[j - 1]]


class Recache(NamedTuple):
    """One LongLive re-cache pass at a prompt switch (see the module's docstring)."""

    frames: list[int]  # re-encoded under the new prompt at t = 0, in one pass
    written: list[int]  # of those, the frames whose K/V replace the old in the cache
    kept: list[int]  # frames whose old K/V the pass attends to besides ``written`` (sinks)
    sinks_from: int  # the first sink frame from the switch on


def longlive_recache(model: StreamingVideoGenerator, chunk: int) -> Recache:
    """LongLive's re-cache when the prompt switches at ``chunk``."""
    a, S = chunk * model.chunk_frames, model.sink_frames
    window = a if model.local_window is None else S + model.local_window + model.chunk_frames
    frames = list(range(a - min(window, a), a))
    if getattr(model, "global_sink", True):
        return Recache(frames, frames[S:], list(range(min(S, a))), 0)
    return Recache(frames, frames, [], frames[0] if frames else 0)


def recache_chunks(model: StreamingVideoGenerator, chunk: int) -> list[int]:
    """Chunks whose clean frames are re-encoded under the new prompt when it switches at
    ``chunk``, in order: those holding a frame of LongLive's pass, or (``chunkwise``) every
    earlier chunk holding a frame that ``chunk`` attends to."""
    if recache_of(model) == "longlive":
        frames = longlive_recache(model, chunk).frames
    else:
        frames = visible_frames(model, chunk)
    return sorted({f // model.chunk_frames for f in frames})


def context_width(model: StreamingVideoGenerator, chunks: int) -> int:
    """Columns of a page table wide enough for any of the ``chunks`` chunks: its visible history
    frames and its own."""
    return max(len(visible_frames(model, j)) for j in range(chunks)) + model.chunk_frames


def context_table(
    model: StreamingVideoGenerator,
    page_map: torch.Tensor,
    video: torch.Tensor,
    chunk: torch.Tensor,
    own_pages: torch.Tensor | None,
    width: int | None = None,
    sinks_from: torch.Tensor | None = None,
) -> torch.Tensor:
    """Deployment-time page table of R rows.

    Args:
        page_map: [N, F] int64 page of each frame of each video (-1 where not yet made).
        video, chunk: [R] int64 which video and chunk each row denoises.
        own_pages: [R, chunk_frames] int64 pages of the row's own frames, or None for a
            history-only table.
        width: table width (default: just wide enough).
        sinks_from: [R] int64 each row's first sink frame (:func:`visible_frames`; default 0).

    Returns:
        [R, width] int32: the visible history pages, then the own pages, then -1 padding.
    """
    R = video.shape[0]
    c = model.chunk_frames if own_pages is not None else 0
    s0 = [0] * R if sinks_from is None else sinks_from.tolist()
    cols = [visible_frames(model, int(j), s) for j, s in zip(chunk.tolist(), s0, strict=True)]
    need = max((len(v) for v in cols), default=0) + c
    width = need if width is None else width
    if width < need:
        raise ValueError(f"width={width} is smaller than the {need} pages a row needs")
    table = torch.full((R, width), -1, dtype=torch.int64)
    for r, frames in enumerate(cols):
        n = len(frames)
        if n:
            pages = page_map[video[r], torch.tensor(frames)]
            if bool((pages < 0).any()):
                raise ValueError(f"row {r}: a history frame of chunk {int(chunk[r])} has no page")
            table[r, :n] = pages
        if c:
            table[r, n : n + c] = own_pages[r]
    return table.to(torch.int32)


def droppable_columns(model: StreamingVideoGenerator, chunk: int, width: int) -> torch.Tensor:
    """[width] bool: the columns of a chunk's table that KV routing may drop.

    Sinks, the most recent history frame and the chunk's own pages always stay.
    """
    n = len(visible_frames(model, chunk))
    mask = torch.zeros(width, dtype=torch.bool)
    mask[model.sink_frames : max(n - 1, model.sink_frames)] = True
    return mask


def teacher_forcing(
    model: StreamingVideoGenerator,
    clean: torch.Tensor,
    clean_cond: torch.Tensor,
    clean_chunk: torch.Tensor,
    clean_table: torch.Tensor,
    noisy: torch.Tensor,
    t: torch.Tensor,
    noisy_cond: torch.Tensor,
    noisy_chunk: torch.Tensor,
    noisy_context: torch.Tensor,
) -> torch.Tensor:
    """One differentiable forward of clean context rows and noisy rows (no cache).

    Clean row r owns pages ``r * c + f``; page ids in ``clean_table`` and ``noisy_context`` refer
    to those. Noisy rows attend to ``noisy_context`` (history pages, -1 padded) plus their own
    pages, which are appended here.

    Args:
        clean: [Rc, c*T, d] clean chunks (t = 0); clean_cond: [Rc, C]; clean_chunk: [Rc] int64;
            clean_table: [Rc, W] int32 (history and own pages).
        noisy: [Rn, c*T, d]; t: [Rn]; noisy_cond: [Rn, C]; noisy_chunk: [Rn] int64;
            noisy_context: [Rn, W'] int32 history pages only.

    Returns:
        [Rn, c*T, d] velocity of the noisy rows.
    """
    c = model.chunk_frames
    Rc, Rn = clean.shape[0], noisy.shape[0]
    own = (Rc + torch.arange(Rn))[:, None] * c + torch.arange(c)
    noisy_table = torch.cat([noisy_context, own.to(torch.int32)], dim=1)
    W = max(clean_table.shape[1], noisy_table.shape[1])
    pad = lambda tab: torch.nn.functional.pad(tab, (0, W - tab.shape[1]), value=-1)  # noqa: E731
    table = torch.cat([pad(clean_table), pad(noisy_table)]).to(noisy.device)
    x = torch.cat([clean, noisy])
    tt = torch.cat([torch.zeros(Rc, device=t.device, dtype=t.dtype), t])
    cond = torch.cat([clean_cond, noisy_cond])
    chunk = torch.cat([clean_chunk, noisy_chunk]).to(noisy.device)
    frame_index = chunk[:, None] * c + torch.arange(c, device=noisy.device)
    return model(x, tt, cond, frame_index, table)[Rc:]


class _CleanRow(NamedTuple):
    group: int
    branch: int  # 0 for a row shared by the group's branches
    chunk: int
    made_at: int  # the chunk whose prompt conditions it (a re-cache: the switch's)
    segment: int
    shared: bool
    recache: Recache | None = None  # the LongLive pass it belongs to


@dataclass
class CleanContext:
    """Clean rows that rebuild the deployment-time KV pages of videos in one teacher-forcing pass.

    Clean row r (chunk ``chunk[r]`` of some video, under conditioning ``cond[r]``) owns pages
    ``r * chunk_frames + f``. ``page_map`` has one row per (video, prompt segment): which page each
    frame has for the chunks of that segment; with KV re-cache a switch re-encodes the frames the
    new segment sees, so their pages differ from the previous segment's.
    """

    tokens: torch.Tensor  # [Rc, c*T, d] clean chunks
    cond: torch.Tensor  # [Rc, C]
    chunk: torch.Tensor  # [Rc] int64
    table: torch.Tensor  # [Rc, W] int32 history and own pages of each clean row
    page_map: torch.Tensor  # [V * S, F] int64
    sinks_from: torch.Tensor  # [V * S] int64 first sink frame of each page-map row
    segment_starts: list[list[int]]  # per group b: first chunk of each prompt segment
    branches: int  # G videos per group
    segments: int  # S page-map rows per video

    def map_rows(self, video: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
        """[R] page-map row of video ``video[r]`` (index ``b * G + g``) when making ``chunk[r]``."""
        seg = [
            sum(a <= int(j) for a in self.segment_starts[int(v) // self.branches][1:])
            for v, j in zip(video.tolist(), chunk.tolist(), strict=True)
        ]
        return video * self.segments + torch.tensor(seg, dtype=torch.long)

    def history(self, model: StreamingVideoGenerator, video: torch.Tensor, chunk: torch.Tensor):
        """[R, W] int32 history pages of video ``video[r]`` making chunk ``chunk[r]``."""
        rows = self.map_rows(video, chunk)
        return context_table(model, self.page_map, rows, chunk, None, None, self.sinks_from[rows])


def _clean_rows(
    model: StreamingVideoGenerator, starts: list[list[int]], G: int, nC: int, shared: int, last: int
) -> list[_CleanRow]:
    """Clean rows in making order (see :func:`clean_context`)."""
    policy = recache_of(model)
    rows: list[_CleanRow] = []
    for b, group_starts in enumerate(starts):
        bounds = [*group_starts, nC]
        for k, a in enumerate(group_starts):
            if a > last:
                break
            plan = longlive_recache(model, a) if k and policy == "longlive" else None
            recache = recache_chunks(model, a) if k else []
            for i in recache + list(range(a, min(bounds[k + 1], last))):
                # a re-cache (i < a) is made at the switch, an original row at its own chunk;
                # what is made before the fork is made once per group
                made_at = a if i < a else i
                row = _CleanRow(b, 0, i, made_at, k, made_at < shared, plan if i < a else None)
                rows += [row] if row.shared else [row._replace(branch=g) for g in range(G)]
    return rows


def clean_context(
    model: StreamingVideoGenerator,
    tokens: torch.Tensor,
    prompts: list[list[str]],
    shared: int,
    last: int,
) -> CleanContext:
    """The clean rows that chunks ``0..last`` of B groups of G videos attend to at deployment.

    Args:
        tokens: [B, G, F, T, d] clean frames; the first ``shared`` chunks are the same in every
            video of a group (the rollout's shared prefix) and are encoded once per group.
        prompts: B lists of one prompt per chunk.
        shared: chunks made once per group (with their KV re-caches at switches before ``shared``).
        last: the last chunk that will attend to the context; clean rows cover chunks < ``last``.

    Without re-cache this is one clean row per chunk < ``last`` (per group for the shared ones).
    With it, a prompt switch at chunk ``a <= last`` adds rows re-encoding :func:`recache_chunks`
    under chunk ``a``'s prompt, as streaming sampling does: block-causally (``chunkwise``), or as
    one LongLive pass whose rows attend to the pass's kept and written frames (``longlive``).
    """
    B, G, Fr, T, d = tokens.shape
    c = model.chunk_frames
    nC = Fr // c
    cond_bj = chunk_conditioning(model, prompts)
    starts = [[0] + (prompt_switches(p) if recaches(model) else []) for p in prompts]
    S = max(len(s) for s in starts)
    rows = _clean_rows(model, starts, G, nC, shared, last)
    Rc = len(rows)
    page_map = torch.full((B * G * S, Fr), -1, dtype=torch.long)
    sinks_from = torch.zeros(B * G * S, dtype=torch.long)
    for r, row in enumerate(rows):  # in making order: a later re-cache overwrites
        frames = range(row.chunk * c, (row.chunk + 1) * c)
        if row.recache is not None:
            frames = [f for f in frames if f in row.recache.written]
        for g in range(G) if row.shared else [row.branch]:
            for k in range(row.segment, S):
                m = (row.group * G + g) * S + k
                for f in frames:
                    page_map[m, f] = r * c + f - row.chunk * c
                if row.recache is not None:
                    sinks_from[m] = row.recache.sinks_from
    rb, rg, ri, rcj, rk = (
        torch.tensor([row[n] for row in rows], dtype=torch.long) for n in range(5)
    )
    own = torch.arange(Rc)[:, None] * c + torch.arange(c)
    mrow = (rb * G + rg) * S + rk
    table = context_table(model, page_map, mrow, ri, own, None, sinks_from[mrow])
    for r, row in enumerate(rows):  # a LongLive pass: every row attends to the pass's cache
        if row.recache is not None:
            keys = page_map[mrow[r], row.recache.kept + row.recache.written]
            table[r] = -1
            table[r, : len(keys)] = keys.to(torch.int32)
    return CleanContext(
        tokens=tokens.reshape(B, G, nC, c * T, d)[rb, rg, ri],
        cond=cond_bj[rb, rcj],
        chunk=ri,
        table=table,
        page_map=page_map,
        sinks_from=sinks_from,
        segment_starts=starts,
        branches=G,
        segments=S,
    )
