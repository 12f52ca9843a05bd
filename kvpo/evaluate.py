"""Held-out evaluation: deployment-time samples of fixed prompts and fixed noises, scored."""

from __future__ import annotations

import torch

from . import data, distributed
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
    batch: int = 0,
) -> tuple[dict[str, float], torch.Tensor | None]:
    """Deployment-time samples of fixed prompts (a prompt, or a list of one per chunk), each with
    ``seeds`` fixed noises, made ``batch`` at a time (0: all at once).

    Under ``torchrun`` every rank makes and scores its share of the samples; each sample comes
    from the noise it has in one pass of one process, so any number of ranks and any ``batch``
    give the same samples. Every rank gets the means.

    Returns mean rewards over all samples and the videos of the first noise, [P, F, C, H, W]
    (on rank 0; None on the others)."""
    nC = model.num_frames // model.chunk_frames
    # row s * P + p: prompt p under noise s
    asked = [data.segments(p if isinstance(p, list) else [p] * nC) for p in prompts] * seeds
    rank, world = distributed.rank_and_world()
    mine = list(range(rank, len(asked), world))
    per_pass = batch or max(len(mine), 1)
    got, firsts = [], {}
    for j in range(0, len(mine), per_pass):
        rows = mine[j : j + per_pass]
        videos = generate(model, asked, torch.Generator().manual_seed(seed), device, rows)
        got.append(reward.components(((videos + 1) / 2).cpu(), [asked[i] for i in rows]))
        firsts.update({i: v.cpu() for i, v in zip(rows, videos, strict=True) if i < len(prompts)})
    comps = {k: torch.cat([c[k] for c in got]) for k in got[0]} if got else {}
    # every rank's rewards back in row order, then the means of one process
    per_row = {}
    for r, theirs in enumerate(distributed.all_gather_object(comps)):
        their_rows = range(r, len(asked), world)
        per_row.update({i: {k: v[j] for k, v in theirs.items()} for j, i in enumerate(their_rows)})
    full = {k: torch.stack([per_row[i][k] for i in range(len(asked))]) for k in reward.weights}
    out = {f"eval_{k}": float(v.mean()) for k, v in full.items()}
    out["eval_reward"] = float(reward.total(full).mean())
    gathered = distributed.gather_object(firsts)
    if gathered is None:
        return out, None
    firsts = {i: v for part in gathered for i, v in part.items()}
    return out, torch.stack([firsts[i] for i in range(len(prompts))])
