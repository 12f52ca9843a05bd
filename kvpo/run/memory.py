"""Out of GPU memory: an error that names the stage of the run that ran out and the settings
that bound that stage's memory, instead of a bare allocator message deep in a kernel."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from kvpo.run.config import TrainConfig

# What holds each stage's memory, and the settings that bound it (with the fields to report).
STAGES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "rollout": (
        "the KV pages of micro_batch groups of group_size branches (rollout_cache_mib in the log)",
        "--micro_batch 1, --rollout_branches 1 (or a few), a smaller --group_size, or a window "
        "that starts later",
        ("micro_batch", "rollout_branches", "group_size", "window"),
    ),
    "reward": (
        "the reward models on a micro-batch's decoded videos",
        "--micro_batch 1, or the reward models on another device",
        ("micro_batch",),
    ),
    "reference": (
        "the frozen reference's replay of a micro-batch, without gradients",
        "--micro_batch 1, --replay_branches 1, or --kl none",
        ("micro_batch", "replay_branches", "kl"),
    ),
    "tau": (
        "the policy's replay of a micro-batch without gradients, whose energies set tau_auto's tau",
        "--micro_batch 1, --replay_branches 1, or --tau_auto 0 (a fixed --tau)",
        ("micro_batch", "replay_branches", "tau_auto"),
    ),
    "update": (
        "the policy's replay activations, kept for the backward",
        "--replay_branches 1, --grad_checkpointing true, --micro_batch 1",
        ("replay_branches", "grad_checkpointing", "micro_batch", "amp"),
    ),
    "evaluation": (
        "eval_batch held-out videos made at a time",
        "--eval_batch 1",
        ("eval_batch",),
    ),
}


class TrainingOutOfMemoryError(torch.OutOfMemoryError):
    """The GPU ran out of memory in a stage of a training run; the message names the stage, the
    settings that bound its memory and their values, then the allocator's own message."""


@contextmanager
def memory_stage(stage: str, cfg: TrainConfig) -> Iterator[None]:
    """Turns an out-of-memory error raised in ``stage`` (a key of :data:`STAGES`) into a
    :class:`TrainingOutOfMemoryError` saying what to change."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        if isinstance(e, TrainingOutOfMemoryError):  # named by an inner stage already
            raise
        what, change, fields = STAGES[stage]
        now = ", ".join(f"{f}={getattr(cfg, f)!r}" for f in fields)
        raise TrainingOutOfMemoryError(
            f"out of GPU memory in the {stage}, which holds {what} (now {now}); try {change}. {e}"
        ) from e
