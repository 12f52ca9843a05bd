"""What a run's config resolves to before it trains, and the checks that refuse it early: its
prompts, reward, device and checkpoint to resume, each with an error naming the setting."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from kvpo.evaluate import evaluation_metrics
from kvpo.generators import data
from kvpo.method.exploration import shifted, window_shifts
from kvpo.method.scoring import check_clips
from kvpo.rewards import GENERIC, ClipReward, CompositeReward, RewardFn, load_reward
from kvpo.run import distributed
from kvpo.run.checkpoint import CheckpointError, saved_progress
from kvpo.run.config import ConfigError, TrainConfig, config_errors


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


def prompt_sets(prompts: object) -> tuple[list[str], list[str]]:
    """``train``'s ``prompts`` as (training prompts, held-out prompts), or a ValueError saying
    what it must be (a flat list of two prompts would unpack into two prompts' characters)."""
    pair = list(prompts) if isinstance(prompts, (tuple, list)) else []
    sets = [list(p) for p in pair if isinstance(p, (tuple, list))]
    if (
        len(pair) != 2
        or len(sets) != 2
        or not all(sets)
        or not all(isinstance(p, str) for s in sets for p in s)
    ):
        raise ValueError(
            "prompts must be (training prompts, held-out prompts): two non-empty lists of "
            f"strings, got {_brief(prompts)}"
        )
    return sets[0], sets[1]


def check_held_out(train: list[str], held: list[str]) -> None:
    """A ConfigError naming the held-out prompts that a training prompt also holds, whole or as
    a segment of a multi-prompt ``"A | B"`` (the held-out reward would measure trained prompts)."""
    segs = {s for p in train for s in data.prompt_segments(p)}
    seen = [p for p in held if set(data.prompt_segments(p)) & segs]
    if seen:
        raise ConfigError(
            f"{len(seen)} held-out prompt(s) also trained on (whole or as a segment), e.g. "
            f"{_brief(seen[0])}: held-out prompts must be disjoint from the training prompts"
        )


def _brief(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def held_out_prompts(cfg: TrainConfig) -> list[str]:
    """The prompts a run with ``cfg`` evaluates on."""
    return list(config_prompts(cfg)[1])[: cfg.eval_prompts]


def check_wan_paths(cfg: TrainConfig) -> None:
    """With ``wan_dir``: a ConfigError unless it is a diffusers Wan2.1 directory and
    ``wan_checkpoint`` (if any) a file; before the minutes a Wan2.1 load takes. ``lora_init``
    (if any) must be a file, with or without ``wan_dir``."""
    if cfg.lora_init and not Path(cfg.lora_init).is_file():
        raise ConfigError(f"config lora_init={cfg.lora_init!r} is not a file")
    if not cfg.wan_dir:
        return
    from kvpo.generators.wan.weights import check_wan_dir

    with config_errors():
        check_wan_dir(cfg.wan_dir, "config wan_dir")
        if cfg.wan_checkpoint and not Path(cfg.wan_checkpoint).is_file():
            raise ValueError(f"config wan_checkpoint={cfg.wan_checkpoint!r} is not a file")


def check_run_rewards(
    cfg: TrainConfig, model: nn.Module, reward: CompositeReward, prompts: list[str]
) -> None:
    """Before any video is made, a :class:`ConfigError` if a prompt's ``"A | B"`` segments do not
    fit the video's chunks, a reward cannot read the scene it asks for, a reward scope's clip (at
    any window start) or the evaluation's whole video is too short for a reward, or
    ``keep_best`` names no metric the evaluation logs."""
    chunks = model.num_frames // model.chunk_frames
    windows = [shifted(cfg.window, s) for s in window_shifts(cfg, chunks)]
    with config_errors():
        reward.check_prompts(q for p in prompts for q in data.segments([p] * chunks))
        layout = None if cfg.streaming_chunk is None else tuple(cfg.streaming_chunk)
        check_clips(model, reward, {**cfg.reward_scopes, "video": 1.0}, windows, layout)
    if cfg.keep_best:
        metrics = evaluation_metrics(reward, cfg)
        if cfg.keep_best not in metrics:
            raise ConfigError(
                f"config keep_best={cfg.keep_best!r} is not a metric of this run's evaluation: "
                f"{metrics}"
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
        print(
            f"kvpo: out_dir {cfg.out_dir!r} held a finished run ({done} iterations); this run "
            "starts afresh over it",
            flush=True,
        )


def resolve_resume(cfg: TrainConfig) -> TrainConfig:
    """``resume: auto`` as the checkpoint it stands for: out_dir's own, if there is one, else
    none (a requeued job's unchanged command continues where it stopped)."""
    if cfg.resume != "auto":
        return cfg
    latest = Path(cfg.out_dir) / "checkpoint.safetensors"
    return dataclasses.replace(cfg, resume=str(latest) if latest.is_file() else "")
