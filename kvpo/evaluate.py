"""Held-out evaluation: deployment-time samples of fixed prompts and fixed noises, scored."""

from __future__ import annotations

import torch

from . import data
from .interface import StreamingVideoGenerator
from .rewards import CompositeReward
from .rollout import generate


def turned_prompts(prompts: list[str], chunks: int) -> list[list[str]]:
    """Multi-prompt versions of built-in prompts: the object turns a quarter at the middle chunk."""
    return [
        data.switched_prompts(p, chunks, chunks // 2, data.TURN[data.Scene.parse(p).direction])
        for p in prompts
    ]


def evaluate(
    model: StreamingVideoGenerator,
    prompts: list[str] | list[list[str]],
    reward: CompositeReward,
    seed: int,
    device: torch.device,
    seeds: int = 1,
) -> tuple[dict[str, float], torch.Tensor]:
    """Deployment-time samples of fixed prompts (a prompt, or a list of one per chunk), each with
    ``seeds`` fixed noises.

    Returns mean rewards over all samples and the videos of the first noise, [P, F, C, H, W]."""
    nC = model.num_frames // model.chunk_frames
    # row s * P + p: prompt p under noise s
    asked = [data.segments(p if isinstance(p, list) else [p] * nC) for p in prompts] * seeds
    videos = generate(model, asked, torch.Generator().manual_seed(seed), device)
    comps = reward.components(((videos + 1) / 2).cpu(), asked)
    out = {f"eval_{k}": float(v.mean()) for k, v in comps.items()}
    out["eval_reward"] = float(reward.total(comps).mean())
    return out, videos[: len(prompts)].cpu()
