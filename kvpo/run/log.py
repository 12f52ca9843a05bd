"""What a run logs and prints: each iteration's metrics row and a row per group (over every rank's
groups), its progress line and the first group's videos and scores; the lines the run starts and
ends with."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from kvpo.method.iteration import Exploration
from kvpo.run import distributed
from kvpo.run.config import TrainConfig
from kvpo.run.report import save_videos


def iteration_row(it: int, ex: Exploration, update: dict[str, float]) -> dict:
    """Iteration ``it``'s log row: rewards, advantages and exploration over every rank's groups
    (a collective: every rank calls it), ``update``'s statistics, and this rank's sizes and
    seconds."""
    total = distributed.all_gather(ex.total)
    adv = distributed.all_gather(ex.adv.cpu())
    valid = distributed.all_gather(ex.valid.cpu())
    weight = distributed.all_gather(ex.group_weight.cpu())
    spread = distributed.all_gather(ex.spread)
    return {
        "iter": it,
        "reward": float(total.mean()),
        "reward_std": float(total.std(1).mean()),
        "groups": int(total.shape[0]),
        **{f"reward_{k}": float(v.mean()) for k, v in ex.all_comps.items()},
        **{f"reward_{k}_std": float(v.std(1).mean()) for k, v in ex.all_comps.items()},
        "window_start": ex.parts[0].window[0],
        # KV pages of the largest micro-batch's rollout (what micro_batch bounds)
        "rollout_cache_mib": max(ro.cache_bytes for ro in ex.parts) / 2**20,
        "valid_groups": int(valid.sum()),
        # groups the protect gate halved (protect=halve; with skip they are not valid)
        "halved_groups": int(((weight > 0) & (weight < 1)).sum()),
        # how different the branches' videos came out (Rollout.branch_spread): the exploration's
        # strength, before any reward reads it
        "branch_spread": float(spread.mean()),
        # advantages of the trained groups: their mean is 0 for group advantages, not for
        # anchor-relative ones; their size sets how hard PPO pushes
        "adv_mean": float(adv[valid].mean()) if bool(valid.any()) else 0.0,
        "adv_abs": float(adv[valid].abs().mean()) if bool(valid.any()) else 0.0,
        "tau": ex.tau,
        **update,
        **ex.seconds,
    }


def one_prompt(per_chunk: list[str]) -> str | list[str]:
    """A group's prompt as the logs write it: the prompt, or the list, a prompt per chunk, of
    one that switches."""
    return per_chunk[0] if len(set(per_chunk)) == 1 else per_chunk


def group_rows(it: int, ex: Exploration) -> list[dict]:
    """Iteration ``it``'s row per group, over every rank's groups in rank order (a collective:
    every rank calls it): the prompt (a list, one per chunk, if it switches), the fused reward's
    mean and spread over the branches and each component's mean, whether the group trained (a
    group whose branches tie is skipped), its branch spread and the size of its advantages."""
    prompts = [p for ro in ex.parts for p in ro.prompts]
    total, adv, valid = ex.total.cpu(), ex.adv.cpu(), ex.valid.cpu()
    mine = [
        {
            "iter": it,
            "prompt": one_prompt(ps),
            "reward": float(total[b].mean()),
            "reward_std": float(total[b].std()),
            **{f"reward_{k}": float(v[b].mean()) for k, v in ex.comps.items()},
            "trained": bool(valid[b]),
            "branch_spread": float(ex.spread[b]),
            "adv_abs": float(adv[b].abs().mean()),
        }
        for b, ps in enumerate(prompts)
    ]
    return [row for rank in distributed.all_gather_object(mine) for row in rank]


def progress_line(row: dict, components: list[str], tau: bool = False) -> str:
    """An iteration's row as the line the trainer prints (``tau``: with the iteration's tau)."""
    return (
        f"it {row['iter']:4d} | reward {row['reward']:.4f} ± {row['reward_std']:.4f} ("
        + ", ".join(f"{k} {row[f'reward_{k}']:.3f}" for k in components)
        + f") spread {row['branch_spread']:.3f} | tve {row['tve']:.2e}"
        + (f" tau {row['tau']:.2e}" if tau else "")
        + f" ratio {row['ratio']:.3f} clip {row['clip_frac']:.2f} "
        f"kl {row['kl']:.2e} | rollout {row['time_rollout']:.1f}s reward "
        f"{row['time_reward']:.1f}s reference {row['time_reference']:.1f}s replay "
        f"{row['time_replay']:.1f}s update {row['time_update']:.1f}s"
        + (f" | eval {row['eval_reward']:.4f}" if "eval_reward" in row else "")
        + (f" (EMA {row['eval_ema_reward']:.4f})" if "eval_ema_reward" in row else "")
        + (f" multi-prompt {row['eval_mp_reward']:.4f}" if "eval_mp_reward" in row else "")
    )


def save_group(model: nn.Module, ex: Exploration, stem: Path) -> Path:
    """This rank's first group of the iteration, as the exploration made it and the update read
    it: ``stem.gif`` (the anchor when one was rolled out, then the G branches, a column each) and
    ``stem.json`` (the prompt, the window, and per branch the fused reward, its components and the
    advantage; whether the group trained). Returns the GIF's path."""
    ro = ex.parts[0]
    with torch.no_grad():
        videos = model.to_video(ro.group_tokens(0)).float().cpu()
    gif = save_videos(videos, stem, mp4=False)[0]
    G = ro.tokens.shape[1]
    info = {
        "prompt": one_prompt(ro.prompts[0]),
        "window": list(ro.window),
        "columns": ["anchor"] * (ro.anchor_tokens is not None) + [f"branch {g}" for g in range(G)],
        "trained": bool(ex.valid[0]),
        "branch_spread": float(ex.spread[0]),
        "reward": ex.total[0].tolist(),
        "advantage": ex.adv[0].tolist(),
        **{f"reward_{k}": v[0].tolist() for k, v in ex.comps.items()},
    }
    stem.with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n")
    return gif


