"""Sample and score a generator: ``python -m kvpo.sample --checkpoint PATH [--ema] [--prompt P]``.

Deployment-time sampling (the generator's own few-step sampler, no routing) of the built-in
generator from a model or training checkpoint: writes a GIF/MP4 grid (one column per prompt) and prints each
video's built-in rewards (and yours, ``--reward_fns name=module:fn``). Without ``--prompt`` it
samples the held-out evaluation prompts. A ``--wan_dir`` run's checkpoint samples Wan2.1 (its
adapters and weights; ``--prompt`` required; the generic rewards). On the GPU when there is one,
under the run's precision.
A prompt may switch mid-video: ``"a red circle moving left slowly -> moving up"`` takes the
second direction from the middle chunk on (multi-prompt video).

``--branches G`` shows instead what KVPO explores: per prompt one group, the deployment video
(the anchor) and G branches from the same noise under the run's KV routing (its window, p_keep,
routing; ``--window`` / ``--p_keep`` override them), each scored, with the group's branch spread,
and what the update would read of each branch under this policy: its TVE (``tve``) and its Gibbs
probability in the group (``gibbs_p``) at the run's ``tau`` (or ``tau_auto``'s, printed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from kvpo.generators import data
from kvpo.method.exploration import check_exploration, rollout_spec
from kvpo.method.likelihood import gibbs_energies, gibbs_tau
from kvpo.method.replay import replay_velocities, step_weights, trajectory_energy
from kvpo.method.rollout import Rollout, generate_passes, rollout
from kvpo.rewards import (
    BUILTIN,
    GENERIC,
    SCENE_READERS,
    CompositeReward,
    NonFiniteVideoError,
    RewardOutputError,
    load_reward,
    unreadable_scene,
)
from kvpo.run import distributed
from kvpo.run.checkpoint import (
    CheckpointError,
    add_generator_arguments,
    load_generator,
    run_config,
    trainer_config,
)
from kvpo.run.config import TrainConfig, amp_autocast
from kvpo.run.report import check_writable, save_videos


def chunk_prompts(prompt: str, chunks: int) -> list[str]:
    """One prompt per chunk; ``"base -> moving up"`` switches direction at the middle chunk."""
    if "->" not in prompt:
        return [prompt] * chunks
    base, switch = (p.strip() for p in prompt.split("->", 1))
    return data.switched_prompts(base, chunks, chunks // 2, switch.split()[-1] if switch else "")


def _name_spec(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ValueError(f"{item!r}: expected name=module:fn")
    name, spec = (x.strip() for x in item.split("=", 1))
    if name in BUILTIN:
        raise ValueError(f"{name!r} is a built-in reward's name: choose another")
    return name, spec


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m kvpo.sample", description=__doc__.splitlines()[0])
    add_generator_arguments(ap)
    ap.add_argument("--prompt", action="append", help="repeat for several (default: held-out)")
    ap.add_argument("--prompts_file", type=Path, help="one prompt per line, after any --prompt")
    ap.add_argument("--batch", type=int, default=0, help="videos made at a time (0: all at once)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--amp",
        choices=("none", "bf16"),
        default=None,
        help="bfloat16 autocast (default: the run's)",
    )
    ap.add_argument("--out", type=Path, default=Path("samples"), help="writes OUT.gif / OUT.mp4")
    ap.add_argument(
        "--reward_fns",
        default="",
        metavar="NAME=SPEC,...",
        help="also print your rewards: name=module:fn or name=file.py:fn (see load_reward)",
    )
    ap.add_argument(
        "--reward_batch",
        type=int,
        default=0,
        metavar="N",
        help="videos per call of each reward (a large reward model's memory; 0: all at once)",
    )
    ap.add_argument(
        "--branches",
        type=int,
        default=0,
        metavar="G",
        help="G >= 2: per prompt the deployment video and G branches as the run explores them",
    )
    ap.add_argument("--window", default=None, help="--branches: perturbed chunks w0,w1")
    ap.add_argument("--p_keep", type=float, default=None, help="--branches: drop routing's p_keep")
    args = ap.parse_args(argv)
    try:
        extra = {
            name: load_reward(spec)
            for name, spec in (_name_spec(kv) for kv in args.reward_fns.split(",") if kv.strip())
        }
    except ValueError as e:
        raise SystemExit(f"error: --reward_fns: {e}") from None
    # the options' own checks first: a Wan2.1 load takes minutes
    for opt in ("batch", "reward_batch"):
        if getattr(args, opt) < 0:
            raise SystemExit(f"error: --{opt} {getattr(args, opt)}: must be >= 0 (0: all at once)")
    if not args.branches and (args.window is not None or args.p_keep is not None):
        raise SystemExit("error: --window and --p_keep set the exploration of --branches G")
    try:
        check_writable(args.out.parent, f"--out {args.out}")
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        device = distributed.resolve_device(args.device)
    except ValueError as e:
        raise SystemExit(f"error: --device {args.device}: {e}") from None
    try:
        run = trainer_config(args.checkpoint)
        wan = bool(run.get("wan_dir"))  # a Wan2.1 run: its directory, shape, adapters, weights
        model = load_generator(args.checkpoint, args.ema, args.wan_dir, device)
    except (CheckpointError, ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {e}") from None
    amp = args.amp or run.get("amp", "none")
    n_chunks = model.num_frames // model.chunk_frames
    prompts = list(args.prompt or [])
    if args.prompts_file is not None:
        try:
            prompts += data.prompt_lines(args.prompts_file, "--prompts_file")
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    if wan and not prompts:
        raise SystemExit("error: a Wan checkpoint needs --prompt or --prompts_file")
    prompts = prompts or data.split_prompts()[1]
    try:
        if wan:  # "A | B": A for the first half of the chunks, then B
            per_chunk = [data.segments([p] * n_chunks) for p in prompts]
        else:
            per_chunk = [chunk_prompts(p, n_chunks) for p in prompts]
        names = [*(GENERIC if wan else BUILTIN), *extra]
        if unread := unreadable_scene(p for ps in per_chunk for p in ps):
            # sampled all the same (the generator takes any words); only those rewards cannot score
            names = [n for n in names if n not in SCENE_READERS]
            print(f"note: {', '.join(SCENE_READERS)} left out: {unread}", file=sys.stderr)
        reward = CompositeReward(dict.fromkeys(names, 1.0), extra, batch=args.reward_batch)
    except (ValueError, KeyError) as e:
        raise SystemExit(f"error: {e}") from None
    bf16 = amp_autocast(amp, device)
    gen = torch.Generator().manual_seed(args.seed)
    if args.branches:
        return _branches(args, model, prompts, per_chunk, reward, gen, device, bf16)
    with torch.no_grad(), bf16:
        passes = generate_passes(model, per_chunk, gen, device, range(len(per_chunk)), args.batch)
        videos = torch.cat([v.float().cpu() for _, v in passes])
    comps = _components(reward, videos, per_chunk)
    rows = [{"prompt": p, **_scores(comps, i)} for i, p in enumerate(prompts)]
    return _write(rows, videos, args.out)


def _components(
    reward: CompositeReward, videos: torch.Tensor, prompts: list[list[str]]
) -> dict[str, torch.Tensor]:
    """The rewards of ``videos`` [N, T, C, H, W] in [-1, 1]; a reward that returns other than a
    finite score per video, or videos holding NaN, end the command with an error line."""
    try:
        return reward.components((videos + 1) / 2, prompts)
    except (RewardOutputError, NonFiniteVideoError) as e:
        raise SystemExit(f"error: {e}") from None


def _scores(comps: dict[str, torch.Tensor], i: int) -> dict[str, float]:
    """Video ``i``'s rewards, rounded for printing."""
    return {k: round(float(v[i]), 4) for k, v in comps.items()}


