"""KVPO training: ``python -m kvpo.train [--config file.yaml] [--field value ...]``.

One iteration: rollout with KV routing (no grad) -> rewards and advantages -> for each inner epoch,
replay under full context with gradients, TVE, Gibbs log-probabilities, PPO-clipped loss (+ KL
toward the base policy) -> AdamW step. See ``../shared/METHOD.md`` for the formulas.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn
from tqdm import tqdm

from . import data, distributed
from .checkpoint import (
    CheckpointError,
    load_model,
    load_training,
    save_training,
    saved_progress,
)
from .config import ConfigError, TrainConfig, amp_autocast, config_errors, parse_args
from .ema import ParamEMA
from .evaluate import Evaluation, evaluate_sets, evaluation_metrics, evaluation_sets
from .grpo import anchor_advantages, group_advantages
from .interface import require_generator
from .likelihood import iteration_tau
from .loggers import make_loggers, missing_packages
from .memory import TrainingOutOfMemoryError, memory_stage
from .profiling import IterationProfiler
from .replay import step_weights
from .report import MetricsLog, check_writable, plot_rewards, record_process, save_videos
from .rewards import (
    GENERIC,
    ClipReward,
    CompositeReward,
    NonFiniteVideoError,
    RewardFn,
    RewardOutputError,
    RewardSpecError,
    load_reward,
)
from .rollout import Rollout, RolloutSpec, exploring_chunks, rollout
from .scoring import branch_rewards, check_clips, fused_reward
from .stopping import StopSignals
from .summary import prompt_changes
from .update import (
    NonFiniteGradientError,
    SkippedSteps,
    learning_rate,
    reference_terms,
    update_policy,
)


def make_reward(cfg: TrainConfig, device: torch.device | str = "cpu") -> CompositeReward:
    """``cfg.reward_weights`` over the built-in rewards, plus CLIP (run on ``device``) with
    ``clip_reward_path`` and the user rewards of ``reward_fns`` (each weighted by
    ``reward_weights[name]``, 1 if not named there), each called on ``reward_batch`` videos at a
    time. A ``wan_dir`` run scores real videos: CLIP, the user rewards and the generic rewards
    that ``reward_weights`` names (``dynamic``, ``smoothness``); the others read the procedural
    shapes and are left out."""
    if cfg.wan_dir and not (cfg.clip_reward_path or cfg.reward_fns):
        raise ConfigError(
            "config wan_dir needs a reward for real videos: set clip_reward_path to a local "
            "CLIP directory, reward_fns to your own (name=module:fn), or call "
            "train(cfg, reward=...)"
        )
    weights = dict(cfg.reward_weights)
    if cfg.wan_dir:
        weights = {k: w for k, w in weights.items() if k in GENERIC or k in cfg.reward_fns}
    extra: dict[str, RewardFn] = {}
    if cfg.clip_reward_path:
        extra["clip"] = ClipReward(cfg.clip_reward_path, device=device)
        weights.setdefault("clip", cfg.clip_reward_weight)
    for name, spec in cfg.reward_fns.items():
        extra[name] = load_reward(spec)
        weights.setdefault(name, 1.0)
    with config_errors():  # weights naming no reward or all 0, a bad reward_batch
        return CompositeReward(weights, extra, batch=cfg.reward_batch)


def read_prompts(path: str, held_out: int) -> tuple[list[str], list[str]]:
    """(training, held-out) prompts of a text file, one per line (blank lines skipped): the last
    ``held_out`` lines are held out."""
    lines = data.prompt_lines(path, "config prompts_file")
    if len(lines) <= held_out:
        raise ConfigError(
            f"config prompts_file={path!r}: {len(lines)} prompts, need more than the "
            f"eval_prompts={held_out} held out"
        )
    return lines[:-held_out], lines[-held_out:]


def config_prompts(cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """(training, held-out) prompts a config names: ``prompts_file``'s (its last ``eval_prompts``
    held out, or all of it with an ``eval_prompts_file``), or the built-in procedural ones (a
    ``wan_dir`` run needs a file)."""
    if cfg.wan_dir and not cfg.prompts_file:
        raise ConfigError("config wan_dir needs prompts_file (one prompt per line)")
    builtin = data.split_prompts(num_eval=max(cfg.eval_prompts, 1))
    if not cfg.eval_prompts_file:
        return read_prompts(cfg.prompts_file, cfg.eval_prompts) if cfg.prompts_file else builtin
    train = (
        data.prompt_lines(cfg.prompts_file, "config prompts_file")
        if cfg.prompts_file
        else builtin[0]
    )
    return train, data.prompt_lines(cfg.eval_prompts_file, "config eval_prompts_file")


def check_wan_paths(cfg: TrainConfig) -> None:
    """With ``wan_dir``: a ConfigError unless it is a diffusers Wan2.1 directory and
    ``wan_checkpoint`` (if any) a file; before the minutes a Wan2.1 load takes."""
    if not cfg.wan_dir:
        return
    from .adapters.wan.weights import check_wan_dir

    with config_errors():
        check_wan_dir(cfg.wan_dir, "config wan_dir")
        if cfg.wan_checkpoint and not Path(cfg.wan_checkpoint).is_file():
            raise ValueError(f"config wan_checkpoint={cfg.wan_checkpoint!r} is not a file")


def prompt_sets(prompts: object) -> tuple[list[str], list[str]]:
    """``train``'s ``prompts`` as (training prompts, held-out prompts), or a ValueError saying
    what it must be (a flat list of two prompts would unpack into two prompts' characters)."""
    pair = list(prompts) if isinstance(prompts, (tuple, list)) else []
    sets = [list(p) for p in pair if isinstance(p, (tuple, list))]
    if len(pair) != 2 or len(sets) != 2 or not all(sets) \
            or not all(isinstance(p, str) for s in sets for p in s):  # fmt: skip
        raise ValueError(
            "prompts must be (training prompts, held-out prompts): two non-empty lists of "
            f"strings, got {_brief(prompts)}"
        )
    return sets[0], sets[1]


def _brief(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def held_out_prompts(cfg: TrainConfig) -> list[str]:
    """The prompts a run with ``cfg`` evaluates on."""
    return list(config_prompts(cfg)[1])[: cfg.eval_prompts]


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters the update trains (those that require grad: all, or the LoRA adapters)."""
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW over :func:`trainable` parameters with the config's rate and weight decay."""
    return torch.optim.AdamW(trainable(model), lr=cfg.lr, weight_decay=cfg.weight_decay)


def iteration_generator(
    cfg: TrainConfig, it: int, rank: int = 0, stream: int = 0
) -> torch.Generator:
    """Seeded per (seed, iteration, rank, stream): a resumed run draws what the original would."""
    return torch.Generator().manual_seed(((cfg.seed * 1_000_003 + it) * 131 + rank) * 7 + stream)


# Why an iteration can train no group (its row's valid_groups is 0), by advantage mode.
NO_GROUP = {
    "group": "every group's rewards tied",
    "anchor": "no branch beat its group's anchor (the protect gate)",
}


def shifted(window: tuple[int, int], by: int) -> tuple[int, int]:
    """The perturbed window ``[w0, w1)`` started ``by`` chunks later."""
    return (window[0] + by, window[1] + by)


def iteration_batch(
    cfg: TrainConfig, spec: RolloutSpec, it: int, train_prompts: list[str], chunks: int
) -> tuple[list[list[str]], RolloutSpec, torch.Generator]:
    """Iteration ``it``'s groups on this rank: each group's prompt per chunk (the iteration's
    ``prompts_per_iter`` prompts are drawn alike on every rank, which takes its share), ``spec``
    with the window started as drawn for the iteration, and the rank's generator for its
    rollouts. Every draw is seeded by (seed, it, rank): a resumed run draws the same."""
    rank, world = distributed.rank_and_world()
    pick = torch.randint(
        len(train_prompts),
        (cfg.prompts_per_iter,),
        generator=iteration_generator(cfg, it, stream=1),
    ).tolist()
    gen = iteration_generator(cfg, it, rank)
    batch = [
        data.segments(data.random_prompts([train_prompts[i]], chunks, cfg.multi_prompt, gen))
        for i in pick[rank::world]
    ]
    shift = torch.randint(
        cfg.window_shift + 1, (), generator=iteration_generator(cfg, it, stream=2)
    )
    return batch, dataclasses.replace(spec, window=shifted(cfg.window, int(shift))), gen


def rollout_spec(cfg: TrainConfig) -> RolloutSpec:
    """What the config's rollouts explore and record (the window before any shift)."""
    return RolloutSpec(
        group_size=cfg.group_size,
        window=tuple(cfg.window),
        p_keep=cfg.p_keep,
        routing=cfg.routing,
        recent_frames=cfg.recent_frames,
        score_after_window=cfg.score_after_window,
        score_steps=None if cfg.score_steps is None else tuple(cfg.score_steps),
        anchor=cfg.advantage == "anchor",
        record_prefix=cfg.kl_prefix and cfg.kl == "velocity",
        explore=cfg.explore,
        sde_noise=cfg.sde_noise,
        branches_per_pass=cfg.rollout_branches,
    )


def check_run_rewards(
    cfg: TrainConfig, model: nn.Module, reward: CompositeReward, prompts: list[str]
) -> None:
    """Before any video is made, a :class:`ConfigError` if a prompt's ``"A | B"`` segments do not
    fit the video's chunks, a reward cannot read the scene it asks for, a reward scope's clip (at
    any window start) or the evaluation's whole video is too short for a reward, or
    ``keep_best`` names no metric the evaluation logs."""
    chunks = model.num_frames // model.chunk_frames
    windows = [shifted(cfg.window, s) for s in range(cfg.window_shift + 1)]
    with config_errors():
        reward.check_prompts(q for p in prompts for q in data.segments([p] * chunks))
        check_clips(model, reward, {**cfg.reward_scopes, "video": 1.0}, windows)
    if cfg.keep_best:
        metrics = evaluation_metrics(reward, cfg)
        if cfg.keep_best not in metrics:
            raise ConfigError(
                f"config keep_best={cfg.keep_best!r} is not a metric of this run's evaluation: "
                f"{metrics}"
            )


def checked_spec(cfg: TrainConfig, model: nn.Module) -> RolloutSpec:
    """:func:`rollout_spec`, checked (:func:`check_exploration`) at every start of its window
    that ``window_shift`` allows."""
    spec = rollout_spec(cfg)
    for shift in range(cfg.window_shift + 1):
        at = shifted(cfg.window, shift)
        try:
            check_exploration(dataclasses.replace(spec, window=at), model)
        except ConfigError as e:
            if not shift:
                raise
            # the message names the shifted window, which the user never wrote
            raise ConfigError(
                f"window_shift={cfg.window_shift} starts window={tuple(cfg.window)} up to "
                f"{cfg.window_shift} chunks later; started {shift} later it is {at}, which fails: "
                f"{e}"
            ) from None
    return spec


def check_exploration(spec: RolloutSpec, model: nn.Module) -> None:
    """Validates ``spec`` for ``model`` and refuses a KV-routing window in which no chunk's
    branches can differ: their rewards would tie, every group would be skipped, and the run would
    train nothing while looking healthy."""
    with config_errors():
        spec.validate(model)
    if spec.explore != "routing" or spec.group_size < 2 or exploring_chunks(model, spec):
        return
    w0, w1 = spec.window
    c, sinks, lw = model.chunk_frames, model.sink_frames, model.local_window
    if spec.routing == "sample":
        why = (
            f"routing='sample' refills the local window ({sinks} sink frames + local_window "
            f"{lw}) from older history, but chunks {w0}..{w1 - 1} have at most {(w1 - 1) * c} "
            f"history frames, which the window (less recent_frames={spec.recent_frames}) already "
            f"shows whole; perturb chunks whose history passes {sinks + lw} frames, make the video "
            "longer, or use routing='drop'"
        )
    else:
        why = (
            f"routing='drop' with p_keep={spec.p_keep}: chunks {w0}..{w1 - 1} have no history "
            f"frame besides the {sinks} sink frames and the most recent one, or p_keep is 0 or 1; "
            "perturb later chunks or set 0 < p_keep < 1"
        )
    raise ConfigError(
        f"window {spec.window}: no chunk's branches can attend to different history, so the "
        f"{spec.group_size} branches of a group would be one video and nothing would train: {why}"
    )


def training_device(cfg: TrainConfig) -> torch.device:
    """The device ``cfg.device`` names (``auto``: CUDA when there is one); under ``torchrun``
    a CUDA rank takes ``cuda:LOCAL_RANK``, made current before NCCL starts."""
    try:
        device = distributed.resolve_device(cfg.device)
    except ValueError as e:
        raise ConfigError(f"config device={cfg.device!r}: {e}") from None
    device = distributed.local_device(device)
    if device.index is not None and device.type == "cuda":
        if device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"this rank's LOCAL_RANK={device.index} has no GPU: {torch.cuda.device_count()} "
                "visible (torchrun --nproc_per_node at most the GPU count)"
            )
        torch.cuda.set_device(device)
    return device


def micro_batch_rewards(
    model: nn.Module, parts: list[Rollout], reward: CompositeReward, scopes: dict[str, float]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict[str, float]]:
    """:func:`kvpo.scoring.branch_rewards` of a batch rolled out in micro-batches: components
    [B, G] (and the anchors' [B]) concatenated over the parts, and each component's weight."""
    scored = [branch_rewards(model, ro, reward, scopes) for ro in parts]
    comps = {k: torch.cat([c[k] for c, _, _ in scored]) for k in scored[0][0]}
    anchor = None
    if scored[0][1] is not None:
        anchor = {k: torch.cat([a[k] for _, a, _ in scored]) for k in scored[0][1]}
    return comps, anchor, scored[0][2]


def advantages(
    cfg: TrainConfig,
    total: torch.Tensor,
    comps: dict[str, torch.Tensor],
    anchor: dict[str, torch.Tensor] | None,
    weights: dict[str, float],
    all_comps: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [B, G], valid groups [B]) of ``cfg.advantage``: group-relative over the fused
    reward ``total`` [B, G], or anchor-relative per component over each component's std across
    every rank's groups (``all_comps``)."""
    if cfg.advantage == "group":
        return group_advantages(total, eps=cfg.adv_eps, clip=cfg.adv_clip)
    sigma = {k: v.std() for k, v in all_comps.items()}
    return anchor_advantages(comps, anchor, weights, sigma, cfg.adv_clip, cfg.adv_eps)


@dataclass
class Exploration:
    """An iteration's rollouts on this rank, made in micro-batches of groups, and what the
    update reads of them."""

    parts: list[Rollout]  # the micro-batches' rollouts, consecutive groups
    comps: dict[str, torch.Tensor]  # this rank's reward components, [B, G] each
    all_comps: dict[str, torch.Tensor]  # every rank's, [B * world, G]
    total: torch.Tensor  # [B, G] this rank's fused reward
    adv: torch.Tensor  # [B, G] advantages, on the training device
    valid: torch.Tensor  # [B] bool: groups trained on, on the training device
    spread: torch.Tensor  # [B] float32 on the CPU: each group's Rollout.branch_spread
    step_weights: list[torch.Tensor]  # each part's TVE step weights
    tau: float  # the iteration's Gibbs temperature (kvpo.likelihood.iteration_tau)
    refs: list[tuple[torch.Tensor | None, torch.Tensor | None]]  # each part's reference terms
    # time_rollout, time_reward (and advantages), time_reference; time_tau (its replay)
    seconds: dict[str, float]


def explore(
    cfg: TrainConfig,
    model: nn.Module,
    ref: nn.Module,
    reward: CompositeReward,
    batch: list[list[str]],
    spec: RolloutSpec,
    gen: torch.Generator,
    device: torch.device,
    autocast: Callable[[], torch.autocast],
) -> Exploration:
    """Roll out this rank's groups ``batch`` (``micro_batch`` at a time: one's KV cache at a
    time), score them, take their advantages (over every rank's groups) and, without gradients,
    the frozen reference's terms of the KL."""
    t0 = time.perf_counter()
    model.eval()
    step = cfg.micro_batch or len(batch)
    with autocast(), memory_stage("rollout", cfg):
        parts = [
            rollout(model, batch[g : g + step], spec, gen, device)
            for g in range(0, len(batch), step)
        ]
    t1 = time.perf_counter()
    with memory_stage("reward", cfg):
        comps, anchor, weights = micro_batch_rewards(model, parts, reward, cfg.reward_scopes)
    total = fused_reward(comps, weights)
    all_comps = {k: distributed.all_gather(v) for k, v in comps.items()}
    adv, valid = advantages(cfg, total, comps, anchor, weights, all_comps)
    step_w = [step_weights(ro, cfg.step_weighting) for ro in parts]
    t2 = time.perf_counter()
    with autocast(), memory_stage("tau", cfg):
        tau = iteration_tau(cfg, model, parts, step_w)
    cfg = dataclasses.replace(cfg, tau=tau)  # the reference's log-probabilities share it
    t3 = time.perf_counter()
    with torch.no_grad(), autocast(), memory_stage("reference", cfg):
        refs = [reference_terms(cfg, ref, ro, w) for ro, w in zip(parts, step_w, strict=True)]
    # the frozen reference's forward for the KL: logged apart, it can cost more than the rewards
    seconds = {
        "time_rollout": t1 - t0,
        "time_reward": t2 - t1,
        "time_reference": time.perf_counter() - t3,
        **({"time_tau": t3 - t2} if cfg.tau_auto else {}),
    }
    spread = torch.cat([ro.branch_spread().cpu() for ro in parts])
    return Exploration(
        parts, comps, all_comps, total, adv.to(device), valid.to(device), spread, step_w, tau,
        refs, seconds,
    )  # fmt: skip


def iteration_row(it: int, ex: Exploration, update: dict[str, float]) -> dict:
    """Iteration ``it``'s log row: rewards, advantages and exploration over every rank's groups
    (a collective: every rank calls it), ``update``'s statistics, and this rank's sizes and
    seconds."""
    total = distributed.all_gather(ex.total)
    adv = distributed.all_gather(ex.adv.cpu())
    valid = distributed.all_gather(ex.valid.cpu())
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


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    history: list[dict]  # one row per iteration (also in out_dir/metrics.jsonl)
    model: nn.Module  # the trained policy
    ema: nn.Module | None = None  # its EMA (config ema > 0)
    # Why the run stopped before cfg.iterations, after a checkpoint (kvpo.stopping): the name of
    # a signal ("SIGTERM", "SIGUSR1") or "max_minutes".
    stopped_by: str | None = None


def prune_checkpoints(folder: Path, done: int, keep: int) -> list[Path]:
    """Delete the ``step_N.safetensors`` of ``folder`` older than the newest ``keep`` up to step
    ``done``; returns those deleted. Files past ``done`` are left alone: a run resumed from an
    earlier checkpoint finds the later ones of the trajectory it left, and overwrites them as it
    gets there, never deleting its own newest for them."""
    steps = {}
    for f in folder.glob("step_*.safetensors"):
        m = re.fullmatch(r"step_(\d+)\.safetensors", f.name)
        if m and int(m.group(1)) <= done:
            steps[int(m.group(1))] = f
    old = [steps[n] for n in sorted(steps)[: max(len(steps) - keep, 0)]]
    for f in old:
        f.unlink()
    return old


def set_context(cfg: TrainConfig, model: nn.Module) -> None:
    """The deployment context the config asks for (local window, KV re-cache), if it asks; the
    built-in generator also records it in its saved config."""
    for name in ("local_window", "recache"):
        value = getattr(cfg, name)
        if value is not None:
            setter = getattr(model, f"set_{name}", None)
            if setter is not None:
                setter(value)
            else:
                setattr(model, name, value)


def check_fresh_start(cfg: TrainConfig, lead: bool) -> None:
    """A run started afresh (no ``resume``) over an out_dir whose checkpoint is an unfinished
    run's is refused (a ConfigError saying how to continue it): the command of a stopped run
    re-run without ``--resume auto`` would overwrite its logs at once and its checkpoint at the
    first save. Over a finished run it starts afresh, saying so (``lead``: the rank that says)."""
    latest = Path(cfg.out_dir) / "checkpoint.safetensors"
    if cfg.resume or not latest.is_file():
        return
    try:
        done, asked = saved_progress(latest)
    except CheckpointError:  # unreadable: nothing there to continue
        return
    if asked is not None and done < asked:
        raise ConfigError(
            f"out_dir {cfg.out_dir!r} holds an unfinished run ({done} of {asked} iterations "
            "done): --resume auto continues it; to start afresh, give another --out_dir or "
            "delete its checkpoint.safetensors"
        )
    if lead:
        print(f"kvpo: out_dir {cfg.out_dir!r} held a finished run ({done} iterations); this run "
              "starts afresh over it", flush=True)  # fmt: skip


def resolve_resume(cfg: TrainConfig) -> TrainConfig:
    """``resume: auto`` as the checkpoint it stands for: out_dir's own, if there is one, else
    none (a requeued job's unchanged command continues where it stopped)."""
    if cfg.resume != "auto":
        return cfg
    latest = Path(cfg.out_dir) / "checkpoint.safetensors"
    return dataclasses.replace(cfg, resume=str(latest) if latest.is_file() else "")


def reference_and_policy(
    cfg: TrainConfig, device: torch.device, generator: nn.Module | None = None
) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer, ParamEMA | None, int, list[dict]]:
    """The frozen reference policy on ``device`` (a copy of ``generator``, or the built-in one of
    ``cfg.base_checkpoint``, under the config's context), then what :func:`load_policy` gives:
    the policy, its AdamW, its EMA, the iterations done and their log."""
    ref = copy.deepcopy(generator) if generator is not None else load_model(cfg.base_checkpoint)
    ref = ref.to(device).requires_grad_(False).eval()
    set_context(cfg, ref)
    return ref, *load_policy(cfg, ref, device, generator)


