"""Rewards of a rollout's branches (and anchor) over the clips the reward scopes name."""

from __future__ import annotations

import torch

from .interface import StreamingVideoGenerator
from .rewards import CompositeReward
from .rollout import Rollout


def scope_chunks(scope: str, window: tuple[int, int], chunks: int) -> tuple[int, int]:
    """The chunks ``[j0, j1)`` a reward scope sees: ``video`` all of them, ``global`` the post-fork
    video (from the window's start), ``local`` the perturbed window."""
    return {"video": (0, chunks), "global": (window[0], chunks), "local": tuple(window)}[scope]


def video_frames(model: StreamingVideoGenerator, first: int, last: int) -> slice:
    """The frames of ``model.to_video``'s output that its frames ``[first, last)`` decode to: the
    same ones, unless the model says otherwise (a VAE decoding a latent frame to several)."""
    if hasattr(model, "video_frames"):
        return model.video_frames(first, last)
    return slice(first, last)


@torch.no_grad()  # decoding and scoring keep no graph
def branch_rewards(
    model: StreamingVideoGenerator,
    ro: Rollout,
    reward: CompositeReward,
    scopes: dict[str, float],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict[str, float]]:
    """Per-component rewards [B, G] of the branches, [B] of the anchor (or None), and the weight
    of each component in the fused reward.

    Each scope (:func:`scope_chunks`) scores its clip of the videos; its components are named
    ``scope/name`` (plain ``name`` for ``video``) and weigh ``scopes[scope] * reward weight``.
    The ``video`` scope also computes the weight-0 components (logged, not trained on)."""
    B, G, Fr = ro.tokens.shape[:3]
    c = model.chunk_frames
    vids = ((model.to_video(ro.tokens.flatten(0, 1)) + 1) / 2).cpu()
    av = None if ro.anchor_tokens is None else ((model.to_video(ro.anchor_tokens) + 1) / 2).cpu()
    comps, anchor, weights = {}, ({} if av is not None else None), {}
    for scope, w_scope in scopes.items():
        j0, j1 = scope_chunks(scope, ro.window, Fr // c)
        frames = video_frames(model, j0 * c, j1 * c)
        prompts = [p[j0:j1] for p in ro.prompts]
        names = [k for k, w in reward.weights.items() if w and w_scope]
        names = list(reward.weights) if scope == "video" else names
        prefix = "" if scope == "video" else f"{scope}/"
        got = reward.components(vids[:, frames], [p for p in prompts for _ in range(G)], names)
        comps.update({prefix + k: v.view(B, G) for k, v in got.items()})
        weights.update({prefix + k: w_scope * reward.weights[k] for k in got})
        if av is not None:
            got = reward.components(av[:, frames], prompts, names)
            anchor.update({prefix + k: v for k, v in got.items()})
    return comps, anchor, weights


def fused_reward(comps: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """The weighted sum [B, G] of the components [B, G] that ``weights`` names."""
    return sum(w * comps[k] for k, w in weights.items())