def _write(rows: list[dict], videos: torch.Tensor, out: Path, note: str = "") -> list[dict]:
    """Print ``rows`` as JSON lines, write the grid of ``videos`` to ``out``; returns ``rows``."""
    for row in rows:
        print(json.dumps(row))
    written = save_videos(videos, out)
    print("wrote " + ", ".join(str(w) for w in written) + note)
    return rows


def _branches(
    args: argparse.Namespace,
    model: torch.nn.Module,
    prompts: list[str],
    per_chunk: list[list[str]],
    reward: CompositeReward,
    gen: torch.Generator,
    device: torch.device,
    bf16: torch.autocast,
) -> list[dict]:
    """``--branches G``: each prompt's group as the rollouts of the checkpoint's run explore it,
    anchor first; prints and writes them, returns the rows."""
    over = {"group_size": args.branches}
    if args.p_keep is not None:
        over["p_keep"] = args.p_keep
    try:
        if args.window is not None:
            over["window"] = tuple(int(w) for w in args.window.split(","))
        cfg = run_config(args.checkpoint, over)
        spec = dataclasses.replace(rollout_spec(cfg), anchor=True)
        check_exploration(spec, model)
    except ValueError as e:
        raise SystemExit(f"error: --branches: {e}") from None
    G = args.branches
    videos, spread, likelihood = [], [], []
    with torch.no_grad(), bf16:
        # a group at a time: one group's KV pages (training's micro_batch 1)
        for asked in per_chunk:
            ro = rollout(model, [asked], spec, gen, device)
            videos.append(model.to_video(ro.group_tokens(0)).float().cpu())
            spread.append(float(ro.branch_spread()[0]))
            likelihood.append(_group_likelihood(cfg, model, ro))
    videos = torch.cat(videos)
    comps = _components(reward, videos, [p for p in per_chunk for _ in range(G + 1)])
    rows = []
    for i, p in enumerate(prompts):
        tve, gibbs_p, tau = likelihood[i]
        for b in range(G + 1):
            branch = "anchor" if b == 0 else b - 1
            row = {"prompt": p, "branch": branch, **_scores(comps, i * (G + 1) + b)}
            if b and tve is not None:
                row.update(tve=float(f"{tve[b - 1]:.4g}"), gibbs_p=round(float(gibbs_p[b - 1]), 4))
            rows.append(row)
        group = {"prompt": p, "branch_spread": round(spread[i], 4)}
        print(json.dumps(group | ({"tau": float(f"{tau:.4g}")} if tve is not None else {})))
    note = (
        f" (per prompt: the deployment video, then {G} branches; window chunks {tuple(cfg.window)})"
    )
    return _write(rows, videos, args.out, note)


def _group_likelihood(
    cfg: TrainConfig, model: torch.nn.Module, ro: Rollout
) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
    """What the update would read of a group's G branches under ``model`` as the rollout
    policy: each branch's TVE [G], its Gibbs probability in the group [G] (averaged over the
    scored steps for ``likelihood="step"``) and the tau that divides (``tau_auto`` times this
    group's energy spread, if the run sets it); Nones for the SDE baseline, which has none."""
    if cfg.explore == "sde":
        return None, None, cfg.tau
    u = replay_velocities(model, ro, cfg.replay_branches)
    tve = trajectory_energy(u, ro, step_weights(ro, cfg.step_weighting))
    energy = gibbs_energies(cfg, u, ro, tve).float()
    tau = gibbs_tau(cfg, [energy])
    p = torch.softmax(-energy / tau, dim=1)[0]
    return tve[0].float().cpu(), (p.mean(1) if p.dim() == 2 else p).cpu(), tau


if __name__ == "__main__":
    main()
