"""Branch log-probabilities under a policy (KVPO's Gibbs form, or the SDE baseline's Gaussian
steps) and the KL terms toward the reference policy."""

from __future__ import annotations

import torch
from torch import nn

from kvpo.generators.interface import StreamingVideoGenerator
from kvpo.method.replay import replay_velocities, step_energies, trajectory_energy
from kvpo.method.rollout import Rollout
from kvpo.method.sde import sde_t_cap, step_log_probs
from kvpo.run import distributed
from kvpo.run.config import TrainConfig


def branch_log_probs(
    cfg: TrainConfig,
    model: StreamingVideoGenerator,
    u: torch.Tensor,
    ro: Rollout,
    energy: torch.Tensor | None,
    tau: float | None = None,
) -> torch.Tensor:
    """Log-probabilities of the branches under the policy whose replay velocities are ``u``, at
    the Gibbs temperature ``tau`` (the iteration's; None: ``cfg.tau``).

    KVPO, ``likelihood="branch"``: Gibbs branch log-probabilities [B, G] from the TVE ``energy``,
    ``log_softmax_i(-E_i / tau)``; ``likelihood="x0"`` (the public recipe) the same over its
    x0-space energy at tau = 1. ``likelihood="step"``: one per scored step,
    [B, G, K'], from the step's velocity distance in units of its noise level floored at
    ``sigma_floor``: ``E_ik = mean_n (u_k - v_k)^2 / max(t_k, sigma_floor)^2``. With
    ``group_normalize=False`` the log-probabilities are ``-E / tau``, not normalized over the group.
    The SDE baseline: the Gaussian log-probability of every scored stochastic step [B, G, K']."""
    if cfg.explore == "sde":  # Gaussian densities in fp32 whatever the forwards' precision
        scored = ro.scored.to(u.device)
        t_cap = sde_t_cap(model.timesteps())
        states, vels = ro.states.float(), ro.velocities.float()
        logp = step_log_probs(u.float(), states, vels, ro.t, ro.t_next, t_cap, cfg.sde_noise)
        return logp[:, :, scored]
    energy = gibbs_energies(cfg, u, ro, energy)
    tau = 1.0 if cfg.likelihood == "x0" else cfg.tau if tau is None else tau
    return gibbs_log_probs(energy, tau) if cfg.group_normalize else -energy / tau


def gibbs_energies(
    cfg: TrainConfig, u: torch.Tensor, ro: Rollout, energy: torch.Tensor | None
) -> torch.Tensor:
    """What KVPO's Gibbs form divides by ``tau``: the TVE ``energy`` [B, G]
    (``likelihood="branch"``); each scored step's velocity distance over its floored noise level
    squared, [B, G, K'] (``"step"``); or the public recipe's x0-space energy [B, G] (``"x0"``,
    :func:`x0_energy`). With ``log_prob_grad_steps`` only each chunk's first steps pass gradient."""
    if cfg.likelihood == "branch":
        return energy
    scored = ro.scored.to(u.device)
    e = grad_steps_only(step_energies(u, ro), ro, cfg.log_prob_grad_steps)
    if cfg.likelihood == "x0":
        return x0_energy(e, ro.t.to(u.device), scored, cfg.sigma_floor)
    sigma = ro.t.to(u.device)[scored].clamp_min(cfg.sigma_floor)
    return e[:, :, scored] / sigma**2


def x0_energy(
    e: torch.Tensor, t: torch.Tensor, scored: torch.Tensor, sigma_floor: float
) -> torch.Tensor:
    """The public recipe's branch energy from the step energies ``e`` [B, G, K] (``mean_n (u_k -
    v_k)^2``) at noise levels ``t`` [K]: ``sum_k mean_n (x0_k - x0'_k)^2 / (2 max(t_k, floor)^2)``
    over the ``scored`` [K] records, where ``x0 = x_t - t v`` makes ``x0_k - x0'_k = t_k (v_k -
    u_k)``. [B, G]; ``log_softmax(-E)`` is its branch log-probability at tau = 1."""
    coef = t.square() / (2 * t.clamp_min(sigma_floor).square())
    return (e * (coef * scored.to(e.dtype))).sum(-1)


def grad_steps_only(e: torch.Tensor, ro: Rollout, n: int) -> torch.Tensor:
    """``e`` [B, G, K] with the records past each chunk's first ``n`` denoising steps detached:
    they count in the value, not in the gradient (``n`` = 0: every record passes gradient)."""
    if not n:
        return e
    grad = (ro.step < n).to(e.device)
    return torch.where(grad, e, e.detach())


