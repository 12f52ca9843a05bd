"""KVPO rollouts: G branches per prompt, explored by KV routing inside a perturbed window.

All branches of a group use the same noise for every chunk. Chunks before the window are made once
per group; their pages are listed by every branch's table (shared, not copied). Inside the window
``[w0, w1)`` each branch's denoising attends to a random subset of the history pages:
``routing="drop"`` keeps each droppable page with probability ``p_keep``
(:func:`kvpo_kernels.route_pages`; sinks, the most recent frame and the chunk itself always kept);
``routing="sample"`` (the public LongLive recipe, for models with a local attention window) keeps
the sinks and the ``recent_frames`` nearest frames and refills the rest of the window with frames
drawn from the whole older history (:func:`kvpo_kernels.sample_pages`).
A chunk's cache pages are written by a clean pass under the branch's full context, and after the
window generation continues under full context. Each chunk is denoised by the generator's own
sampler (:mod:`kvpo.generators.sampler`); with ``renoise`` every branch of a group re-noises with the same
noise at every step, so branches differ only through the routing.

``explore="sde"`` is the Flow-GRPO baseline instead (:mod:`kvpo.method.sde`): no routing; the recorded
steps of the scored chunks are stochastic SDE steps, independent per branch (they replace the
sampler's step there; every other step is the sampler's, with the group's noise), and the
velocity recorded is the step taken, ``(x_{k+1} - x_k) / dt``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from kvpo.generators.context import (
    chunk_conditioning,
    context_table,
    context_width,
    droppable_columns,
    longlive_recache,
    prompt_switches,
    recache_chunks,
    recache_of,
    recaches,
    visible_frames,
)
from kvpo.generators.interface import StreamingVideoGenerator
from kvpo.generators.sampler import renoise_steps, sampler_of, sampler_step
from kvpo.method.sde import sde_step, sde_t_cap
from kvpo_kernels import route_pages, sample_pages


@dataclass
class RolloutSpec:
    """What a rollout explores and records.

    Attributes:
        group_size: G branches per prompt.
        window: perturbed chunks ``[w0, w1)``.
        p_keep: probability that a droppable history page stays in a branch's context
            (``routing="drop"``).
        routing: ``drop`` (each droppable history page kept with probability ``p_keep``),
            ``sample`` (the local window's older slots refilled from the whole older history, per
            chunk and branch) or ``shifted`` (the public recipe: the slots drawn once at the
            fork from the pool, branch k a slice of one permutation shifted by
            ``k * max(1, pool // G)``, kept for the whole window).
        recent_frames: ``routing="sample"|"shifted"``: the nearest history frames kept in every
            branch.
        route_pool: ``routing="shifted"``: the pool is the frames from ``max(sinks, first frame
            of the window's last chunk - route_pool)`` (0: from the sinks) to the fork's recent
            frames.
        routed_cache_pass: the t = 0 pass writing a window chunk's cache pages attends to the
            branch's routed context (the public recipe), not the full one.
        score_after_window: also record the chunks after the window (their likelihood is scored).
        streaming_chunk: (first, later) chunks per streaming chunk (None: the video is one).
        score_stream: record the chunks from the fork to the end of its streaming chunk.
        score_steps: which denoising steps of a scored chunk are recorded (None: all).
        anchor: also make the unperturbed (deployment-time) branch beside the G explored ones.
        share_pages: branches list the pre-window pages in their tables (True) or get copies of
            them (False: the memory baseline).
        record_prefix: also record the steps of the shared pre-window chunks (identical in every
            branch: they carry no TVE weight, but let a regularizer keep those chunks near the
            reference policy).
        explore: ``routing`` (KVPO) or ``sde`` (the Flow-GRPO baseline: per-branch SDE noise on
            the recorded steps of the scored chunks, full context everywhere).
        sde_noise: the SDE's noise level ``a`` (``sigma_t = a sqrt(t / (1 - t))``).
        branches_per_pass: from the fork on, roll out this many branches of each group at a time
            (0: all G, and the anchor, in one pass). Each pass reuses the previous one's KV pages,
            so the cache holds the shared prefix and one pass's pages instead of every branch's;
            the routing and noise are drawn for all branches first, so any value makes the same
            branches.
    """

    group_size: int = 4
    window: tuple[int, int] = (2, 4)
    p_keep: float = 0.5
    routing: str = "drop"
    recent_frames: int = 2
    route_pool: int = 0
    routed_cache_pass: bool = False
    score_after_window: bool = False
    streaming_chunk: tuple[int, int] | None = None
    score_stream: bool = False
    score_steps: tuple[int, ...] | None = None
    anchor: bool = True
    share_pages: bool = True
    record_prefix: bool = False
    explore: str = "routing"
    sde_noise: float = 0.7
    branches_per_pass: int = 0

    def validate(self, model: StreamingVideoGenerator) -> None:
        """Raise a ValueError naming what in the spec ``model``'s video cannot hold."""
        n_chunks = model.num_frames // model.chunk_frames
        w0, w1 = self.window
        if not (1 <= w0 < w1 <= n_chunks):
            raise ValueError(
                f"window={self.window} must satisfy 1 <= w0 < w1 <= {n_chunks} chunks (chunk 0 has "
                "no history to route)"
            )
        if self.group_size < 1:
            raise ValueError(f"group_size={self.group_size} must be >= 1")
        if not 0.0 <= self.p_keep <= 1.0:
            raise ValueError(f"p_keep={self.p_keep} must be in [0, 1]")
        if self.routing not in ("drop", "sample", "shifted"):
            raise ValueError(f"routing={self.routing!r} must be 'drop', 'sample' or 'shifted'")
        if self.routing != "drop" and self.explore == "routing":
            if model.local_window is None:
                raise ValueError(
                    f"routing={self.routing!r} refills a local attention window from older history, but "
                    "this model attends to all of it (local_window=None): use routing='drop' or "
                    "give the model a local_window"
                )
            if not isinstance(self.recent_frames, int) or self.recent_frames < 1:
                raise ValueError(f"recent_frames={self.recent_frames!r} must be an int >= 1")
        if self.explore not in ("routing", "sde"):
            raise ValueError(f"explore={self.explore!r} must be 'routing' or 'sde'")
        if not isinstance(self.branches_per_pass, int) or self.branches_per_pass < 0:
            raise ValueError(f"branches_per_pass={self.branches_per_pass!r} must be an int >= 0")
        if not (math.isfinite(self.sde_noise) and self.sde_noise > 0):
            raise ValueError(f"sde_noise={self.sde_noise} must be a finite number > 0")
        steps = len(model.timesteps()) - 1
        if self.score_steps is not None and (
            not self.score_steps
            or any(not 0 <= s < steps for s in self.score_steps)
            or len(set(self.score_steps)) < len(self.score_steps)
        ):
            raise ValueError(
                f"score_steps={self.score_steps} must be a non-empty subset of 0..{steps - 1}, "
                "each step once"
            )

    def scored_chunks(self, model: StreamingVideoGenerator) -> list[int]:
        """The chunks whose steps carry TVE weight: the window's (and the later ones with
        ``score_after_window``; those to the end of the fork's streaming chunk with
        ``score_stream``)."""
        n_chunks = model.num_frames // model.chunk_frames
        end = n_chunks if self.score_after_window else self.window[1]
        if self.score_stream:
            end = max(end, self.stream(n_chunks)[1])
        return list(range(self.window[0], end))

    def stream(self, n_chunks: int) -> tuple[int, int]:
        """The streaming chunk ``[s0, s1)`` (in chunks) that holds the fork (:func:`stream_of`)."""
        return stream_of(self.streaming_chunk, self.window[0], n_chunks)


def stream_of(layout: tuple[int, int] | None, chunk: int, n_chunks: int) -> tuple[int, int]:
    """The streaming chunk ``[s0, s1)`` holding ``chunk`` when a video of ``n_chunks`` streams in
    pieces of ``layout = (first, later)`` chunks (LongLive: 7, then 6 blocks); the whole video
    when ``layout`` is None."""
    if layout is None:
        return 0, n_chunks
    first, later = layout
    s0 = 0 if chunk < first else first + (chunk - first) // later * later
    return s0, min(s0 + (first if s0 == 0 else later), n_chunks)


def spread(x: torch.Tensor) -> torch.Tensor:
    """How different M samples of each of N things are, scale-free: ``x`` [N, M, ...] -> [N]
    float32, the RMS distance between two of a thing's samples over the samples' RMS (0: all
    alike; sqrt(2) for unrelated zero-mean ones)."""
    x = x.flatten(2).float()
    # the mean over pairs of (x_g - x_h)^2 is twice the (unbiased) variance over the samples
    return (2 * x.var(dim=1).mean(dim=1) / x.square().mean(dim=(1, 2))).sqrt()


@dataclass
class Rollout:
    """Everything replay and rewards need from one rollout of B groups.

    Shapes: B groups, G branches, F frames, T tokens per frame, d token features, K recorded steps,
    L = chunk_frames * T.
    """

    prompts: list[list[str]]  # [B] x one prompt per chunk
    tokens: torch.Tensor  # [B, G, F, T, d] clean frames of each branch
    states: torch.Tensor  # [B, G, K, L, d] x_k at each recorded step
    velocities: torch.Tensor  # [B, G, K, L, d] velocity each branch took there
    t: torch.Tensor  # [K] timestep of each record
    t_next: torch.Tensor  # [K] the timestep its step went to
    chunk: torch.Tensor  # [K] int64 chunk of each record
    window: tuple[int, int]
    scored: torch.Tensor  # [K] bool: record carries TVE weight (False: a pre-window record)
    anchor_tokens: torch.Tensor | None  # [B, F, T, d] unperturbed branch
    # chunk -> [B*G, W] int32 denoising tables of the branches (cache page ids; with several
    # branch passes, a pass reuses the pages of the one before it)
    tables: dict[int, torch.Tensor]
    cache_bytes: int  # bytes of KV pages the rollout used
    explore: str = "routing"  # how the branches were explored (RolloutSpec.explore)
    step: torch.Tensor | None = None  # [K] int64 denoising step of each record (0: the noisiest)
    stream: tuple[int, int] | None = None  # the streaming chunk [s0, s1) holding the fork

    def groups(self, sel: slice) -> Rollout:
        """The same rollout restricted to groups ``sel`` (a micro-batch of it)."""
        return self._select(sel, slice(None))

    def branches(self, sel: slice) -> Rollout:
        """The same rollout restricted to branches ``sel`` of every group (what replay needs to
        recompute them alone)."""
        return self._select(slice(None), sel)

    def branch_spread(self) -> torch.Tensor:
        """How far apart each group's branches end up, scale-free: the RMS difference between two
        of its branches' clean latents from the fork on (the window's first frame), over the
        latents' RMS. [B] float32; 0 when every branch made the same video, sqrt(2) for
        independent zero-mean ones. Exploration that changes nothing shows here first."""
        fork = self.window[0] * (self.states.shape[3] // self.tokens.shape[3])
        return spread(self.tokens[:, :, fork:])

    def group_tokens(self, b: int = 0) -> torch.Tensor:
        """Group ``b``'s clean frames as its videos go side by side: [1 + G, F, T, d], the anchor
        first, or [G, F, T, d] when no anchor was rolled out."""
        if self.anchor_tokens is None:
            return self.tokens[b]
        return torch.cat([self.anchor_tokens[b, None], self.tokens[b]])

    def _select(self, groups: slice, branches: slice) -> Rollout:
        B, G = self.tokens.shape[:2]
        return replace(
            self,
            prompts=self.prompts[groups],
            tokens=self.tokens[groups, branches],
            states=self.states[groups, branches],
            velocities=self.velocities[groups, branches],
            anchor_tokens=None if self.anchor_tokens is None else self.anchor_tokens[groups],
            tables={
                j: t.view(B, G, -1)[groups, branches].flatten(0, 1) for j, t in self.tables.items()
            },
        )


def _steps(model: StreamingVideoGenerator, spec: RolloutSpec) -> list[int]:
    S = len(model.timesteps()) - 1
    return list(range(S)) if spec.score_steps is None else sorted(spec.score_steps)


def _sample_layout(
    model: StreamingVideoGenerator, spec: RolloutSpec, chunk: int
) -> tuple[int, int, int]:
    """``routing="sample"`` or ``"shifted"`` at ``chunk``: (sink frames, recent frames, window
    slots drawn from the older history between them)."""
    start = chunk * model.chunk_frames
    sinks = min(model.sink_frames, start)
    recent = min(spec.recent_frames, start - sinks)
    return sinks, recent, max(len(visible_frames(model, chunk)) - sinks - recent, 0)


def exploring_chunks(model: StreamingVideoGenerator, spec: RolloutSpec) -> list[int]:
    """The chunks of ``spec.window`` whose branches can attend to different history frames.

    ``drop``: a frame besides the sinks and the most recent one is visible, and ``0 < p_keep <
    1``. ``sample``: the older history (between sinks and recent frames) holds more frames than
    the local window's free slots, and there is a slot. ``shifted``: the same of its one pool,
    for every chunk of the window. Elsewhere every branch sees the same context, so with no
    exploring chunk the G branches of a group are one video.
    """
    if spec.routing == "shifted":  # one plan for the whole window
        pool, slots = _shifted_pool(model, spec)
        return list(range(*spec.window)) if 0 < slots < len(pool) else []
    found = []
    for chunk in range(*spec.window):
        if spec.routing == "drop":
            n = len(visible_frames(model, chunk))
            explores = bool(droppable_columns(model, chunk, n).any()) and 0.0 < spec.p_keep < 1.0
        else:
            sinks, recent, slots = _sample_layout(model, spec, chunk)
            explores = 0 < slots < chunk * model.chunk_frames - sinks - recent
        if explores:
            found.append(chunk)
    return found


def _shifted_pool(model: StreamingVideoGenerator, spec: RolloutSpec) -> tuple[list[int], int]:
    """``routing="shifted"``: the history frames a branch's slots are drawn from and the slots
    (the fork's window less sinks and recent frames). The pool ends ``recent_frames + chunk``
    frames before the fork, as the public recipe's ``fork - m_nearest_frames`` (the frames
    between it and the recent ones are in no branch's window); it starts at ``max(sinks, first
    frame of the window's last chunk - route_pool)`` (0: at the sinks)."""
    w0, w1 = spec.window
    c = model.chunk_frames
    sinks, recent, slots = _sample_layout(model, spec, w0)
    first = sinks if not spec.route_pool else max(sinks, (w1 - 1) * c - spec.route_pool)
    return list(range(first, w0 * c - recent - c)), slots


def shifted_plans(
    n_pool: int, slots: int, G: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The public recipe's branch plans over a pool of ``n_pool`` frames: one permutation
    ``perm`` [n_pool] (drawn from ``generator``); branch k takes ``perm[(k * shift + i) %
    n_pool]`` for ``i < min(slots, n_pool)``, ``shift = max(1, n_pool // G)``, in pool order.
    Returns (perm, [G, min(slots, n_pool)] int64 pool indices)."""
    perm = torch.randperm(n_pool, generator=generator)
    take = min(slots, n_pool)
    shift = max(1, n_pool // G)
    idx = (torch.arange(G)[:, None] * shift + torch.arange(take)) % max(n_pool, 1)
    return perm, perm[idx].sort(1).values


def _shifted_routes(
    model: StreamingVideoGenerator,
    spec: RolloutSpec,
    B: int,
    W: int,
    generator: torch.Generator,
) -> dict[int, torch.Tensor]:
    """``routing="shifted"``: each window chunk's [B * Gt, W] history frames per column (-1:
    none) of every row: the sinks, the group's fixed plan (:func:`shifted_plans`, one per
    group, the anchor's slot unused) and the chunk's recent frames."""
    G, Gt, c = spec.group_size, spec.group_size + int(spec.anchor), model.chunk_frames
    pool, slots = _shifted_pool(model, spec)
    pool_t = torch.tensor(pool, dtype=torch.long)
    plans = [pool_t[shifted_plans(len(pool), slots, G, generator)[1]] for _ in range(B)]
    drawn = torch.stack([torch.cat([p, p[:1].expand(Gt - G, -1)]) for p in plans]).flatten(0, 1)
    out = {}
    for j in range(*spec.window):
        sinks, recent, _ = _sample_layout(model, spec, j)
        frames = torch.cat(
            [
                torch.arange(sinks).expand(B * Gt, sinks),
                drawn,
                torch.arange(j * c - recent, j * c).expand(B * Gt, recent),
            ],
            1,
        )
        out[j] = torch.nn.functional.pad(frames, (0, W - frames.shape[1]), value=-1)
    return out


def _draw_route(
    model: StreamingVideoGenerator,
    spec: RolloutSpec,
    R: int,
    W: int,
    chunk: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """The routing of R rows denoising ``chunk`` over W history columns, drawn before any page
    exists: ``drop``: [R, W] bool, the columns kept; ``sample``: [R, W] int64, the history frame
    each column holds (-1: none)."""
    if spec.routing == "drop":
        keep = route_pages(
            torch.arange(W, dtype=torch.int32),
            R,
            spec.p_keep,
            droppable_columns(model, chunk, W),
            sink_pages=model.sink_frames,
            generator=generator,
        )
        return keep >= 0
    start = chunk * model.chunk_frames
    sinks, recent, slots = _sample_layout(model, spec, chunk)
    frames = sample_pages(
        torch.arange(start, dtype=torch.int32).expand(R, start),
        1,  # one branch per row: each row routes its own history
        slots,
        sink_pages=sinks,
        recent_pages=recent,
        generator=generator,
    )
    return torch.nn.functional.pad(frames.long(), (0, W - frames.shape[1]), value=-1)


def _apply_route(
    spec: RolloutSpec, drawn: torch.Tensor, page_map: torch.Tensor, hist: torch.Tensor
) -> torch.Tensor:
    """Routed history tables [R, W] int32 of rows whose deployment tables are ``hist`` and whose
    frames are on pages ``page_map`` [R, F], by the routing :func:`_draw_route` drew."""
    if drawn.dtype == torch.bool:  # drop
        return torch.where(drawn, hist, torch.full_like(hist, -1))
    pages = page_map.gather(1, drawn.clamp(min=0)).to(hist.dtype)
    return torch.where(drawn >= 0, pages, torch.full_like(hist, -1))


@dataclass
class _Memory:
    """What R rows' caches hold: the page of each frame and the first sink frame."""

    page_map: torch.Tensor  # [R, F] int64 (-1: not made yet)
    sinks_from: torch.Tensor  # [R] int64

    def rows(self, sel: torch.Tensor) -> _Memory:
        """A copy of rows ``sel``."""
        return _Memory(self.page_map[sel], self.sinks_from[sel])

    def put(self, sel: torch.Tensor, part: _Memory) -> None:
        """Rows ``sel`` become ``part``'s."""
        self.page_map[sel], self.sinks_from[sel] = part.page_map, part.sinks_from

    def table(
        self, model: StreamingVideoGenerator, chunk: int, own: torch.Tensor | None, width: int
    ) -> torch.Tensor:
        """[R, width] int32 deployment table of every row making ``chunk``
        (:func:`kvpo.generators.context.context_table`)."""
        R = self.page_map.shape[0]
        chunks = torch.full((R,), chunk)
        return context_table(
            model, self.page_map, torch.arange(R), chunks, own, width, self.sinks_from
        )


class _Pages:
    """Cache pages handed out in order from ``ids`` [n] int64; setting ``used`` back lets the
    next branch pass reuse the pages of the last."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids, self.used = ids, 0

    def take(self, n: int) -> torch.Tensor:
        if self.used + n > len(self.ids):
            raise RuntimeError(f"rollout pages exhausted: {self.used} + {n} > {len(self.ids)}")
        self.used += n
        return self.ids[self.used - n : self.used]


def _branch_passes(B: int, Gt: int, per_pass: int) -> list[torch.Tensor]:
    """Rows (``b * Gt + g``) of each pass: branches ``[g0, g0 + per_pass)`` of every group."""
    if per_pass <= 0 or per_pass >= Gt:
        return [torch.arange(B * Gt)]
    return [
        (torch.arange(B)[:, None] * Gt + torch.arange(g0, min(g0 + per_pass, Gt))).flatten()
        for g0 in range(0, Gt, per_pass)
    ]


class _PagePlan(NamedTuple):
    switches: list[list[int]]  # each group's prompt switches that re-cache
    passes: list[torch.Tensor]  # rows (b * Gt + g) of each branch pass from the fork on
    widest: int  # rows of the widest forward: its chunk_frames pages each are scratch
    capacity: int  # pages the rollout allocates


def _page_plan(
    model: StreamingVideoGenerator, prompts: list[list[str]], spec: RolloutSpec
) -> _PagePlan:
    c, w0 = model.chunk_frames, spec.window[0]
    nC, B = model.num_frames // c, len(prompts)
    Gt = spec.group_size + int(spec.anchor)
    switches = [prompt_switches(p) if recaches(model) else [] for p in prompts]

    def recache_pages(b: int, forked: bool) -> int:
        """Pages group b's KV re-caches write before the fork (once) or after it (per row)."""
        return sum(len(recache_chunks(model, a)) * c for a in switches[b] if (a >= w0) == forked)

    passes = _branch_passes(B, Gt, spec.branches_per_pass)
    # each pass takes its pages from one pool that the next pass reuses
    pool = max(
        len(sel) * (nC - w0) * c
        + (0 if spec.share_pages else len(sel) * w0 * c)
        + sum(recache_pages(int(r) // Gt, True) for r in sel)
        for sel in passes
    )
    widest = max(B, max(len(sel) for sel in passes))
    prefix = B * w0 * c + sum(recache_pages(b, False) for b in range(B))
    return _PagePlan(switches, passes, widest, widest * c + prefix + pool)


def rollout_pages(
    model: StreamingVideoGenerator, prompts: list[list[str]], spec: RolloutSpec
) -> int:
    """The KV pages :func:`rollout` allocates for ``prompts`` (B lists of one prompt per chunk)
    under ``spec``: scratch pages for its widest forward, the groups' pre-window pages once,
    and the largest branch pass's pages (with KV re-cache, the re-encoded frames' too). Times
    the bytes of a page (``model.new_cache(1).nbytes()``), the memory of its KV cache."""
    return _page_plan(model, prompts, spec).capacity


class _Streamer:
    """The streaming sampler of one rollout: the model, its paged KV cache and the noise every
    chunk starts from and re-noises with; denoises a chunk for R rows and writes its pages, and
    re-caches history at a prompt switch."""

    def __init__(
        self,
        model: StreamingVideoGenerator,
        spec: RolloutSpec,
        plan: _PagePlan,
        noise: torch.Tensor,
        step_noise: torch.Tensor | None,
        device: torch.device,
    ) -> None:
        self.model, self.spec, self.device = model, spec, device
        self.c = model.chunk_frames
        self.ts = model.timesteps().to(device)
        self.steps = _steps(model, spec)
        self.sampler = sampler_of(model)
        self.n_renoise = renoise_steps(self.sampler, len(self.ts) - 1)
        self.noise, self.step_noise = noise, step_noise
        self.switches, self.policy = plan.switches, recache_of(model)
        self.cache = model.new_cache(plan.capacity, device)
        self.scratch = self.cache.allocate(plan.widest * self.c).view(plan.widest, self.c)
        self.pages = _Pages(self.cache.allocate(plan.capacity - plan.widest * self.c))
        self.width = context_width(model, model.num_frames // self.c)
        self.t_cap = sde_t_cap(self.ts)

    def run_chunk(
        self,
        j: int,
        mem: _Memory,
        group_of_row: torch.Tensor,
        table_hist: torch.Tensor,
        cond: torch.Tensor,
        record: bool,
        ode_rows: torch.Tensor | None = None,
        eps: dict[int, torch.Tensor] | None = None,
        routed_pass: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Denoise chunk j for R rows under ``table_hist`` [R, W] history pages, then write its
        clean pages (under ``table_hist`` too with ``routed_pass``, else under the full
        context); returns the clean chunk [R, L, d], the recorded states and velocities, and
        the denoising table [R, W + c].

        In SDE exploration the recorded steps k of the rows not marked in ``ode_rows`` ([R] bool,
        the anchors) are stochastic, with noise ``eps[k]``; without ``eps`` none are."""
        c, ts, device, model = self.c, self.ts, self.device, self.model
        R = mem.page_map.shape[0]
        own = self.scratch[:R]
        x = self.noise[group_of_row, j].clone()
        z = self.step_noise[group_of_row, j].to(device) if self.n_renoise else None  # the group's
        fi = (j * c + torch.arange(c, device=device)).expand(R, c)
        den_table = torch.cat([table_hist, own.to(torch.int32)], 1)
        xs, vs = [], []
        for k in range(len(ts) - 1):
            v = model(x, ts[k].expand(R), cond, fi, den_table.to(device), self.cache, own)
            z_k = z[:, k] if z is not None and k < self.n_renoise else None
            x_next = sampler_step(self.sampler, x, v, ts[k], ts[k + 1], z_k)
            if record and k in self.steps:
                if eps is not None:
                    x_sde = sde_step(
                        x, v, ts[k], ts[k + 1], self.t_cap, self.spec.sde_noise, eps[k]
                    )
                    x_next = torch.where(ode_rows.to(device)[:, None, None], x_next, x_sde)
                    v = (x_next - x) / (ts[k + 1] - ts[k])  # the step taken
                xs.append(x)
                vs.append(v)
            x = x_next
        self.write_clean(j, x, cond, mem, table_hist if routed_pass else None)
        return x, xs, vs, den_table

    def write_clean(
        self,
        j: int,
        x: torch.Tensor,
        cond: torch.Tensor,
        mem: _Memory,
        table_hist: torch.Tensor | None = None,
    ) -> None:
        """Clean pass (t = 0) of chunk j for R rows: new cache pages, listed in ``mem``; under
        the history ``table_hist`` [R, W] (None: the full context)."""
        c, device = self.c, self.device
        R = x.shape[0]
        perm = self.pages.take(R * c).view(R, c)
        if table_hist is None:
            full = mem.table(self.model, j, perm, self.width)
        else:
            full = torch.cat([table_hist, perm.to(torch.int32)], 1)
        fi = (j * c + torch.arange(c, device=device)).expand(R, c)
        self.model(x, torch.zeros(R, device=device), cond, fi, full.to(device), self.cache, perm)
        mem.page_map[:, j * c : (j + 1) * c] = perm

    def longlive_pass(
        self, j: int, mem: _Memory, clean: dict[int, torch.Tensor], cond: torch.Tensor
    ) -> None:
        """LongLive's re-cache at chunk j for R rows: one t = 0 pass over the chunks holding its
        frames, every row attending to the kept sinks and the written frames' new pages."""
        c, device = self.c, self.device
        plan, chunks = longlive_recache(self.model, j), recache_chunks(self.model, j)
        R, n = cond.shape[0], len(chunks)
        slots = self.pages.take(R * n * c).view(R, n * c)
        if not plan.written:
            return
        col = {i * c + f: k * c + f for k, i in enumerate(chunks) for f in range(c)}
        new = slots[:, [col[f] for f in plan.written]]
        keys = torch.cat([mem.page_map[:, plan.kept], new], 1).to(torch.int32)
        x = torch.stack([clean[i] for i in chunks], 1).flatten(0, 1)
        fi = (torch.tensor(chunks)[:, None] * c + torch.arange(c)).repeat(R, 1).to(device)
        t0 = torch.zeros(R * n, device=device)
        table = keys.repeat_interleave(n, 0).to(device)
        cond_rows = cond.repeat_interleave(n, 0)
        self.model(x, t0, cond_rows, fi, table, self.cache, slots.view(R * n, c))
        mem.page_map[:, plan.written] = new
        mem.sinks_from[:] = plan.sinks_from

    def recache(
        self,
        j: int,
        mem: _Memory,
        group_of_row: torch.Tensor,
        clean: dict[int, torch.Tensor],
        cond: torch.Tensor,
    ) -> None:
        """KV re-cache: rows whose prompt switches at chunk j re-encode history under j's
        prompt (:mod:`kvpo.generators.context`); their frames get the new pages in ``mem``."""
        rows = [j in self.switches[int(b)] for b in group_of_row]
        sel = torch.tensor(rows).nonzero().squeeze(1)
        if sel.numel() == 0:
            return
        part = mem.rows(sel)
        if self.policy == "longlive":
            self.longlive_pass(j, part, {i: x[sel] for i, x in clean.items()}, cond[sel])
        else:
            for i in recache_chunks(self.model, j):
                self.write_clean(i, clean[i][sel], cond[sel], part)
        mem.put(sel, part)

    def copy_prefix(self, mem: _Memory, frames: int) -> None:
        """Give every row copies of its first ``frames`` frames' pages (the memory baseline of
        ``share_pages=False``)."""
        cache = self.cache
        for r in range(mem.page_map.shape[0]):
            new = self.pages.take(frames)
            old = mem.page_map[r, :frames]
            for layer in range(len(cache.k)):
                cache.k[layer][new] = cache.k[layer][old]
                cache.v[layer][new] = cache.v[layer][old]
            mem.page_map[r, :frames] = new


def _initial_noises(
    model: StreamingVideoGenerator,
    B: int,
    generator: torch.Generator,
    noise: torch.Tensor | None,
    step_noise: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The rollout's initial and re-noising noise: those given (checked), or drawn from
    ``generator`` in that order."""
    c, T, d = model.chunk_frames, model.frame_tokens, model.token_dim
    nC = model.num_frames // c
    if noise is None:
        noise = batch_noise(model, B, generator)
    elif tuple(noise.shape) != (B, nC, c * T, d):
        raise ValueError(f"noise {tuple(noise.shape)} must be [{B}, {nC}, {c * T}, {d}]")
    sampler = sampler_of(model)
    n_renoise = renoise_steps(sampler, len(model.timesteps()) - 1)
    if step_noise is None and n_renoise:
        step_noise = batch_step_noise(model, B, generator)
    elif n_renoise and tuple(step_noise.shape) != (B, nC, n_renoise, c * T, d):
        raise ValueError(
            f"step_noise {tuple(step_noise.shape)} must be [{B}, {nC}, {n_renoise}, {c * T}, {d}] "
            f"for the {sampler} sampler"
        )
    return noise, step_noise


@torch.no_grad()
def rollout(
    model: StreamingVideoGenerator,
    prompts: list[list[str]],
    spec: RolloutSpec,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    noise: torch.Tensor | None = None,
    step_noise: torch.Tensor | None = None,
) -> Rollout:
    """Generate B groups of G branches (plus an anchor each if ``spec.anchor``).

    Args:
        prompts: B lists of one prompt per chunk.
        generator: CPU generator for the noise and the routing (reproducible rollouts).
        noise: each group's initial noise ``[B, chunks, chunk_frames * frame_tokens, token_dim]``
            (default: drawn from ``generator`` first).
        step_noise: the ``renoise`` sampler's noise of each group, ``[B, chunks, steps - 1,
            chunk_frames * frame_tokens, token_dim]`` (:func:`batch_step_noise`; default: drawn
            from ``generator`` after ``noise``); None for ``euler``.
    """
    spec.validate(model)
    device = torch.device(device)
    c, T, d = model.chunk_frames, model.frame_tokens, model.token_dim
    Fr = model.num_frames
    nC = Fr // c
    B, G = len(prompts), spec.group_size
    if any(len(p) != nC for p in prompts):
        raise ValueError(f"each prompt list must have one prompt per chunk ({nC})")
    Gt = G + int(spec.anchor)
    w0, w1 = spec.window
    scored = set(spec.scored_chunks(model))
    steps = _steps(model, spec)
    cond_bj = chunk_conditioning(model, prompts)  # [B, nC, C]
    noise, step_noise = _initial_noises(model, B, generator, noise, step_noise)
    plan = _page_plan(model, prompts, spec)
    st = _Streamer(model, spec, plan, noise.to(device), step_noise, device)
    rows = torch.arange(B).repeat_interleave(Gt)  # b * Gt + g from the fork; the anchor: g = G
    sde = spec.explore == "sde"

    # Shared prefix: one row per group.
    pm = _Memory(torch.full((B, Fr), -1, dtype=torch.long), torch.zeros(B, dtype=torch.long))
    prefix, pre_x, pre_v = [], [], []
    for j in range(w0):
        st.recache(j, pm, torch.arange(B), dict(enumerate(prefix)), cond_bj[:, j])
        hist = pm.table(model, j, None, st.width - c)
        x, xs, vs, _ = st.run_chunk(j, pm, torch.arange(B), hist, cond_bj[:, j], spec.record_prefix)
        prefix.append(x)
        pre_x += xs
        pre_v += vs

    is_anchor = torch.zeros(B * Gt, dtype=torch.bool)
    if spec.anchor:
        is_anchor[G::Gt] = True
    # Every row's routing and SDE noise, drawn in the order one pass over all rows draws them.
    if spec.routing == "shifted" and not sde:
        routing = _shifted_routes(model, spec, B, st.width - c, generator)
    else:
        routing = {
            j: _draw_route(model, spec, B * Gt, st.width - c, j, generator)
            for j in range(w0, w1)
            if not sde
        }
    sde_eps = {
        (j, k): torch.randn((B * Gt, c * T, d), generator=generator)
        for j in range(w0, nC)
        if sde and j in scored
        for k in steps
    }
    forked_from = st.pages.used  # each pass takes its pages from here on, over the last pass's
    clean = {i: x[rows] for i, x in enumerate(prefix)}  # [B*Gt, L, d] per chunk made
    tables = {j: torch.empty((B * Gt, st.width), dtype=torch.int32) for j in range(w0, nC)}
    forked_x, forked_v = [], []  # per record after the fork: [B*Gt, L, d]
    for sel in plan.passes:
        st.pages.used = forked_from
        mem = pm.rows(rows[sel])
        if not spec.share_pages:
            st.copy_prefix(mem, w0 * c)
        group_of_row = rows[sel]
        made = {i: x[group_of_row] for i, x in enumerate(prefix)}
        n_rec = 0
        for j in range(w0, nC):
            cond = cond_bj[group_of_row, j]
            st.recache(j, mem, group_of_row, made, cond)
            hist = mem.table(model, j, None, st.width - c)
            if j < w1 and not sde:
                routed = _apply_route(spec, routing[j][sel], mem.page_map, hist)
                hist = torch.where(is_anchor[sel, None], hist, routed)
            eps = {k: sde_eps[j, k][sel].to(device) for k in steps} if sde and j in scored else None
            x, xs, vs, den_table = st.run_chunk(
                j,
                mem,
                group_of_row,
                hist,
                cond,
                j in scored,
                ode_rows=is_anchor[sel],
                eps=eps,
                routed_pass=spec.routed_cache_pass and j < w1 and not sde,
            )
            made[j] = x
            clean.setdefault(j, x.new_empty((B * Gt, *x.shape[1:])))[sel] = x
            tables[j][sel] = den_table
            for xr, vr in zip(xs, vs, strict=True):
                if n_rec == len(forked_x):
                    forked_x.append(xr.new_empty((B * Gt, *xr.shape[1:])))
                    forked_v.append(vr.new_empty((B * Gt, *vr.shape[1:])))
                forked_x[n_rec][sel], forked_v[n_rec][sel] = xr, vr
                n_rec += 1
    recorded = [(j, k) for j in range(w0) for k in steps] if pre_x else []
    recorded += [(j, k) for j in range(w0, nC) if j in scored for k in steps]
    tokens = torch.stack([clean[j] for j in range(nC)], 1).view(B, Gt, Fr, T, d)
    recs_x = [x[rows] for x in pre_x] + forked_x  # shared records, one copy per branch row
    recs_v = [v[rows] for v in pre_v] + forked_v
    K = len(recs_x)
    states = torch.stack(recs_x, 1).view(B, Gt, K, c * T, d)
    vels = torch.stack(recs_v, 1).view(B, Gt, K, c * T, d)
    cache = st.cache
    return Rollout(
        prompts=[list(p) for p in prompts],
        tokens=tokens[:, :G],
        states=states[:, :G],
        velocities=vels[:, :G],
        t=torch.tensor([float(st.ts[k]) for _, k in recorded]),
        t_next=torch.tensor([float(st.ts[k + 1]) for _, k in recorded]),
        chunk=torch.tensor([j for j, _ in recorded], dtype=torch.long),
        window=(w0, w1),
        scored=torch.arange(K) >= len(pre_x),
        anchor_tokens=tokens[:, G] if spec.anchor else None,
        tables={j: t.view(B, Gt, -1)[:, :G].reshape(B * G, -1) for j, t in tables.items()},
        cache_bytes=cache.used * cache.nbytes() // max(cache.capacity, 1),
        explore=spec.explore,
        step=torch.tensor([k for _, k in recorded], dtype=torch.long),
        stream=spec.stream(nC),
    )


def batch_step_noise(
    model: StreamingVideoGenerator, B: int, generator: torch.Generator
) -> torch.Tensor | None:
    """The re-noising noise ``[B, chunks, steps - 1, chunk_frames * frame_tokens, token_dim]`` of
    B videos under the generator's ``renoise`` sampler, drawn on the CPU from ``generator`` (what
    :func:`rollout` draws after :func:`batch_noise`); None for ``euler``, which draws none."""
    n = renoise_steps(sampler_of(model), len(model.timesteps()) - 1)
    if not n:
        return None
    nC = model.num_frames // model.chunk_frames
    shape = (B, nC, n, model.chunk_frames * model.frame_tokens, model.token_dim)
    return torch.randn(shape, generator=generator)


def batch_noise(model: StreamingVideoGenerator, B: int, generator: torch.Generator) -> torch.Tensor:
    """The initial noise [B, chunks, chunk_frames * frame_tokens, token_dim] of B videos, drawn on
    the CPU from ``generator`` (what :func:`rollout` draws first)."""
    nC = model.num_frames // model.chunk_frames
    shape = (B, nC, model.chunk_frames * model.frame_tokens, model.token_dim)
    return torch.randn(shape, generator=generator)


def deployment_spec(model: StreamingVideoGenerator) -> RolloutSpec:
    """The rollout that samples at deployment (:func:`generate`): one branch per video, full
    context everywhere (nothing routed out)."""
    nC = model.num_frames // model.chunk_frames
    return RolloutSpec(group_size=1, window=(1, nC), p_keep=1.0, anchor=False, score_steps=(0,))


@torch.no_grad()
def generate(
    model: StreamingVideoGenerator,
    prompts: list[list[str]],
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    rows: Sequence[int] | None = None,
    noise: torch.Tensor | None = None,
    step_noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Deployment-time sampling (no routing) by the generator's own sampler: [B, F, C, H, W]
    videos in [-1, 1].

    ``rows`` makes only those of the B videos ([len(rows), F, C, H, W]), each from the noise it
    has in the whole batch: ranks that split a batch make the videos the whole batch would.
    ``noise`` and ``step_noise`` are the whole batch's (:func:`batch_noise`,
    :func:`batch_step_noise`; default: drawn from ``generator`` in that order), for callers that
    make a batch in several calls or replay a sample noise for noise."""
    spec = deployment_spec(model)
    if noise is None:
        noise = batch_noise(model, len(prompts), generator)
        step_noise = batch_step_noise(model, len(prompts), generator)
    if rows is not None:
        rows = list(rows)
        prompts, noise = [prompts[i] for i in rows], noise[rows]
        step_noise = None if step_noise is None else step_noise[rows]
    ro = rollout(model, prompts, spec, generator, device, noise=noise, step_noise=step_noise)
    return model.to_video(ro.tokens[:, 0])


def generate_passes(
    model: StreamingVideoGenerator,
    prompts: list[list[str]],
    generator: torch.Generator,
    device: torch.device | str,
    rows: Sequence[int],
    per_pass: int = 0,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """:func:`generate` of ``rows`` of the batch ``prompts``, ``per_pass`` videos at a time (0:
    all at once): yields (rows, their videos) per pass, each video from the noise it has in the
    whole batch (drawn once from ``generator``), so any split makes the same videos."""
    rows = list(rows)
    noise = batch_noise(model, len(prompts), generator)
    step_noise = batch_step_noise(model, len(prompts), generator)
    step = per_pass or max(len(rows), 1)
    for j in range(0, len(rows), step):
        part = rows[j : j + step]
        yield part, generate(model, prompts, torch.Generator(), device, part, noise, step_noise)
