"""Pretrain the built-in generator on procedural prompted videos: ``python -m kvpo.pretrain``.

Chunk-wise teacher forcing with flow matching: each chunk is noised to a random t and denoised
while attending (through ``routed_attention`` page tables) to the clean frames of earlier chunks,
exactly the context the streaming sampler gives it. Writes a safetensors checkpoint whose weights
are an EMA of the trained ones (``--out``, default ``runs/pretrain/model.safetensors``);
``kvpo/assets/base.safetensors`` ships one made by this script.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from kvpo.generators import data
from kvpo.generators.context import (
    RECACHE_POLICIES,
    chunk_conditioning,
    clean_context,
    teacher_forcing,
)
from kvpo.generators.ema import ParamEMA
from kvpo.generators.model import ModelConfig, TinyARVideo
from kvpo.run import distributed
from kvpo.run.checkpoint import CheckpointError, load_model, model_config, save_model

# Not the shipped base (kvpo/assets): a trial run must not replace what `make train` starts from.
DEFAULT_OUT = Path("runs/pretrain/model.safetensors")


def make_batch(
    model: TinyARVideo, prompts: list[str], batch: int, p_switch: float, gen: torch.Generator
) -> tuple[torch.Tensor, list[list[str]]]:
    """[N, F, T, d] clean tokens and each video's per-chunk prompts."""
    cfg = model.cfg
    n_chunks = cfg.num_frames // cfg.chunk_frames
    chunk_prompts = [data.random_prompts(prompts, n_chunks, p_switch, gen) for _ in range(batch)]
    videos = torch.stack(
        [
            data.sample_video(p, cfg.num_frames, cfg.chunk_frames, cfg.frame_size, gen)
            for p in chunk_prompts
        ]
    )
    return model.to_tokens(videos), chunk_prompts


def sample_t(n: int, model: TinyARVideo, gen: torch.Generator) -> torch.Tensor:
    """Half at the sampler's own timesteps (the few-step ODE visits only those), half uniform
    warped by the same shift."""
    sched = model.timesteps()[:-1]
    on_grid = sched[torch.randint(len(sched), (n,), generator=gen)]
    u = torch.rand(n, generator=gen)
    s = model.cfg.shift
    warped = s * u / (1 + (s - 1) * u)
    pick = torch.rand(n, generator=gen) < 0.5
    return torch.where(pick, on_grid, warped).clamp(1e-3, 1.0)


def teacher_forced_velocity(
    model: TinyARVideo,
    clean: torch.Tensor,
    chunk_prompts: list[list[str]],
    xt: torch.Tensor,
    t: torch.Tensor,
) -> torch.Tensor:
    """Velocity at noisy chunks ``xt`` of every chunk of every video, each attending to the clean
    earlier frames as streaming sampling would have cached them (KV re-cache included), in one pass.

    Args:
        clean: [N, F, T, d] clean tokens; chunk_prompts: N lists of one prompt per chunk.
        xt: [N * nC, c*T, d] a noisy state of chunk ``j`` of video ``n`` at row ``n * nC + j``;
            t: [N * nC] its timestep.

    Returns:
        [N * nC, c*T, d]
    """
    N, Fr, T, d = clean.shape
    nC = Fr // model.chunk_frames
    cond = chunk_conditioning(model, chunk_prompts)  # [N, nC, C]
    # Clean rows: chunks 0..nC-2 of every video (the last chunk is never context).
    cc = clean_context(model, clean[:, None], chunk_prompts, shared=0, last=nC - 1)
    nv = torch.arange(N).repeat_interleave(nC)
    nj = torch.arange(nC).repeat(N)
    ctx = cc.history(model, nv, nj)
    return teacher_forcing(
        model, cc.tokens, cc.cond, cc.chunk, cc.table, xt, t, cond[nv, nj], nj, ctx
    )


