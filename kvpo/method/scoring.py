"""Rewards of a rollout's branches (and anchor) over the clips the reward scopes name."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from kvpo.generators.interface import StreamingVideoGenerator
from kvpo.method.rollout import Rollout, stream_of
from kvpo.rewards import CompositeReward


def scope_chunks(
    scope: str, window: tuple[int, int], chunks: int, stream: tuple[int, int] | None = None
) -> tuple[int, int]:
    """The chunks ``[j0, j1)`` a reward scope sees: ``video`` all of them, ``global`` the post-fork
    video (from the window's start), ``local`` the perturbed window, ``stream`` the streaming
    chunk holding the fork (``stream``; None: the video), ``segments`` the video, scored per
    prompt segment (:func:`segment_clips`)."""
    return {
        "video": (0, chunks),
        "global": (window[0], chunks),
        "local": tuple(window),
        "stream": stream or (0, chunks),
        "segments": (0, chunks),
    }[scope]


def segment_clips(
    model: StreamingVideoGenerator, prompts: list[str], clip: int = 0
) -> list[tuple[str, slice]]:
    """The ``segments`` scope's clips of one video, one per prompt segment (a run of chunks of one
    prompt): its prompt and the decoded frames, the ``clip`` frames centred in the segment
    (0 or longer than it: the whole segment; the public recipe: 36)."""
    c, out, j0 = model.chunk_frames, [], 0
    for j in range(1, len(prompts) + 1):
        if j == len(prompts) or prompts[j] != prompts[j0]:
            frames = video_frames(model, j0 * c, j * c)
            n = frames.stop - frames.start
            if 0 < clip < n:
                start = frames.start + (n - clip) // 2
                frames = slice(start, start + clip)
            out.append((prompts[j0], frames))
            j0 = j
    return out


def video_frames(model: StreamingVideoGenerator, first: int, last: int) -> slice:
    """The frames of ``model.to_video``'s output that its frames ``[first, last)`` decode to: the
    same ones, unless the model says otherwise (a VAE decoding a latent frame to several)."""
    if hasattr(model, "video_frames"):
        return model.video_frames(first, last)
    return slice(first, last)


def scope_clip(
    model: StreamingVideoGenerator,
    scope: str,
    window: tuple[int, int],
    chunks: int,
    stream: tuple[int, int] | None = None,
) -> tuple[int, int, slice]:
    """A scope's chunks ``[j0, j1)`` (:func:`scope_chunks`) and the frames of the decoded video
    they are (:func:`video_frames`)."""
    j0, j1 = scope_chunks(scope, window, chunks, stream)
    c = model.chunk_frames
    return j0, j1, video_frames(model, j0 * c, j1 * c)


def scope_rewards(reward: CompositeReward, scope: str, w_scope: float) -> list[str]:
    """The components a scope scores: over the whole video every reward (those of weight 0 are
    logged), over a clip the ones that train."""
    if scope == "video":
        return list(reward.weights)
    return [k for k, w in reward.weights.items() if w and w_scope]


def check_clips(
    model: StreamingVideoGenerator,
    reward: CompositeReward,
    scopes: dict[str, float],
    windows: Iterable[tuple[int, int]],
    streaming_chunk: tuple[int, int] | None = None,
) -> None:
    """A ValueError naming the reward, the scope and the window if a reward that needs several
    frames (:meth:`CompositeReward.min_frames`: motion is measured between frames) would score
    a shorter clip at one of ``windows``: as a run starts, not after its first rollout."""
    chunks = model.num_frames // model.chunk_frames
    for window in windows:
        for scope, w_scope in scopes.items():
            stream = stream_of(streaming_chunk, window[0], chunks)
            j0, j1, frames = scope_clip(model, scope, window, chunks, stream)
            n = frames.stop - frames.start
            for name in scope_rewards(reward, scope, w_scope):
                need = reward.min_frames(name)
                if n < need:
                    fix = (
                        "leave it out of reward_weights"
                        if scope == "video"  # where weight-0 rewards are scored too
                        else f"widen the window, score {name!r} over another scope, or give it "
                        "weight 0"
                    )
                    raise ValueError(
                        f"reward {name!r} scores clips of at least {need} frames, but reward scope "
                        f"{scope!r} at window {tuple(window)} is chunks {j0}..{j1 - 1}, {n} "
                        f"frames: {fix}"
                    )


@torch.no_grad()  # decoding and scoring keep no graph
def branch_rewards(
    model: StreamingVideoGenerator,
    ro: Rollout,
    reward: CompositeReward,
    scopes: dict[str, float],
    segment_clip: int = 0,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict[str, float]]:
    """Per-component rewards [B, G] of the branches, [B] of the anchor (or None), and the weight
    of each component in the fused reward.

    Each scope (:func:`scope_chunks`) scores its clip of the videos; its components are named
    ``scope/name`` (plain ``name`` for ``video``) and weigh ``scopes[scope] * reward weight``.
    The ``segments`` scope is the mean over a video's prompt segments of each one's clip
    (:func:`segment_clips`, ``segment_clip`` frames) under its prompt. The ``video`` scope also
    computes the weight-0 components (logged, not trained on)."""
    B, G, Fr = ro.tokens.shape[:3]
    c = model.chunk_frames
    vids = ((model.to_video(ro.tokens.flatten(0, 1)) + 1) / 2).cpu()
    av = None if ro.anchor_tokens is None else ((model.to_video(ro.anchor_tokens) + 1) / 2).cpu()
    comps, anchor, weights = {}, ({} if av is not None else None), {}
    for scope, w_scope in scopes.items():
        names = scope_rewards(reward, scope, w_scope)
        prefix = "" if scope == "video" else f"{scope}/"
        if scope == "segments":
            got, got_a = _segment_rewards(model, reward, vids, av, ro.prompts, names, segment_clip)
        else:
            j0, j1, frames = scope_clip(model, scope, ro.window, Fr // c, ro.stream)
            prompts = [p[j0:j1] for p in ro.prompts]
            got = reward.components(vids[:, frames], [p for p in prompts for _ in range(G)], names)
            got_a = None if av is None else reward.components(av[:, frames], prompts, names)
        comps.update({prefix + k: v.view(B, G) for k, v in got.items()})
        weights.update({prefix + k: w_scope * reward.weights[k] for k in got})
        if av is not None:
            anchor.update({prefix + k: v for k, v in got_a.items()})
    return comps, anchor, weights


def _segment_rewards(
    model: StreamingVideoGenerator,
    reward: CompositeReward,
    vids: torch.Tensor,
    av: torch.Tensor | None,
    prompts: list[list[str]],
    names: list[str],
    clip: int,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """The ``segments`` scope of B groups: each component's mean over a video's segment clips,
    [B * G] for the branches ``vids`` [B * G, F, C, H, W] and [B] for the anchors ``av``."""
    G = vids.shape[0] // len(prompts)

    def mean_over(videos: torch.Tensor, segs: list[tuple[str, slice]]) -> dict[str, torch.Tensor]:
        got = [reward.components(videos[:, f], [p] * len(videos), names) for p, f in segs]
        return {k: torch.stack([g[k] for g in got]).mean(0) for k in names}

    per_b, per_a = [], []
    for b, chunk_prompts in enumerate(prompts):
        segs = segment_clips(model, chunk_prompts, clip)
        per_b.append(mean_over(vids[b * G : (b + 1) * G], segs))
        if av is not None:
            per_a.append(mean_over(av[b : b + 1], segs))
    cat = {k: torch.cat([d[k] for d in per_b]) for k in names}
    return cat, None if av is None else {k: torch.cat([d[k] for d in per_a]) for k in names}


def fused_reward(comps: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """The weighted sum [B, G] of the components [B, G] that ``weights`` names."""
    return sum(w * comps[k] for k, w in weights.items())
