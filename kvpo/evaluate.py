"""Held-out evaluation: deployment-time samples of fixed prompts and fixed noises, scored.

``python -m kvpo.evaluate --checkpoint PATH [--ema]`` evaluates a checkpoint as its training run
did (the run's held-out prompts, noises, reward and precision) and prints the scores as JSON.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import data, distributed
from .config import TrainConfig
from .interface import StreamingVideoGenerator
from .rewards import CompositeReward
from .rollout import generate_passes, spread


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

    With several ``seeds`` the scores also hold ``eval_diversity``: how different a prompt's
    samples are (:func:`kvpo.rollout.spread` of their frames averaged down to at most 16 x 16
    pixels, the mean over prompts), which falls when training collapses onto one video a prompt.

    Returns mean rewards over all samples and the videos of the first noise, [P, F, C, H, W]
    (on rank 0; None on the others)."""
    nC = model.num_frames // model.chunk_frames
    # row s * P + p: prompt p under noise s
    asked = [data.segments(p if isinstance(p, list) else [p] * nC) for p in prompts] * seeds
    rank, world = distributed.rank_and_world()
    mine = list(range(rank, len(asked), world))
    got, firsts, small = [], {}, {}
    gen = torch.Generator().manual_seed(seed)
    for rows, videos in generate_passes(model, asked, gen, device, mine, batch):
        firsts.update({i: v.cpu() for i, v in zip(rows, videos, strict=True) if i < len(prompts)})
        videos = ((videos + 1) / 2).cpu()
        got.append(reward.components(videos, [asked[i] for i in rows]))
        if seeds > 1:
            size = [min(n, 16) for n in videos.shape[-2:]]
            thumbs = F.adaptive_avg_pool2d(videos.flatten(0, 1), size).view(*videos.shape[:3], -1)
            small.update(zip(rows, thumbs, strict=True))
    comps = {k: torch.cat([c[k] for c in got]) for k in got[0]} if got else {}
    # every rank's rewards (and thumbnails) back in row order, then the means of one process
    per_row = {}
    for r, (theirs, thumbs) in enumerate(distributed.all_gather_object((comps, small))):
        their_rows = range(r, len(asked), world)
        per_row.update({i: {k: v[j] for k, v in theirs.items()} for j, i in enumerate(their_rows)})
        small.update(thumbs)
    full = {k: torch.stack([per_row[i][k] for i in range(len(asked))]) for k in reward.weights}
    out = {f"eval_{k}": float(v.mean()) for k, v in full.items()}
    out["eval_reward"] = float(reward.total(full).mean())
    if seeds > 1:  # rows s * P + p -> [P, seeds, ...]
        thumbs = torch.stack([small[i] for i in range(len(asked))])
        out["eval_diversity"] = float(
            spread(thumbs.unflatten(0, (seeds, -1)).transpose(0, 1)).mean()
        )
    gathered = distributed.gather_object(firsts)
    if gathered is None:
        return out, None
    firsts = {i: v for part in gathered for i, v in part.items()}
    return out, torch.stack([firsts[i] for i in range(len(prompts))])


def evaluation_sets(prompts: list[str], chunks: int, multi_prompt: bool) -> dict[str, list]:
    """The held-out sets by metric prefix: ``eval_`` the prompts, and with ``multi_prompt``
    ``eval_mp_`` the same prompts turning a quarter at the middle chunk."""
    sets: dict[str, list] = {"eval_": prompts}
    if multi_prompt:
        sets["eval_mp_"] = turned_prompts(prompts, chunks)
    return sets


def evaluate_sets(
    model: StreamingVideoGenerator,
    sets: dict[str, list],
    reward: CompositeReward,
    cfg: TrainConfig,
    device: torch.device,
) -> tuple[dict[str, float], torch.Tensor | None]:
    """:func:`evaluate` of every set with the config's seed, noises, batch and precision (bfloat16
    autocast with ``amp="bf16"``); scores named by each set's prefix, and the videos of the
    first set (on rank 0)."""
    scores, videos = {}, None
    training = model.training
    model.eval()  # deployment: no dropout, whatever the caller was doing
    for tag, ps in sets.items():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16"):
            ev, vids = evaluate(model, ps, reward, cfg.seed, device, cfg.eval_seeds, cfg.eval_batch)
        scores.update({k.replace("eval_", tag, 1): v for k, v in ev.items()})
        videos = vids if videos is None else videos
    model.train(training)
    return scores, videos


def main(argv: list[str] | None = None) -> dict[str, float]:
    import argparse
    import json

    from .checkpoint import CheckpointError, add_generator_arguments, load_generator, run_config
    from .train import held_out_prompts, make_reward

    ap = argparse.ArgumentParser(
        prog="python -m kvpo.evaluate",
        description="Evaluate a checkpoint as its training run did; print the scores as JSON.",
    )
    add_generator_arguments(ap)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a field of the run's config: " + ", ".join(EVAL_FIELDS),
    )
    args = ap.parse_args(argv)
    try:
        over = {"device": args.device}
        for item in args.set:
            key, _, value = item.partition("=")
            if key not in EVAL_FIELDS:
                raise ValueError(f"--set {item!r}: not one of {sorted(EVAL_FIELDS)}")
            over[key] = value
        cfg = run_config(args.checkpoint, over)
        device = distributed.resolve_device(args.device)
        model = load_generator(args.checkpoint, args.ema, args.wan_dir, device)
        reward = make_reward(cfg, device)
        prompts = held_out_prompts(cfg)
    except (CheckpointError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    nC = model.num_frames // model.chunk_frames
    sets = evaluation_sets(prompts, nC, cfg.eval_multi_prompt)
    scores, _ = evaluate_sets(model, sets, reward, cfg, device)
    print(json.dumps(scores))
    return scores


# Config fields ``--set`` may change: what is evaluated and how, never the model.
EVAL_FIELDS = (
    "eval_prompts", "eval_seeds", "eval_batch", "seed", "reward_fns", "reward_weights",
    "clip_reward_path", "clip_reward_weight", "prompts_file", "eval_prompts_file", "amp",
    "eval_multi_prompt",
)  # fmt: skip


if __name__ == "__main__":
    main()