def flow_matching_loss(
    model: TinyARVideo, clean: torch.Tensor, chunk_prompts: list[list[str]], gen: torch.Generator
) -> torch.Tensor:
    """Mean squared velocity error over every chunk of every video of the batch."""
    N, Fr, T, d = clean.shape
    c = model.chunk_frames
    x0 = clean.reshape(N * (Fr // c), c * T, d)
    noise = torch.randn(x0.shape, generator=gen).to(x0.device)  # CPU draws: any device, same noise
    t = sample_t(x0.shape[0], model, gen).to(x0.device)
    xt = (1 - t)[:, None, None] * x0 + t[:, None, None] * noise
    v = teacher_forced_velocity(model, clean, chunk_prompts, xt, t)
    return torch.nn.functional.mse_loss(v, noise - x0)


# What continuing from a checkpoint may change: the attention context (a model adapted to a
# local window, as LongLive adapts Self-Forcing's), not the architecture of its weights.
CONTEXT_FIELDS = ("local_window", "recache", "global_sink", "sampler")


def continued(init: Path, cfg: ModelConfig) -> TinyARVideo:
    """The model checkpoint ``init`` under ``cfg``'s local window and KV re-cache; ``cfg``'s other
    fields must be the checkpoint's (a ValueError names those that differ)."""
    model = load_model(init)
    have, want = dataclasses.asdict(model.cfg), dataclasses.asdict(cfg)
    differ = [k for k in have if k not in CONTEXT_FIELDS and have[k] != want[k]]
    if differ:
        raise ValueError(
            f"init {str(init)!r} is a model of "
            + ", ".join(f"{k}={have[k]!r}" for k in differ)
            + ", not "
            + ", ".join(f"{k}={want[k]!r}" for k in differ)
            + " (continuing keeps a checkpoint's architecture)"
        )
    model.set_local_window(cfg.local_window)
    model.set_recache(cfg.recache)
    model.set_global_sink(cfg.global_sink)
    model.set_sampler(cfg.sampler)
    return model


def pretrain(
    cfg: ModelConfig,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    out: Path,
    p_switch: float = 0.3,
    ema_decay: float = 0.995,
    log_every: int = 50,
    init: Path | None = None,
    device: torch.device | str = "cpu",
) -> TinyARVideo:
    """Train from scratch (or continue from the model checkpoint ``init``, see :func:`continued`)
    on ``device``; videos, noise and timesteps are drawn on the CPU, the same on any device."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = continued(init, cfg) if init is not None else TinyARVideo(cfg)
    model = model.to(device)
    ema = ParamEMA(model, ema_decay)
    train_prompts, _ = data.split_prompts()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))),
    )
    n_params = sum(p.numel() for p in model.parameters())
    print(f"pretraining {n_params / 1e6:.2f} M parameters for {steps} steps of {batch} videos")
    t0, running = time.time(), None
    bar = tqdm(range(steps), desc="pretrain", mininterval=5.0)
    for step in bar:
        clean, prompts = make_batch(model, train_prompts, batch, p_switch, gen)
        clean = clean.to(device)
        loss = flow_matching_loss(model, clean, prompts, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update(model)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}", refresh=False)
        if (step + 1) % log_every == 0:
            print(
                json.dumps(
                    {
                        "step": step + 1,
                        "loss": round(running, 5),
                        "elapsed_s": round(time.time() - t0, 1),
                    }
                ),
                flush=True,
            )
    save_model(
        ema.model.cpu(),
        out,
        extra={
            "pretrain_steps": steps,
            "pretrain_loss": running,
            "init": str(init) if init else None,
        },
    )
    print(f"wrote {out}")
    return ema.model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m kvpo.pretrain", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--steps", type=int, default=1500, help="optimizer steps")
    ap.add_argument("--batch", type=int, default=12, help="videos per step")
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate (cosine)")
    ap.add_argument("--seed", type=int, default=0, help="videos, prompts, noise and timesteps")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the checkpoint written")
    ap.add_argument(
        "--dim", type=int, default=None, help=f"model width (default {ModelConfig.dim}; --init's)"
    )
    ap.add_argument(
        "--depth",
        type=int,
        default=None,
        help=f"transformer blocks (default {ModelConfig.depth}; --init's)",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    distributed.add_device_argument(ap)
    ap.add_argument("--init", type=Path, default=None, help="continue from this model checkpoint")
    ap.add_argument(
        "--local_window",
        type=int,
        default=None,
        help="frames besides sinks a chunk attends to (default: all; with --init, its)",
    )
    ap.add_argument(
        "--recache",
        nargs="?",
        const="longlive",
        default=None,
        choices=RECACHE_POLICIES,
        help="KV re-cache at prompt switches: longlive (alone: LongLive's one pass), chunkwise or "
        "none (default none; with --init, its unless given)",
    )
    args = ap.parse_args(argv)
    if args.steps < 1 or args.batch < 1:
        ap.error(f"--steps {args.steps} and --batch {args.batch} must be >= 1")
    if not math.isfinite(args.lr) or args.lr <= 0:
        ap.error(f"--lr {args.lr} must be a finite number > 0")
    if args.threads < 0:
        ap.error(f"--threads {args.threads} must be >= 0 (0: torch's default)")
    if args.local_window is not None and args.local_window < 1:
        ap.error("--local_window must be >= 1")
    try:
        cfg = ModelConfig()
        if args.init is not None:  # its architecture; a context of its own unless given
            cfg = model_config(args.init)
            for flag in ("dim", "depth"):
                asked = getattr(args, flag)
                if asked is not None and asked != getattr(cfg, flag):
                    ap.error(
                        f"--{flag} {asked}: --init {args.init} is a model of {flag} "
                        f"{getattr(cfg, flag)}, which continuing keeps (drop --{flag})"
                    )
        changes = {k: getattr(args, k) for k in ("dim", "depth") if getattr(args, k) is not None}
        if args.local_window is not None or args.init is None:
            changes["local_window"] = args.local_window
        if args.recache is not None or args.init is None:
            changes["recache"] = args.recache or "none"
        cfg = dataclasses.replace(cfg, **changes)
    except (CheckpointError, ValueError) as e:  # an unreadable --init, a model that cannot be built
        ap.error(str(e))
    try:
        device = distributed.resolve_device(args.device)
    except ValueError as e:
        ap.error(f"--device {args.device}: {e}")
    if args.threads:
        torch.set_num_threads(args.threads)
    pretrain(
        cfg,
        args.steps,
        args.batch,
        args.lr,
        args.seed,
        args.out,
        init=args.init,
        device=device,
    )


if __name__ == "__main__":
    main()
