"""The policy update of one iteration: replay with gradients, the PPO objective and KL term, their
gradient accumulated over micro-batches of groups, the optimizer steps (one whose gradient is NaN
or inf skipped); the learning-rate schedule."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from torch import nn

from kvpo.generators.ema import ParamEMA
from kvpo.method.likelihood import branch_log_probs, kl_term
from kvpo.method.replay import replay_velocities, trajectory_energy
from kvpo.method.rollout import Rollout
from kvpo.run import distributed
from kvpo.run.config import TrainConfig

# Statistics of ppo_objective (and its loss): means over the valid groups' entries.
PPO_STATS = ("ratio", "clip_frac", "loss")


class UpdateBatch(Protocol):
    """What the update reads of an iteration (:class:`kvpo.method.iteration.Exploration`)."""

    parts: list[Rollout]  # the micro-batches' rollouts
    step_weights: list[torch.Tensor]  # each part's TVE step weights
    adv: torch.Tensor  # [B, G] advantages
    valid: torch.Tensor  # [B] bool: groups trained on
    group_weight: torch.Tensor  # [B] each group's weight in the PPO loss and KL
    refs: list[tuple[torch.Tensor | None, torch.Tensor | None]]  # each part's reference terms
    tau: float  # the iteration's Gibbs temperature
    logp_old: list[torch.Tensor] | None  # each part's old policy's (None: the first epoch's)


class Part(NamedTuple):
    """One micro-batch of an iteration as the update reads it."""

    ro: Rollout
    weight: torch.Tensor  # [K] TVE step weights
    adv: torch.Tensor  # [B, G] advantages
    valid: torch.Tensor  # [B] bool: groups trained on
    group_weight: torch.Tensor  # [B] each group's weight in the PPO loss and KL
    logp_old: torch.Tensor | None  # the rollout policy's log-probabilities (None: these ones)
    u_ref: torch.Tensor | None  # the reference's replay velocities (kl velocity or softmax)
    logp_ref: torch.Tensor | None  # the reference's log-probabilities (kl softmax)


def policy_gradients(
    cfg: TrainConfig,
    model: nn.Module,
    part: Part,
    autocast: Callable[[], torch.autocast],
    ppo_share: float = 1.0,
    kl_share: float = 1.0,
    tau: float | None = None,
) -> tuple[dict[str, float], torch.Tensor, float]:
    """Accumulate into the policy's ``.grad`` the gradient of ``ppo_share`` times the PPO
    objective plus ``kl_share * kl_coef`` times the KL term, from its replay of ``part.ro`` (the
    shares weigh a micro-batch's terms in the whole batch's: :func:`accumulate_gradients`), at
    the Gibbs temperature ``tau`` (the iteration's; None: ``cfg.tau``).

    Everything the objective reads is the replay's velocities ``u`` [B, G, K, L, d]. With
    ``cfg.replay_branches`` < G the graph of the whole replay is never held: ``u`` is computed
    without it, ``replay_branches`` branches per group at a time, the objective's gradient
    ``dL/du`` from that, and the branches are replayed again as many at a time, each pushing its
    slice of ``dL/du`` through the model (the same gradient; one extra forward; the activations
    of ``replay_branches`` branches per group).

    Returns the step's statistics, the old log-probabilities (``part.logp_old``, or these ones on
    the first epoch: the rollout policy is the policy before the first step) and the seconds
    spent in replay forwards."""
    ro, weight, adv, valid, group_weight, logp_old, u_ref, logp_ref = part
    G = ro.tokens.shape[1]
    per = cfg.replay_branches or G
    t0 = time.perf_counter()
    with autocast(), torch.set_grad_enabled(per >= G):
        u = replay_velocities(model, ro, per)
    if per < G:
        u = u.detach().requires_grad_()
    with autocast():  # the backward runs outside, as autocast wants
        energy = trajectory_energy(u, ro, weight)
        logp = branch_log_probs(cfg, model, u, ro, energy, tau)
    t_replay = time.perf_counter() - t0
    logp_old = logp.detach() if logp_old is None else logp_old
    loss, st = ppo_objective(
        logp, logp_old, adv, valid, cfg.clip_low, cfg.clip_high, cfg.log_ratio_clamp, group_weight
    )
    kl = loss.new_zeros(())
    if u_ref is not None:  # a mean over the groups, each at its weight
        kl = (kl_term(cfg, u, u_ref, logp, logp_ref) * group_weight.to(kl.dtype)).mean()
    (loss * ppo_share + cfg.kl_coef * kl * kl_share).backward()
    for g0 in range(0, G if per < G else 0, per):
        sel = slice(g0, g0 + per)
        t0 = time.perf_counter()
        with autocast():
            u_sel = replay_velocities(model, ro.branches(sel))
        t_replay += time.perf_counter() - t0
        u_sel.backward(u.grad[:, sel].to(u_sel.dtype))
    stats = {**st, "loss": float(loss.detach()), "kl": float(kl.detach())}
    stats["tve"] = float(energy.detach().mean())
    return stats, logp_old, t_replay


def accumulate_gradients(
    cfg: TrainConfig,
    model: nn.Module,
    batch: UpdateBatch,
    logp_old: list[torch.Tensor | None],
    autocast: Callable[[], torch.autocast],
) -> tuple[dict[str, float], list[torch.Tensor], float]:
    """:func:`policy_gradients` of a batch of groups rolled out in micro-batches ``batch.parts``
    (consecutive groups; ``batch.adv`` [B, G], ``batch.valid`` [B] of the whole batch), each
    against its old log-probabilities ``logp_old``, replayed and back-propagated one part at a
    time: the activations of one part, the gradient of the whole batch's objective. The PPO loss
    is a mean over the valid groups' entries and the KL term a mean over the groups, so a part's
    terms weigh its share of the valid groups and of the groups.

    Returns the batch's statistics, each part's old log-probabilities and the replay seconds."""
    parts, valid = batch.parts, batch.valid
    B = sum(r.tokens.shape[0] for r in parts)
    n_valid = float(valid.sum())
    totals: dict[str, float] = {}
    olds, t_replay, g0 = [], 0.0, 0
    for ro, w, old, ref in zip(parts, batch.step_weights, logp_old, batch.refs, strict=True):
        sel = slice(g0, g0 + ro.tokens.shape[0])
        g0 = sel.stop
        kl_share = (sel.stop - sel.start) / B
        ppo_share = float(valid[sel].sum()) / n_valid if n_valid else 0.0
        part = Part(ro, w, batch.adv[sel], valid[sel], batch.group_weight[sel], old, *ref)
        st, old, dt = policy_gradients(cfg, model, part, autocast, ppo_share, kl_share, batch.tau)
        olds.append(old)
        t_replay += dt
        for k, v in st.items():  # PPO statistics are means over the valid groups' entries
            share = ppo_share if k in PPO_STATS and n_valid else kl_share
            totals[k] = totals.get(k, 0.0) + share * v
    return totals, olds, t_replay


class NonFiniteGradientError(FloatingPointError):
    """More optimizer steps in a row than ``max_skipped_steps`` had a NaN or inf gradient."""


@dataclass
class SkippedSteps:
    """Counts the optimizer steps skipped for a NaN or inf gradient in a row, across
    iterations; more than ``limit`` in a row raise :class:`NonFiniteGradientError`."""

    limit: int
    in_a_row: int = 0

    def count(self, norm: float) -> bool:
        """Whether the step of gradient norm ``norm`` was skipped (it was not finite)."""
        if math.isfinite(norm):
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        if self.in_a_row > self.limit:
            raise NonFiniteGradientError(
                f"{self.in_a_row} optimizer steps in a row had a NaN or inf gradient (config "
                f"max_skipped_steps={self.limit}): the run diverged; resume from its last "
                "checkpoint with a smaller lr or grad_clip, or without amp"
            )
        return True


def optimizer_step(
    opt: torch.optim.Optimizer, params: list[nn.Parameter], grad_clip: float
) -> float:
    """Clip the gradients of ``params`` to norm ``grad_clip`` and step ``opt``, unless their norm
    is NaN or inf: then the step is skipped (weights and AdamW's moments and step count stay as
    they were; clipping a NaN norm would turn every gradient NaN and the step every weight).
    Every rank holds the same averaged gradients, so every rank decides alike.

    Returns the gradient norm before clipping (NaN or inf: the step was skipped)."""
    norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    if math.isfinite(norm):
        opt.step()
    return norm


def update_policy(
    cfg: TrainConfig,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    params: list[nn.Parameter],
    ema: ParamEMA | None,
    batch: UpdateBatch,
    autocast: Callable[[], torch.autocast],
    skips: SkippedSteps,
) -> tuple[dict[str, float], float, int]:
    """An iteration's update on ``batch``: ``cfg.epochs`` AdamW steps of ``params`` (the trainable ones), each
    on the gradient of the whole batch's objective (:func:`accumulate_gradients`, against the
    first epoch's log-probabilities), averaged over the ranks and clipped; the EMA follows each
    step. A step whose gradient is not finite is skipped (:func:`optimizer_step`, ``skips``).

    Returns the statistics averaged over the epochs (``grad_norm`` included), the replay
    seconds, and the number of steps skipped."""
    logp_old: list[torch.Tensor | None] = list(batch.logp_old or [None] * len(batch.parts))
    stats, t_replay, skipped = [], 0.0, 0
    for _ in range(cfg.epochs):
        opt.zero_grad(set_to_none=True)
        st, logp_old, dt = accumulate_gradients(cfg, model, batch, logp_old, autocast)
        t_replay += dt
        distributed.average_gradients(params)
        norm = optimizer_step(opt, params, cfg.grad_clip)
        if skips.count(norm):
            skipped += 1
        elif ema is not None:
            ema.update(model)
        stats.append({**st, "grad_norm": norm})
    return {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}, t_replay, skipped


def learning_rate(cfg: TrainConfig, it: int) -> float:
    """AdamW's learning rate in iteration ``it``: ``lr * (it + 1) / lr_warmup`` during the warmup,
    then ``lr`` (``constant``) or ``lr`` decaying on a half cosine to ~0 at the last iteration
    (``cosine``); ``public``: diffusers' ``constant_with_warmup`` stepped once per old-policy
    sync, ``lr * min(1, (it // old_policy_sync) / lr_warmup)`` (from 0). A function of the
    iteration and the config alone, so a resumed run steps as the original (one resumed with
    more ``iterations`` follows the longer cosine)."""
    if cfg.lr_schedule == "public":
        done = it // max(cfg.old_policy_sync, 1)
        return cfg.lr * min(1.0, done / cfg.lr_warmup) if cfg.lr_warmup else cfg.lr
    if it < cfg.lr_warmup:
        return cfg.lr * (it + 1) / cfg.lr_warmup
    if cfg.lr_schedule == "cosine":
        done = (it - cfg.lr_warmup) / max(cfg.iterations - cfg.lr_warmup, 1)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * done))
    return cfg.lr


def ppo_objective(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    adv: torch.Tensor,
    valid: torch.Tensor,
    clip_low: float = 0.1,
    clip_high: float = 0.2,
    log_ratio_clamp: float = 0.0,
    group_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``-mean w_b min(ratio A, clip(ratio, 1 - clip_low, 1 + clip_high) A)`` over valid groups,
    ``ratio = exp(clamp(logp - logp_old, +-log_ratio_clamp))`` (0: no clamp), ``w_b`` the
    group's weight ``group_weight`` [B] (None: 1).

    Args:
        logp, logp_old: [B, G] branch log-probabilities, or [B, G, K] per-step ones (the SDE
            baseline), ratios taken elementwise.
        adv: [B, G] (broadcast over K); valid: [B] bool.

    Returns the loss (0 with no valid group) and stats over the valid groups' entries: the
    ratio's mean (with no valid group, over every entry: how far the policy has moved from the
    rollout's, which a KL step alone moves, not a 0 that reads as a collapse) and the fraction
    the clip cut (0 with none).
    """
    if adv.dim() < logp.dim():
        adv = adv.reshape(*adv.shape, *[1] * (logp.dim() - adv.dim()))
    log_ratio = logp - logp_old
    if log_ratio_clamp:
        log_ratio = log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high)
    obj = torch.minimum(ratio * adv, clipped * adv)
    m = valid.reshape(-1, *[1] * (obj.dim() - 1)).expand_as(obj).to(obj.dtype)
    n = m.sum().clamp_min(1.0)
    w = m if group_weight is None else m * group_weight.reshape(m.shape[:1] + (1,) * (m.dim() - 1))
    loss = -(obj * w.to(obj.dtype)).sum() / n
    was_clipped = ((ratio * adv) > (clipped * adv)).to(obj.dtype)
    seen = m if bool(valid.any()) else torch.ones_like(m)
    stats = {
        "ratio": float((ratio.detach() * seen).sum() / seen.sum().clamp_min(1.0)),
        "clip_frac": float((was_clipped * m).sum() / n),
    }
    return loss, stats
