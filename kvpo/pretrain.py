"""Pretrain the built-in generator on procedural prompted videos: ``python -m kvpo.pretrain``.

Chunk-wise teacher forcing with flow matching: each chunk is noised to a random t and denoised
while attending (through ``routed_attention`` page tables) to the clean frames of earlier chunks,
exactly the context the streaming sampler gives it. Writes a safetensors checkpoint whose weights
are an EMA of the trained ones; ``kvpo/assets/base.safetensors`` ships one made by this script.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import data, distributed
from .checkpoint import load_model, save_model
from .context import chunk_conditioning, clean_context, context_table, teacher_forcing
from .ema import ParamEMA
from .model import ModelConfig, TinyARVideo

DEFAULT_OUT = Path(__file__).parent / "assets" / "base.safetensors"


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
    ctx = context_table(model, cc.page_map, cc.map_rows(nv, nj), nj, None)
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
    """Train from scratch (or continue from the model checkpoint ``init``, whose config wins) on
    ``device``; videos, noise and timesteps are drawn on the CPU, the same on any device."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = load_model(init) if init is not None else TinyARVideo(cfg)
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
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--dim", type=int, default=ModelConfig.dim)
    ap.add_argument("--depth", type=int, default=ModelConfig.depth)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    distributed.add_device_argument(ap)
    ap.add_argument("--init", type=Path, default=None, help="continue from this model checkpoint")
    ap.add_argument(
        "--local_window", type=int, default=None, help="frames besides sinks a chunk attends to"
    )
    ap.add_argument(
        "--recache", action="store_true", help="KV re-cache at prompt switches (LongLive)"
    )
    args = ap.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.lr <= 0:
        ap.error("--steps and --batch must be >= 1 and --lr > 0")
    if args.local_window is not None and args.local_window < 1:
        ap.error("--local_window must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    pretrain(
        ModelConfig(
            dim=args.dim, depth=args.depth, local_window=args.local_window, recache=args.recache
        ),
        args.steps,
        args.batch,
        args.lr,
        args.seed,
        args.out,
        init=args.init,
        device=distributed.resolve_device(args.device),
    )


if __name__ == "__main__":
    main()
