"""Held-out evaluation: deployment-time samples of fixed prompts and fixed noises, scored.

``python -m kvpo.evaluate --checkpoint PATH [--ema] [--per_prompt FILE] [--samples STEM]``
evaluates a checkpoint as its training run did (the run's held-out prompts, noises, reward and
precision) and prints the scores as JSON (and writes each prompt's to FILE, the first noise's
samples to STEM.gif / .mp4: the run's samples_after for its last checkpoint). Under ``torchrun``
each rank makes its share of the samples (the same samples and scores as one process).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvpo.generators import data
from kvpo.generators.interface import StreamingVideoGenerator
from kvpo.method.rollout import generate_passes, spread
from kvpo.rewards import CompositeReward, NonFiniteVideoError, RewardOutputError
from kvpo.run import distributed
from kvpo.run.config import TrainConfig, amp_autocast
from kvpo.run.report import check_writable, preview, save_videos, write_rows


def turned_prompts(prompts: list[str], chunks: int) -> list[list[str]]:
    """Multi-prompt versions of built-in prompts: the object turns a quarter at the middle chunk."""
    return [
        data.switched_prompts(p, chunks, chunks // 2, data.TURN[data.Scene.parse(p).direction])
        for p in prompts
    ]


@dataclass
class Evaluation:
    """What :func:`evaluate` (and :func:`evaluate_sets`) return."""

    scores: dict[str, float]  # means over all samples: eval_reward, eval_<component>, ...
    # one row per prompt, in order: "prompt" (as asked) and the same metrics over its noises
    per_prompt: list[dict]
    # the first noise's videos [P, F, C, H, W] in [-1, 1] as report.preview keeps them (at most
    # 256 pixels tall), on rank 0 when asked for; None otherwise
    videos: torch.Tensor | None = None

    def update(self, other: Evaluation) -> None:
        """Add ``other``'s scores, of the same prompts under other names (another set of them,
        another model), to these and to each prompt's row; the videos stay."""
        if len(other.per_prompt) != len(self.per_prompt):
            raise ValueError(
                f"other: scores of {len(other.per_prompt)} prompts, these of {len(self.per_prompt)}"
            )
        self.scores.update(other.scores)
        for row, theirs in zip(self.per_prompt, other.per_prompt, strict=True):
            row.update({k: v for k, v in theirs.items() if k != "prompt"})

    def renamed(self, old: str, new: str) -> Evaluation:
        """These scores with the prefix ``old`` of their names changed to ``new`` (``eval_`` ->
        ``eval_ema_``)."""

        def rename(row: dict) -> dict:
            return {new + k[len(old) :] if k.startswith(old) else k: v for k, v in row.items()}

        return Evaluation(rename(self.scores), [rename(r) for r in self.per_prompt], self.videos)


