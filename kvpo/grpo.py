"""GRPO pieces of KVPO: advantages, Gibbs branch log-probabilities, the PPO-clipped objective."""

from __future__ import annotations

import torch


def group_advantages(
    rewards: torch.Tensor, eps: float = 1e-6, clip: float = 2.5, min_std: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = clip((r - mean_g) / (std_g + eps), -clip, clip)`` per group.

    Args:
        rewards: [B, G].

    Returns:
        advantages [B, G] (0 in skipped groups) and valid [B] bool (groups with spread > min_std).
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, G], got {tuple(rewards.shape)}")
    mean = rewards.mean(1, keepdim=True)
    std = rewards.std(1, unbiased=False, keepdim=True)
    valid = std.squeeze(1) > min_std
    adv = ((rewards - mean) / (std + eps)).clamp(-clip, clip)
    return torch.where(valid[:, None], adv, torch.zeros_like(adv)), valid


def anchor_advantages(
    components: dict[str, torch.Tensor],
    anchor: dict[str, torch.Tensor],
    weights: dict[str, float],
    sigma: dict[str, torch.Tensor] | float = 1.0,
    clip: float = 2.5,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor-relative advantages ``A = clip(sum_c w_c (r_c - r_c(anchor)) / (sigma_c + eps))``.

    Args:
        components: name -> [B, G] branch rewards; anchor: name -> [B] unperturbed branch rewards.
        sigma: name -> scalar scale per component (e.g. the batch std), or one float for all.

    Returns:
        advantages [B, G] and valid [B]: the protect gate, groups where some branch beats the anchor.
    """
    adv = 0.0
    for name, w in weights.items():
        s = sigma[name] if isinstance(sigma, dict) else sigma
        adv = adv + w * (components[name] - anchor[name][:, None]) / (s + eps)
    adv = torch.as_tensor(adv).clamp(-clip, clip)
    valid = (adv > 0).any(dim=1)
    return torch.where(valid[:, None], adv, torch.zeros_like(adv)), valid


def gibbs_log_probs(energy: torch.Tensor, tau: float) -> torch.Tensor:
    """``log p_i = log softmax_i(-E_i / tau)`` within each group: [B, G] -> [B, G]."""
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    return torch.log_softmax(-energy / tau, dim=1)


def ppo_objective(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    adv: torch.Tensor,
    valid: torch.Tensor,
    clip_low: float = 0.1,
    clip_high: float = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``-mean min(ratio A, clip(ratio, 1 - clip_low, 1 + clip_high) A)`` over valid groups.

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
    ratio = torch.exp(logp - logp_old)
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high)
    obj = torch.minimum(ratio * adv, clipped * adv)
    m = valid.reshape(-1, *[1] * (obj.dim() - 1)).expand_as(obj).to(obj.dtype)
    n = m.sum().clamp_min(1.0)
    loss = -(obj * m).sum() / n
    was_clipped = ((ratio * adv) > (clipped * adv)).to(obj.dtype)
    seen = m if bool(valid.any()) else torch.ones_like(m)
    stats = {
        "ratio": float((ratio.detach() * seen).sum() / seen.sum().clamp_min(1.0)),
        "clip_frac": float((was_clipped * m).sum() / n),
    }
    return loss, stats