def start_line(
    cfg: TrainConfig,
    model: nn.Module,
    trained: list[nn.Parameter],
    device: torch.device,
    world: int,
) -> str:
    """The line a run starts with: the generator's size (and how much of it trains), where it
    runs, the iteration's groups and how they explore."""
    n = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in trained)
    if cfg.explore == "sde":
        how = f"SDE baseline, noise {cfg.sde_noise}"
    elif cfg.routing == "drop":
        how = f"drop routing p_keep={cfg.p_keep}"
    else:
        how = (
            f"{cfg.routing} routing ({cfg.recent_frames} recent frames kept, local window "
            f"{model.local_window})"
        )
    return (
        f"kvpo: {n / 1e6:.2f} M-parameter generator ({n_train / 1e6:.2f} M trained"
        + (f", LoRA rank {cfg.lora_rank}" if cfg.lora_rank else "")
        + f") on {device}, {world} rank(s), {cfg.prompts_per_iter} prompts x G={cfg.group_size} "
        f"per iteration, window chunks {tuple(cfg.window)}, {how}"
    )


def end_line(history: list[dict], out: Path) -> str:
    """The line a finished run ends with: its held-out reward at the first evaluation and the
    last (the EMA's, the multi-prompt one's when logged), and where its outputs are."""
    first = next((h["eval_reward"] for h in history if "eval_reward" in h), float("nan"))
    last = history[-1]
    return (
        f"done: eval reward {first:.4f} -> {last.get('eval_reward', float('nan')):.4f}"
        + (f" (EMA {last['eval_ema_reward']:.4f})" if "eval_ema_reward" in last else "")
        + (
            f", multi-prompt {history[0]['eval_mp_reward']:.4f} -> {last['eval_mp_reward']:.4f}"
            if "eval_mp_reward" in last and "eval_mp_reward" in history[0]
            else ""
        )
        + f"; outputs in {out}/"
    )