def policy_energies(
    cfg: TrainConfig,
    model: StreamingVideoGenerator,
    parts: list[Rollout],
    weights: list[torch.Tensor],
) -> list[torch.Tensor]:
    """Each part's :func:`gibbs_energies` under ``model``, replayed without gradients
    (``replay_branches`` branches at a time; call under the run's autocast): [B, G] or
    [B, G, K'] float32 each."""
    out = []
    with torch.no_grad():
        for ro, w in zip(parts, weights, strict=True):
            u = replay_velocities(model, ro, cfg.replay_branches)
            out.append(gibbs_energies(cfg, u, ro, trajectory_energy(u, ro, w)).float())
    return out


def old_log_probs(
    cfg: TrainConfig,
    old: StreamingVideoGenerator,
    parts: list[Rollout],
    weights: list[torch.Tensor],
    tau: float,
) -> list[torch.Tensor]:
    """Each part's branch log-probabilities under the old policy ``old`` that rolled it out
    (``old_policy_sync``), replayed without gradients: what the PPO ratio divides by."""
    with torch.no_grad():
        return [
            replayed_log_probs(cfg, old, ro, w, tau)[1]
            for ro, w in zip(parts, weights, strict=True)
        ]


def replayed_log_probs(
    cfg: TrainConfig, model: nn.Module, ro: Rollout, weight: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``model``'s replay velocities of ``ro`` (``replay_branches`` branches per group at a time)
    and its branch log-probabilities at ``tau``, under the caller's grad mode."""
    u = replay_velocities(model, ro, cfg.replay_branches)
    return u, branch_log_probs(cfg, model, u, ro, trajectory_energy(u, ro, weight), tau)


def energy_spread(energies: list[torch.Tensor]) -> float | None:
    """The median, over every rank's groups (and scored steps, for ``likelihood="step"``), of the
    spread (std over the branches, dim 1) of ``energies`` (:func:`policy_energies`); None when
    every group's branches tie, as such groups say nothing of the energies' scale."""
    spread = distributed.all_gather(torch.cat([e.std(1).flatten().cpu() for e in energies]))
    spread = spread[spread > 0]
    return float(spread.median()) if spread.numel() else None


def iteration_tau(
    cfg: TrainConfig,
    model: StreamingVideoGenerator,
    parts: list[Rollout],
    weights: list[torch.Tensor],
) -> float:
    """The iteration's Gibbs temperature: ``cfg.tau``, or with ``cfg.tau_auto`` > 0 that times
    the :func:`energy_spread` of the iteration's groups under the policy before its update: the
    temperature at which a typical group's old log-probabilities span about ``1 / tau_auto``,
    whatever the scale of the TVE (``cfg.tau`` when every group's branches tie)."""
    if not cfg.tau_auto:  # no replay for a fixed tau
        return cfg.tau
    return gibbs_tau(cfg, policy_energies(cfg, model, parts, weights))


def gibbs_tau(cfg: TrainConfig, energies: list[torch.Tensor]) -> float:
    """``cfg.tau``, or with ``cfg.tau_auto`` > 0 that times the :func:`energy_spread` of
    ``energies`` (``cfg.tau`` when every group's branches tie)."""
    spread = energy_spread(energies) if cfg.tau_auto else None
    return cfg.tau if spread is None else cfg.tau_auto * spread


def kl_term(
    cfg: TrainConfig,
    u: torch.Tensor,
    u_ref: torch.Tensor,
    logp: torch.Tensor | None,
    logp_ref: torch.Tensor | None,
) -> torch.Tensor:
    """The regularizer toward the reference policy, per group [B]: ``velocity``: ``mean (u -
    u_ref)^2`` over the group's replayed velocities; ``softmax``: ``KL(p || p_ref)`` of its
    branch distribution ([B, G], or per step [B, G, K]: the mean over steps); ``none``: 0."""
    if cfg.kl == "velocity":
        return (u.float() - u_ref.float()).pow(2).flatten(1).mean(1)
    if cfg.kl == "softmax":  # KL of the branch softmax, whether or not logp is normalized
        lp, lr = logp.log_softmax(1), logp_ref.log_softmax(1)
        return (lp.exp() * (lp - lr)).sum(1).reshape(lp.shape[0], -1).mean(1)
    return u.new_zeros(u.shape[0])


def gibbs_log_probs(energy: torch.Tensor, tau: float) -> torch.Tensor:
    """``log p_i = log softmax_i(-E_i / tau)`` within each group: [B, G] -> [B, G]."""
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    return torch.log_softmax(-energy / tau, dim=1)


def reference_terms(
    cfg: TrainConfig, ref: nn.Module, ro: Rollout, weight: torch.Tensor, tau: float
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """What the KL term reads of the frozen reference policy (call without grad): its replay
    velocities of ``ro`` (``replay_branches`` branches per group at a time; for ``kl`` velocity
    or softmax) and its branch log-probabilities at the iteration's ``tau`` (for softmax)."""
    if cfg.kl == "none":
        return None, None
    if cfg.kl != "softmax":
        return replay_velocities(ref, ro, cfg.replay_branches), None
    return replayed_log_probs(cfg, ref, ro, weight, tau)