def evaluate(
    model: StreamingVideoGenerator,
    prompts: list[str] | list[list[str]],
    reward: CompositeReward,
    seed: int,
    device: torch.device,
    seeds: int = 1,
    batch: int = 0,
    videos: bool = True,
) -> Evaluation:
    """Deployment-time samples of fixed prompts (a prompt, or a list of one per chunk), each with
    ``seeds`` fixed noises, made ``batch`` at a time (0: all at once).

    Under ``torchrun`` every rank makes and scores its share of the samples; each sample comes
    from the noise it has in one pass of one process, so any number of ranks and any ``batch``
    give the same samples. Every rank gets the scores.

    With several ``seeds`` the scores also hold ``eval_diversity``: how different a prompt's
    samples are (:func:`kvpo.method.rollout.spread` of their frames averaged down to at most 16 x 16
    pixels; the mean over prompts, and each prompt's in its row), which falls when training
    collapses onto one video a prompt.

    ``videos``: keep the first noise's videos (for rank 0) as :func:`kvpo.run.report.preview` makes
    them: the full-size float32 videos of a real generator would take GBs (Wan2.1: 390 MB
    each)."""
    nC = model.num_frames // model.chunk_frames
    # row s * P + p: prompt p under noise s
    asked = [data.segments(p if isinstance(p, list) else [p] * nC) for p in prompts] * seeds
    rank, world = distributed.rank_and_world()
    mine = list(range(rank, len(asked), world))
    got, firsts, small = [], {}, {}
    gen = torch.Generator().manual_seed(seed)
    for rows, vids in generate_passes(model, asked, gen, device, mine, batch):
        if videos:
            kept = preview(vids).cpu()
            firsts.update({i: v for i, v in zip(rows, kept, strict=True) if i < len(prompts)})
        vids = ((vids + 1) / 2).cpu()
        got.append(reward.components(vids, [asked[i] for i in rows]))
        if seeds > 1:
            size = [min(n, 16) for n in vids.shape[-2:]]
            thumbs = F.adaptive_avg_pool2d(vids.flatten(0, 1), size).view(*vids.shape[:3], -1)
            small.update(zip(rows, thumbs, strict=True))
    comps = {k: torch.cat([c[k] for c in got]) for k in got[0]} if got else {}
    # every rank's rewards (and thumbnails) back in row order, then the scores of one process
    per_row = {}
    for r, (theirs, thumbs) in enumerate(distributed.all_gather_object((comps, small))):
        their_rows = range(r, len(asked), world)
        per_row.update({i: {k: v[j] for k, v in theirs.items()} for j, i in enumerate(their_rows)})
        small.update(thumbs)
    full = {k: torch.stack([per_row[i][k] for i in range(len(asked))]) for k in reward.weights}
    # [seeds, P] per metric: the scores are the means over all, a prompt's row over its column
    table = {f"eval_{k}": v.view(seeds, -1) for k, v in full.items()}
    table["eval_reward"] = reward.total(full).view(seeds, -1)
    out = {k: float(v.mean()) for k, v in table.items()}
    per_prompt = [
        {"prompt": p, **{k: float(v[:, j].mean()) for k, v in table.items()}}
        for j, p in enumerate(prompts)
    ]
    if seeds > 1:  # rows s * P + p -> [P, seeds, ...]
        thumbs = torch.stack([small[i] for i in range(len(asked))])
        div = spread(thumbs.unflatten(0, (seeds, -1)).transpose(0, 1))
        out["eval_diversity"] = float(div.mean())
        for row, d in zip(per_prompt, div.tolist(), strict=True):
            row["eval_diversity"] = d
    gathered = distributed.gather_object(firsts) if videos else None
    if gathered is None:
        return Evaluation(out, per_prompt)
    firsts = {i: v for part in gathered for i, v in part.items()}
    return Evaluation(out, per_prompt, torch.stack([firsts[i] for i in range(len(prompts))]))


def evaluation_sets(prompts: list[str], chunks: int, multi_prompt: bool) -> dict[str, list]:
    """The held-out sets by metric prefix: ``eval_`` the prompts, and with ``multi_prompt``
    ``eval_mp_`` the same prompts turning a quarter at the middle chunk."""
    sets: dict[str, list] = {"eval_": prompts}
    if multi_prompt:
        sets["eval_mp_"] = turned_prompts(prompts, chunks)
    return sets


def evaluation_metrics(reward: CompositeReward, cfg: TrainConfig) -> list[str]:
    """The scores a training run's evaluations log (what ``keep_best`` may name): for each set of
    :func:`evaluation_sets` (``eval_``, ``eval_mp_``) the reward and each component, the
    diversity with several noises; with an EMA the same for it (``eval_ema_...``)."""
    names = [*(f"eval_{k}" for k in reward.weights), "eval_reward"]
    if cfg.eval_seeds > 1:
        names.append("eval_diversity")
    tags = evaluation_sets([], 0, cfg.eval_multi_prompt)
    names = [tag + n[len("eval_") :] for tag in tags for n in names]
    if cfg.ema:
        names += ["eval_ema_" + n[len("eval_") :] for n in names]
    return names


