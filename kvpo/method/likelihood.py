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
    ``log_softmax_i(-E_i / tau)``. ``likelihood="step"`` (the public recipe): one per scored step,
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
    tau = cfg.tau if tau is None else tau
    return gibbs_log_probs(energy, tau) if cfg.group_normalize else -energy / tau


def gibbs_energies(
    cfg: TrainConfig, u: torch.Tensor, ro: Rollout, energy: torch.Tensor | None
) -> torch.Tensor:
    """What KVPO's Gibbs form divides by ``tau``: the TVE ``energy`` [B, G]
    (``likelihood="branch"``), or each scored step's velocity distance over its floored noise
    level squared, [B, G, K'] (``likelihood="step"``)."""
    if cfg.likelihood == "branch":
        return energy
    scored = ro.scored.to(u.device)
    sigma = ro.t.to(u.device)[scored].clamp_min(cfg.sigma_floor)
    return step_energies(u, ro)[:, :, scored] / sigma**2


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
    """The regularizer toward the reference policy: ``velocity``: ``mean (u - u_ref)^2`` over the
    replayed velocities; ``softmax``: ``KL(p || p_ref)`` of the branch distributions ([B, G] or
    per step [B, G, K]); ``none``: 0."""
    if cfg.kl == "velocity":
        return (u.float() - u_ref.float()).pow(2).mean()
    if cfg.kl == "softmax":  # KL of the branch softmax, whether or not logp is normalized
        lp, lr = logp.log_softmax(1), logp_ref.log_softmax(1)
        return (lp.exp() * (lp - lr)).sum(1).mean()
    return u.new_zeros(())


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
    u_ref = replay_velocities(ref, ro, cfg.replay_branches)
    if cfg.kl != "softmax":
        return u_ref, None
    energy = trajectory_energy(u_ref, ro, weight)
    return u_ref, branch_log_probs(cfg, ref, u_ref, ro, energy, tau)
