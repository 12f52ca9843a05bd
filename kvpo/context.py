"""Page tables of the deployment-time context, shared by pretraining, rollout and replay.

A video's frame ``a`` lives in some physical page; ``page_map[n, a]`` says which (pages of frames
shared by several branches have the same id in each branch's map). A row denoising chunk ``j``
sees the sink frames, the local window of frames before the chunk, and its own pages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .interface import StreamingVideoGenerator


def chunk_conditioning(model: StreamingVideoGenerator, prompts: list[list[str]]) -> torch.Tensor:
    """Prompt conditioning of every chunk, [N, chunks, C], from N lists of one prompt per chunk;
    each distinct prompt is encoded once."""
    uniq = sorted({p for ps in prompts for p in ps})
    emb = model.encode_prompts(uniq)
    where = {p: i for i, p in enumerate(uniq)}
    return emb[torch.tensor([[where[p] for p in ps] for ps in prompts], device=emb.device)]


def visible_frames(model: StreamingVideoGenerator, chunk: int) -> list[int]:
    """Absolute indices of the history frames chunk ``chunk`` attends to at deployment."""
    start = chunk * model.chunk_frames
    if model.local_window is None or start <= model.sink_frames + model.local_window:
        return list(range(start))
    sinks = list(range(model.sink_frames))
    return sinks + list(range(start - model.local_window, start))


def prompt_switches(prompts: list[str]) -> list[int]:
    """Chunks at which a video's prompt changes; each starts a new prompt segment."""
    return [j for j in range(1, len(prompts)) if prompts[j] != prompts[j - 1]]


def recache_chunks(model: StreamingVideoGenerator, chunk: int) -> list[int]:
    """Chunks re-encoded under the new prompt when it switches at ``chunk`` (LongLive's KV
    re-cache): every earlier chunk holding a frame that ``chunk`` attends to, in order."""
    return sorted({f // model.chunk_frames for f in visible_frames(model, chunk)})


def recaches(model: StreamingVideoGenerator) -> bool:
    """Whether the generator re-caches its KV at a prompt switch (``model.recache``)."""
    return bool(getattr(model, "recache", False))


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
) -> torch.Tensor:
    """Deployment-time page table of R rows.

    Args:
        page_map: [N, F] int64 page of each frame of each video (-1 where not yet made).
        video, chunk: [R] int64 which video and chunk each row denoises.
        own_pages: [R, chunk_frames] int64 pages of the row's own frames, or None for a
            history-only table.
        width: table width (default: just wide enough).

    Returns:
        [R, width] int32: the visible history pages, then the own pages, then -1 padding.
    """
    R = video.shape[0]
    c = model.chunk_frames if own_pages is not None else 0
    cols = [visible_frames(model, int(j)) for j in chunk.tolist()]
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
    With it (``model.recache``), a prompt switch at chunk ``a <= last`` adds rows re-encoding
    :func:`recache_chunks` under chunk ``a``'s prompt, in order, as streaming sampling does.
    """
    B, G, Fr, T, d = tokens.shape
    c = model.chunk_frames
    nC = Fr // c
    cond_bj = chunk_conditioning(model, prompts)
    starts = [[0] + (prompt_switches(p) if recaches(model) else []) for p in prompts]
    S = max(len(s) for s in starts)
    rows: list[_CleanRow] = []
    for b in range(B):
        bounds = [*starts[b], nC]
        for k, a in enumerate(starts[b]):
            if a > last:
                break
            recache = recache_chunks(model, a) if k else []
            for i in recache + list(range(a, min(bounds[k + 1], last))):
                # a re-cache (i < a) is made at the switch, an original row at its own chunk;
                # what is made before the fork is made once per group
                made_at = a if i < a else i
                if made_at < shared:
                    rows.append(_CleanRow(b, 0, i, made_at, k, True))
                else:
                    rows += [_CleanRow(b, g, i, made_at, k, False) for g in range(G)]
    Rc = len(rows)
    page_map = torch.full((B * G * S, Fr), -1, dtype=torch.long)
    for r, row in enumerate(rows):  # in making order: a later re-cache overwrites
        for g in range(G) if row.shared else [row.branch]:
            for k in range(row.segment, S):
                frames = slice(row.chunk * c, (row.chunk + 1) * c)
                page_map[(row.group * G + g) * S + k, frames] = r * c + torch.arange(c)
    rb, rg, ri, rcj, rk = (
        torch.tensor([row[n] for row in rows], dtype=torch.long) for n in range(5)
    )
    own = torch.arange(Rc)[:, None] * c + torch.arange(c)
    table = context_table(model, page_map, (rb * G + rg) * S + rk, ri, own)
    return CleanContext(
        tokens=tokens.reshape(B, G, nC, c * T, d)[rb, rg, ri],
        cond=cond_bj[rb, rcj],
        chunk=ri,
        table=table,
        page_map=page_map,
        segment_starts=starts,
        branches=G,
        segments=S,
    )
