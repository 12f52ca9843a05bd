"""The Flow-GRPO baseline: exploration by SDE noise, PPO on Gaussian step log-probabilities.

KVPO explores by KV routing and scores branches by their velocity energy; the baseline it is
compared with turns the probability-flow ODE into an SDE with the same marginals and scores each
stochastic step by its closed-form Gaussian density. Its SDE steps replace the generator's own
sampler step (:mod:`kvpo.generators.sampler`) on the scored steps only; under ``renoise`` every other step
re-noises with the group's shared noise.

Time runs from t = 1 (noise) to t = 0 (data), ``x_t = (1 - t) x_0 + t eps`` and ``v = eps - x_0``,
as in the generator's sampler. One step from t to t' = t + dt (dt < 0) with noise level ``a``:

    sigma_t = a * sqrt(t / (1 - t))        (t = 1 uses the next timestep, where sigma is finite)
    mean    = x + dt * (v + sigma_t^2 / (2 t) * (x + (1 - t) v))
    x'      = mean + sigma_t * sqrt(-dt) * eps,   eps ~ N(0, I)

The drift correction keeps the marginals of the ODE (the score of ``x_t`` is ``-(x + (1 - t) v) / t``).
A step's log-probability is the Gaussian log-density of ``x'`` averaged over the elements.
"""

from __future__ import annotations

import math

import torch


def sde_t_cap(timesteps: torch.Tensor) -> float:
    """The cap on t in sigma_t: sigma is infinite at t = 1, so the first step uses the next
    timestep of the sampler's schedule ``timesteps`` ([steps + 1], from 1 to 0)."""
    return float(timesteps[1])


def sde_sigma(t: torch.Tensor, t_cap: float, noise: float) -> torch.Tensor:
    """sigma_t = noise * sqrt(t / (1 - t)), with t capped at ``t_cap`` < 1 (finite at t = 1)."""
    tc = t.clamp(max=t_cap)
    return noise * torch.sqrt(tc / (1 - tc))


def sde_mean_std(
    x: torch.Tensor,
    v: torch.Tensor,
    t: torch.Tensor,
    t_next: torch.Tensor,
    t_cap: float,
    noise: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of ``x'`` given ``x`` and the velocity ``v`` at t.

    Args:
        x, v: [..., L, d]; t, t_next: broadcastable to x's leading dims (e.g. [..., 1, 1]).
    """
    dt = t_next - t
    sigma = sde_sigma(t, t_cap, noise)
    tc = t.clamp(min=1e-6)
    mean = x + dt * (v + sigma**2 / (2 * tc) * (x + (1 - t) * v))
    return mean, sigma * torch.sqrt(-dt)


def sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    t: torch.Tensor,
    t_next: torch.Tensor,
    t_cap: float,
    noise: float,
    eps: torch.Tensor,
) -> torch.Tensor:
    """One stochastic step: ``mean + std * eps``."""
    mean, std = sde_mean_std(x, v, t, t_next, t_cap, noise)
    return mean + std * eps


def sde_log_prob(x_next: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Gaussian log-density of ``x_next`` averaged over the last two dims: [..., L, d] -> [...]."""
    z = (x_next - mean) / std
    per = -0.5 * z**2 - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return per.flatten(-2).mean(-1)


def step_log_probs(
    u: torch.Tensor,
    states: torch.Tensor,
    velocities: torch.Tensor,
    t: torch.Tensor,
    t_next: torch.Tensor,
    t_cap: float,
    noise: float,
) -> torch.Tensor:
    """Log-probability of every recorded stochastic step under the policy velocities ``u``.

    Args:
        u: [B, G, K, L, d] policy velocities at the recorded states (replay).
        states: [B, G, K, L, d] recorded x_k; velocities: the steps taken, ``(x_{k+1} - x_k) / dt``.
        t, t_next: [K] each record's timestep and the next one.

    Returns:
        [B, G, K] float32 log-probabilities (mean over the elements).
    """
    tk = t.to(u.device, torch.float32)[:, None, None]
    tn = t_next.to(u.device, torch.float32)[:, None, None]
    x = states.to(u.dtype)
    x_next = x + (tn - tk) * velocities.to(u.dtype)
    mean, std = sde_mean_std(x, u, tk, tn, t_cap, noise)
    return sde_log_prob(x_next, mean, std).float()