def add_seeded_lora(cfg: TrainConfig, model: nn.Module) -> None:
    """``model.add_lora`` of the config's rank and alpha, its random adapters drawn from the run's
    seed rather than the process's global RNG, whose state depends on what ran before: the same
    adapters in every run of the config, on every rank, in a fresh process or not."""
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        model.add_lora(cfg.lora_rank, cfg.lora_alpha or None)


def load_policy(
    cfg: TrainConfig, ref: nn.Module, device: torch.device, own: nn.Module | None = None
) -> tuple[nn.Module, torch.optim.Optimizer, ParamEMA | None, int, list[dict]]:
    """The policy to train on ``device`` (a copy of ``ref``, with LoRA adapters if asked, or the
    state of ``cfg.resume``), its AdamW, its EMA (if ``cfg.ema``), the iterations already done
    and their log. ``own``: the caller's generator, when it is not the built-in one: the policy
    and checkpoints load into copies of it, which train the parameters it leaves trainable."""
    if own is not None and cfg.lora_rank and not hasattr(own, "add_lora"):
        raise ConfigError(
            f"config lora_rank: {type(own).__name__} has no add_lora(rank, alpha) method; give "
            "it one, or its adapters (kvpo.lora.add_lora) before passing it"
        )
    if cfg.grad_checkpointing and not hasattr(ref, "grad_checkpointing"):
        raise ConfigError(
            f"config grad_checkpointing: {type(ref).__name__} has no grad_checkpointing switch"
        )

    def blank() -> nn.Module | None:
        """A copy of the caller's generator, with the adapters the config asks for. Under LoRA
        its base stays frozen: it shares the reference's tensors (one copy of a large model's
        weights, not two)."""
        if own is None:
            return None
        pairs = zip(own.parameters(), ref.parameters(), strict=True)
        m = copy.deepcopy(own, {id(o): r for o, r in pairs} if cfg.lora_rank else None)
        if cfg.lora_rank:
            add_seeded_lora(cfg, m)
        return m

    start, history, ema_init = 0, [], None
    if cfg.resume:
        model, opt, start, saved, history = load_training(
            cfg.resume, lambda m: make_optimizer(cfg, m.to(device)), blank()
        )
        defaults = TrainConfig().to_dict()  # fields newer than the checkpoint: their defaults
        for key in (
            "group_size",
            "window",
            "base_checkpoint",
            "seed",
            "explore",
            "lora_rank",
            "lora_alpha",
        ):
            if saved.get(key, defaults[key]) != cfg.to_dict()[key]:
                raise CheckpointError(
                    f"--resume {cfg.resume!r} was trained with {key}="
                    f"{saved.get(key)!r}, this config has {cfg.to_dict()[key]!r}"
                )
        if cfg.ema:
            try:
                ema_init = load_model(cfg.resume, ema=True, module=blank())
            except CheckpointError:  # trained without an EMA so far: it starts from the policy
                ema_init = None
    else:
        if own is not None:
            model = blank()
        else:
            model = copy.deepcopy(ref).requires_grad_(True)
            if cfg.lora_rank:
                add_seeded_lora(cfg, model)
        opt = make_optimizer(cfg, model)
    for m in (model, ema_init):
        if m is not None:
            set_context(cfg, m)
    if hasattr(model, "grad_checkpointing"):
        model.grad_checkpointing = cfg.grad_checkpointing
    model.to(device).train()
    ema = ParamEMA(model, cfg.ema, ema_init) if cfg.ema else None
    if device.type == "cuda":
        for st in opt.state.values():
            for k, v in st.items():
                if torch.is_tensor(v) and v.dim() > 0:
                    st[k] = v.to(device)
    return model, opt, ema, start, history


