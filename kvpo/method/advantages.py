"""Advantages: the branches' rewards (over the reward scopes' clips) made group- or
anchor-relative."""

from __future__ import annotations

import torch
from torch import nn

from kvpo.method.rollout import Rollout
from kvpo.method.scoring import branch_rewards
from kvpo.rewards import CompositeReward
from kvpo.run.config import TrainConfig


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


def micro_batch_rewards(
    model: nn.Module, parts: list[Rollout], reward: CompositeReward, scopes: dict[str, float]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict[str, float]]:
    """:func:`kvpo.method.scoring.branch_rewards` of a batch rolled out in micro-batches: components
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