def evaluate_sets(
    model: StreamingVideoGenerator,
    sets: dict[str, list],
    reward: CompositeReward,
    cfg: TrainConfig,
    device: torch.device,
    videos: bool = True,
) -> Evaluation:
    """:func:`evaluate` of every set with the config's seed, noises, batch and precision (bfloat16
    autocast with ``amp="bf16"``); scores named by each set's prefix. The sets are versions of the
    same prompts (:func:`evaluation_sets`): a prompt's row holds every set's scores under the first
    set's prompt. The videos are the first set's (on rank 0, with ``videos``)."""
    result = None
    training = model.training
    model.eval()  # deployment: no dropout, whatever the caller was doing
    for tag, ps in sets.items():
        with amp_autocast(cfg.amp, device):
            ev = evaluate(
                model,
                ps,
                reward,
                cfg.seed,
                device,
                cfg.eval_seeds,
                cfg.eval_batch,
                videos=videos and result is None,
            ).renamed("eval_", tag)
        if result is None:
            result = ev
        else:
            result.update(ev)
    model.train(training)
    return result


def main(argv: list[str] | None = None) -> dict[str, float]:
    import argparse
    import json
    from pathlib import Path

    from kvpo.run.checkpoint import (
        CheckpointError,
        add_generator_arguments,
        load_generator,
        run_config,
    )

    # here, not at the top: kvpo.run.setup imports this module
    from kvpo.run.setup import held_out_prompts, make_reward, training_device

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
    ap.add_argument(
        "--per_prompt",
        metavar="FILE",
        help="also write each held-out prompt's scores, a JSON line per prompt, to FILE",
    )
    ap.add_argument(
        "--samples",
        metavar="STEM",
        help="also write the held-out prompts' samples of the first noise: STEM.gif / STEM.mp4",
    )
    args = ap.parse_args(argv)
    try:
        over = {"device": args.device}
        for item in args.set:
            key, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"--set {item!r}: field=value, e.g. eval_seeds=8")
            if key not in EVAL_FIELDS:
                raise ValueError(f"--set {item!r}: not one of {sorted(EVAL_FIELDS)}")
            over[key] = value
        cfg = run_config(args.checkpoint, over)
        device = training_device(cfg)  # under torchrun: this rank's GPU
        rank, _ = distributed.init(device)
        if rank == 0:  # before the generator loads (a Wan2.1 load takes minutes)
            for opt in ("per_prompt", "samples"):
                if getattr(args, opt):
                    check_writable(Path(getattr(args, opt)).parent, f"--{opt} {getattr(args, opt)}")
        model = load_generator(args.checkpoint, args.ema, args.wan_dir, device)
        reward = make_reward(cfg, device)
        prompts = held_out_prompts(cfg)
    except (CheckpointError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    nC = model.num_frames // model.chunk_frames
    sets = evaluation_sets(prompts, nC, cfg.eval_multi_prompt)
    try:
        ev = evaluate_sets(model, sets, reward, cfg, device, videos=bool(args.samples))
    except (RewardOutputError, NonFiniteVideoError) as e:
        raise SystemExit(f"error: {e}") from None
    if rank == 0:
        if args.samples:
            save_videos(ev.videos, Path(args.samples))
        if args.per_prompt:
            write_rows(Path(args.per_prompt), ev.per_prompt)
        print(json.dumps(ev.scores))
    distributed.shutdown()
    return ev.scores


# Config fields ``--set`` may change: what is evaluated and how, never the model.
EVAL_FIELDS = (
    "eval_prompts",
    "eval_seeds",
    "eval_batch",
    "seed",
    "reward_fns",
    "reward_weights",
    "clip_reward_path",
    "clip_reward_weight",
    "prompts_file",
    "eval_prompts_file",
    "amp",
    "eval_multi_prompt",
    "reward_batch",
)


if __name__ == "__main__":
    main()