def train(
    cfg: TrainConfig,
    generator: nn.Module | None = None,
    reward: CompositeReward | RewardFn | None = None,
    prompts: tuple[list[str], list[str]] | None = None,
) -> TrainResult:
    """Run KVPO; returns the per-iteration log and the trained model.

    Args:
        cfg: the recipe.
        generator: your own :class:`kvpo.interface.StreamingVideoGenerator` (an ``nn.Module``) to
            align instead of the built-in one in ``cfg.base_checkpoint``; the reference policy is
            a frozen copy of it, and ``cfg.resume`` loads into copies of it.
        reward: the reward (a :class:`CompositeReward`, or any ``fn(videos, prompts) -> [B]``,
            called on ``cfg.reward_batch`` videos at a time); default: ``cfg.reward_weights``
            over the built-in rewards.
        prompts: (training prompts, held-out prompts); default: the built-in procedural ones.
    """
    t_start = time.monotonic()  # max_minutes counts the loading and the first evaluation too
    cfg.validate()
    if missing := missing_packages(cfg.log_to):
        raise ConfigError(
            f"config log_to={cfg.log_to!r} needs {', '.join(missing)}: pip install "
            + " ".join(missing)
        )
    if generator is not None:
        require_generator(generator)
    check_wan_paths(cfg)
    asked = cfg  # what config.yaml records: `resume: auto` stays auto for the next start
    cfg = resolve_resume(cfg)
    builtin_prompts = prompts is None and not (cfg.prompts_file or cfg.eval_prompts_file)
    if prompts is None:
        with config_errors():  # a prompts file missing, empty, or too short
            prompts = config_prompts(cfg)
    train_prompts, eval_prompts = prompt_sets(prompts)
    if reward is not None and not isinstance(reward, CompositeReward):
        reward = CompositeReward({"reward": 1.0}, {"reward": reward}, batch=cfg.reward_batch)
    if not builtin_prompts and (cfg.multi_prompt or cfg.eval_multi_prompt):
        raise ConfigError(
            "config multi_prompt and eval_multi_prompt switch the direction of the built-in "
            "prompts; with your own prompts set them to 0 and false"
        )
    device = training_device(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.wan_dir:
        if generator is not None:
            raise ValueError("config wan_dir and train(generator=...) both name a generator")
        from .adapters.wan import load_from_config

        generator = load_from_config(cfg.to_dict(), device)
    rank, world = distributed.init(device)
    if cfg.prompts_per_iter % world:
        raise ConfigError(
            f"config prompts_per_iter={cfg.prompts_per_iter} must divide by the {world} ranks"
        )
    out = Path(cfg.out_dir)
    lead = rank == 0
    check_fresh_start(cfg, lead)
    if lead:
        with config_errors():
            check_writable(out, f"config out_dir={cfg.out_dir!r}")

    ref, model, opt, ema, start, history = reference_and_policy(cfg, device, generator)
    del generator  # the policy and the reference are copies: a loaded Wan2.1 need not stay a third
    if start > cfg.iterations:  # equal is a finished run requeued: it ends at once, as done
        raise ConfigError(
            f"--resume {cfg.resume!r} has {start} iterations done, more than config "
            f"iterations={cfg.iterations}: raise iterations to train on"
        )
    spec = checked_spec(cfg, model)
    if reward is None:
        reward = make_reward(cfg, device)
    eval_prompts = eval_prompts[: cfg.eval_prompts]
    nC = model.num_frames // model.chunk_frames
    check_run_rewards(cfg, model, reward, train_prompts + eval_prompts)

    autocast = functools.partial(amp_autocast, cfg.amp, device)

    eval_sets = evaluation_sets(eval_prompts, nC, cfg.eval_multi_prompt)

    def evaluation(it: int) -> Evaluation:
        """Held-out rewards of every evaluation set (each rank makes its share of the samples), of
        the policy and after training began its EMA's (``eval_ema_...``); the videos of the
        policy's single-prompt set (on rank 0, if samples are kept). The lead appends each
        prompt's scores to eval_prompts.jsonl as iteration ``it``'s."""
        with memory_stage("evaluation", cfg):
            ev = evaluate_sets(model, eval_sets, reward, cfg, device, videos=cfg.samples)
            if ema is not None and it >= 0:
                of_ema = evaluate_sets(ema.model, eval_sets, reward, cfg, device, videos=False)
                ev.update(of_ema.renamed("eval_", "eval_ema_"))
        if lead:
            prompt_log.write(*({"iter": it, **row} for row in ev.per_prompt))
            for lg in loggers:
                lg.prompts(ev.per_prompt, it + 1)
        return ev

    log = MetricsLog(out)
    prompt_log = MetricsLog(out, "eval_prompts")
    group_log = MetricsLog(out, "groups")
    params = trainable(model)
    loggers = make_loggers(cfg.log_to, out, cfg.to_dict(), cfg.wandb_project, start) if lead else []
    if lead:
        for lg in (log, prompt_log, group_log):  # what a resumed run redoes, a former run's
            lg.truncate(history[-1]["iter"] + 1 if history else -1)
        # the run's every setting, in the form --config reads back
        (out / "config.yaml").write_text(yaml.safe_dump(asked.to_dict(), sort_keys=False))
        record_process(out / "environment.jsonl", start, device, world, bool(cfg.resume))
        n = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in params)
        print(
            f"kvpo: {n / 1e6:.2f} M-parameter generator ({n_train / 1e6:.2f} M trained"
            + (f", LoRA rank {cfg.lora_rank}" if cfg.lora_rank else "")
            + f") on {device}, {world} rank(s), "
            f"{cfg.prompts_per_iter} prompts x G={cfg.group_size} per iteration, "
            f"window chunks {tuple(cfg.window)}, "
            + (
                f"SDE baseline, noise {cfg.sde_noise}"
                if cfg.explore == "sde"
                else f"drop routing p_keep={cfg.p_keep}"
                if cfg.routing == "drop"
                else f"sample routing ({cfg.recent_frames} recent frames kept, local window "
                f"{model.local_window})"
            ),
            flush=True,
        )
        if cfg.resume:
            print(f"resumed from {cfg.resume} after {start} iterations", flush=True)

    def save(done: int, name: str = "checkpoint") -> None:
        """The state after ``done`` iterations to ``out/<name>.safetensors``; the latest one
        (``checkpoint``) is also kept as ``checkpoints/step_N`` with ``keep_checkpoints``, and
        the reward plot redrawn. Rank 0 only."""
        path = out / f"{name}.safetensors"
        save_training(
            path, model, opt, done, cfg.to_dict(), history,
            ema=None if ema is None else ema.model,
        )  # fmt: skip
        if name != "checkpoint":
            return
        if cfg.keep_checkpoints:  # to go back to, e.g. before a reward was gamed
            (out / "checkpoints").mkdir(exist_ok=True)
            kept = out / "checkpoints" / f"step_{done:06d}.safetensors"
            kept.unlink(missing_ok=True)
            try:  # a second name, no copy of GBs: the next save writes a new file, not this one
                os.link(path, kept)
            except OSError:  # a filesystem without hard links
                shutil.copyfile(path, kept)
            if cfg.keep_last:
                prune_checkpoints(out / "checkpoints", done, cfg.keep_last)
        plot_rewards(history, out / "rewards.png")

    def kept_value(row: dict) -> float | None:
        """``row``'s ``keep_best`` metric, None if it has none (an iteration not evaluated).
        Before training the EMA is the policy (it starts as its copy): its metrics are the
        policy's."""
        if cfg.keep_best.startswith("eval_ema_") and row["iter"] == -1:
            return row.get("eval_" + cfg.keep_best[len("eval_ema_") :])
        return row.get(cfg.keep_best)

    def keep_if_best(done: int) -> None:
        """``best.safetensors``: the state after ``done`` iterations, if the evaluation just
        logged has the best ``keep_best`` metric yet (every rank checks, rank 0 saves)."""
        if not cfg.keep_best:
            return
        value = kept_value(history[-1])
        earlier = [v for h in history[:-1] if (v := kept_value(h)) is not None]
        if lead and value is not None and (not earlier or value > max(earlier)):
            save(done, "best")

    stopped = None  # why the run stopped early (kvpo.stopping)
    longest = 0.0  # for max_minutes: the longest iteration yet
    with StopSignals() as stop:
        if start == 0 and cfg.eval_before and not history:  # every rank evaluates its share
            ev = evaluation(-1)
            history.append({"iter": -1, **ev.scores})
            keep_if_best(0)
            if lead:
                mp = ev.scores.get("eval_mp_reward")
                line = f"before training: eval reward {ev.scores['eval_reward']:.4f}"
                print(line + (f" (multi-prompt {mp:.4f})" if mp is not None else ""), flush=True)
                if cfg.samples:
                    save_videos(ev.videos, out / "samples_before")
                log.write(history[-1])
                for lg in loggers:
                    lg.write(history[-1])
                    if cfg.samples and cfg.samples_at_eval:
                        lg.videos({"eval": out / "samples_before.gif"})

        skips = SkippedSteps(cfg.max_skipped_steps)
        profiler = IterationProfiler(cfg.profile_iteration, out, rank, device)
        bar = tqdm(
            range(start, cfg.iterations),
            desc="kvpo",
            disable=not (lead and cfg.progress),
            initial=start,
            total=cfg.iterations,
            file=sys.stderr,
        )
        for it in bar:
            profiler.step(it)
            t_iter = time.monotonic()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            batch, spec_it, gen = iteration_batch(cfg, spec, it, train_prompts, nC)
            ex = explore(cfg, model, ref, reward, batch, spec_it, gen, device, autocast)
            t2 = time.perf_counter()
            stopped = stop.requested()
            if stopped:  # before the update: the iteration is dropped, and redone on resume
                if lead:
                    save(it)
                break

            model.train()
            lr = learning_rate(cfg, it)
            for group in opt.param_groups:
                group["lr"] = lr
            with memory_stage("update", cfg):
                st, t_replay, skipped = update_policy(
                    dataclasses.replace(cfg, tau=ex.tau), model, opt, params, ema, ex.parts,
                    ex.step_weights, ex.adv, ex.valid, ex.refs, autocast, skips,
                )  # fmt: skip
            row = iteration_row(it, ex, {"lr": lr, "skipped_steps": skipped, **st})
            groups = group_rows(it, ex)
            row["time_replay"] = t_replay  # policy replay forwards with gradients, TVE
            row["time_update"] = time.perf_counter() - t2 - t_replay  # backward, all-reduce, AdamW
            if device.type == "cuda":  # this rank's peak through the iteration's training stages
                row["cuda_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            eval_samples = {}  # name -> GIF of this step's evaluation samples, for the loggers
            evaluated = (it + 1) % cfg.eval_every == 0 or it + 1 == cfg.iterations
            if evaluated:
                ev = evaluation(it)
                row.update(ev.scores)
                if lead and it + 1 == cfg.iterations and cfg.samples:
                    save_videos(ev.videos, out / "samples_after")
                if lead and cfg.samples and cfg.samples_at_eval:
                    stem = out / "samples" / f"step_{it + 1:06d}"
                    eval_samples["eval"] = save_videos(ev.videos, stem, mp4=False)[0]
                    stem = out / "samples" / f"group_{it + 1:06d}"
                    eval_samples["group"] = save_group(model, ex, stem)
            history.append(row)
            if evaluated:
                keep_if_best(it + 1)
            if lead:
                log.write(row)
                group_log.write(*groups)
                for lg in loggers:
                    lg.write(row)
                    if eval_samples:
                        lg.videos(eval_samples)
                tqdm.write(progress_line(row, list(ex.comps), bool(cfg.tau_auto)), file=sys.stdout)
                if skipped:
                    tqdm.write(
                        f"it {it:4d} | {skipped} of {cfg.epochs} optimizer steps skipped: NaN or inf "
                        f"gradient norm ({skips.in_a_row} in a row, the run stops after "
                        f"{cfg.max_skipped_steps})",
                        file=sys.stdout,
                    )
                if row["valid_groups"] == 0:
                    tqdm.write(
                        f"it {it:4d} | no group trained: {NO_GROUP[cfg.advantage]}", file=sys.stdout
                    )
            saved = (it + 1) % cfg.save_every == 0 or it + 1 == cfg.iterations
            if saved and lead:
                save(it + 1)
            longest = max(longest, time.monotonic() - t_iter)
            late = bool(cfg.max_minutes) and (
                time.monotonic() - t_start + longest > 60 * cfg.max_minutes
            )  # the next iteration (with an evaluation, say) would end past the limit
            stopped = stop.requested(late)
            if stopped:
                if lead and not saved:
                    save(it + 1)
                break
    profiler.close()
    if lead and stopped:
        done = history[-1]["iter"] + 1 if history else start
        print(
            f"stopped by {stopped} after {done} of {cfg.iterations} iterations, saved in "
            f"{out / 'checkpoint.safetensors'}; the same command with --resume auto continues "
            "the run",
            flush=True,
        )
    elif lead:
        first = next((h["eval_reward"] for h in history if "eval_reward" in h), float("nan"))
        last = history[-1]
        print(
            f"done: eval reward {first:.4f} -> {last.get('eval_reward', float('nan')):.4f}"
            + (f" (EMA {last['eval_ema_reward']:.4f})" if "eval_ema_reward" in last else "")
            + (
                f", multi-prompt {history[0]['eval_mp_reward']:.4f} -> {last['eval_mp_reward']:.4f}"
                if "eval_mp_reward" in last and "eval_mp_reward" in history[0]
                else ""
            )
            + f"; outputs in {out}/",
            flush=True,
        )
        changes = prompt_changes(out / "eval_prompts.jsonl")
        if changes:
            print(changes, flush=True)
    for lg in loggers:
        if cfg.samples and not stopped:
            lg.videos({k: out / f"samples_{k}.gif" for k in ("before", "after")})
        lg.close()
    distributed.shutdown()
    return TrainResult(history, model, None if ema is None else ema.model, stopped)


def main(argv: list[str] | None = None) -> None:
    try:
        cfg = parse_args(argv)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        result = train(cfg)
    except (
        ConfigError,
        CheckpointError,
        RewardSpecError,
        NonFiniteGradientError,
        NonFiniteVideoError,
        RewardOutputError,
        TrainingOutOfMemoryError,
    ) as e:
        raise SystemExit(f"error: {e}") from None
    if result.stopped_by and result.stopped_by.startswith("SIG"):  # saved, not finished: the
        raise SystemExit(128 + signal.Signals[result.stopped_by])  # shell's status for it


if __name__ == "__main__":
    main()
