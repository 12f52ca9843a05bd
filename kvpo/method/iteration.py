"""One iteration's data: this rank's groups rolled out with KV routing (``micro_batch`` at a
time), their rewards and advantages, the iteration's Gibbs temperature and the frozen reference's
terms of the KL; everything the update reads."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kvpo.method.advantages import advantages, micro_batch_rewards
from kvpo.method.likelihood import iteration_tau, old_log_probs, reference_terms
from kvpo.method.replay import step_weights
from kvpo.method.rollout import Rollout, RolloutSpec, rollout
from kvpo.method.scoring import fused_reward
from kvpo.rewards import CompositeReward
from kvpo.run import distributed
from kvpo.run.config import TrainConfig
from kvpo.run.memory import memory_stage


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
    group_weight: torch.Tensor  # [B] each group's weight in the loss (protect=halve: 0.5 gated)
    spread: torch.Tensor  # [B] float32 on the CPU: each group's Rollout.branch_spread
    step_weights: list[torch.Tensor]  # each part's TVE step weights
    tau: float  # the iteration's Gibbs temperature (kvpo.method.likelihood.iteration_tau)
    refs: list[tuple[torch.Tensor | None, torch.Tensor | None]]  # each part's reference terms
    # each part's log-probabilities under the old policy that rolled it out (old_policy_sync)
    logp_old: list[torch.Tensor] | None
    # time_rollout, time_reward (and advantages), time_reference; time_tau (its replay);
    # time_old_policy (the old policy's replay)
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
    old: nn.Module | None = None,
) -> Exploration:
    """Roll out this rank's groups ``batch`` (``micro_batch`` at a time: one's KV cache at a
    time) by ``old`` (the lagged old policy; None: ``model``), score them, take their advantages
    (over every rank's groups) and, without gradients, the frozen reference's terms of the KL
    and the old policy's log-probabilities."""
    t0 = time.perf_counter()
    model.eval()
    roller = model if old is None else old
    step = cfg.micro_batch or len(batch)
    with autocast(), memory_stage("rollout", cfg):
        parts = [
            rollout(roller, batch[g : g + step], spec, gen, device)
            for g in range(0, len(batch), step)
        ]
    t1 = time.perf_counter()
    with memory_stage("reward", cfg):
        comps, anchor, weights = micro_batch_rewards(
            model, parts, reward, cfg.reward_scopes, cfg.segment_clip
        )
    total = fused_reward(comps, weights)
    all_comps = {k: distributed.all_gather(v) for k, v in comps.items()}
    adv, valid, group_weight = advantages(cfg, total, comps, anchor, weights, all_comps)
    step_w = [step_weights(ro, cfg.step_weighting) for ro in parts]
    t2 = time.perf_counter()
    with autocast(), memory_stage("tau", cfg):
        tau = iteration_tau(cfg, model, parts, step_w)
    t3 = time.perf_counter()
    with torch.no_grad(), autocast(), memory_stage("reference", cfg):
        refs = [reference_terms(cfg, ref, ro, w, tau) for ro, w in zip(parts, step_w, strict=True)]
    t4 = time.perf_counter()
    with autocast(), memory_stage("reference", cfg):  # a no-grad replay, as the reference's
        logp_old = None if old is None else old_log_probs(cfg, old, parts, step_w, tau)
    # the frozen reference's forward for the KL: logged apart, it can cost more than the rewards
    seconds = {
        "time_rollout": t1 - t0,
        "time_reward": t2 - t1,
        "time_reference": t4 - t3,
        **({"time_tau": t3 - t2} if cfg.tau_auto else {}),
        **({"time_old_policy": time.perf_counter() - t4} if old is not None else {}),
    }
    spread = torch.cat([ro.branch_spread().cpu() for ro in parts])
    return Exploration(
        parts,
        comps,
        all_comps,
        total,
        adv.to(device),
        valid.to(device),
        group_weight.to(device),
        spread,
        step_w,
        tau,
        refs,
        logp_old,
        seconds,
    )
