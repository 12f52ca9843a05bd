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
        advantages [B, G] and safe [B]: groups where some branch beats the anchor (the protect
        gate, which :func:`advantages` applies).
    """
    adv = 0.0
    for name, w in weights.items():
        s = sigma[name] if isinstance(sigma, dict) else sigma
        adv = adv + w * (components[name] - anchor[name][:, None]) / (s + eps)
    adv = torch.as_tensor(adv).clamp(-clip, clip)
    return adv, (adv > 0).any(dim=1)


def public_advantages(
    components: dict[str, torch.Tensor],
    anchor: dict[str, torch.Tensor],
    weights: dict[str, float],
    scopes: dict[str, float],
    clip: float = 2.5,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The public recipe's anchor-relative advantages, one group at a time.

    Per component c of scope s (named ``s/name``, ``name`` for ``video``):
    ``A_c = (r_c - r_c(anchor)) / (std(r_c(1..G), r_c(anchor)) + eps)`` (unbiased std over the G
    branches and the anchor); per scope ``A_s = sum_c w_c A_c`` (w_c: the reward's weight),
    renormalised to ``A_s / (std_G(A_s) + eps)`` (population std over the branches, no centring;
    left as it is where that std is <= eps); fused ``A = clip(sum_s scopes[s] A_s)``.

    Args:
        components: name -> [B, G] branch rewards; anchor: name -> [B]; weights: name -> its
            weight in the fused reward (``scopes[s]`` times the reward's weight).

    Returns:
        advantages [B, G] and safe [B]: groups where some branch's weighted reward beats the
        anchor's in some scope (the protect gate)."""
    adv, safe = 0.0, None
    for scope, w_scope in scopes.items():
        names = [k for k in components if _scope_of(k) == scope and weights[k]]
        if not w_scope or not names:
            continue
        a_s, raw, raw_anchor = 0.0, 0.0, 0.0
        for k in names:
            w = weights[k] / w_scope
            r, ra = components[k].double(), anchor[k].double()[:, None]
            sigma = torch.cat([r, ra], 1).std(1, keepdim=True)
            a_s = a_s + w * (r - ra) / (sigma + eps)
            raw, raw_anchor = raw + w * r, raw_anchor + w * ra
        std = a_s.std(1, unbiased=False, keepdim=True)
        a_s = torch.where(std > eps, a_s / (std + eps), a_s)
        adv = adv + w_scope * a_s
        beats = (raw > raw_anchor).any(1)
        safe = beats if safe is None else safe | beats
    if safe is None:
        raise ValueError("public advantages need a scope of weight > 0 with a trained reward")
    return adv.clamp(-clip, clip).float(), safe


def _scope_of(name: str) -> str:
    """The reward scope of a component's name (``local/path``: local; ``path``: video)."""
    return name.split("/", 1)[0] if "/" in name else "video"


def micro_batch_rewards(
    model: nn.Module,
    parts: list[Rollout],
    reward: CompositeReward,
    scopes: dict[str, float],
    segment_clip: int = 0,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict[str, float]]:
    """:func:`kvpo.method.scoring.branch_rewards` of a batch rolled out in micro-batches: components
    [B, G] (and the anchors' [B]) concatenated over the parts, and each component's weight."""
    scored = [branch_rewards(model, ro, reward, scopes, segment_clip) for ro in parts]
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(advantages [B, G], valid groups [B], group weights [B]) of ``cfg.advantage``:
    group-relative over the fused reward ``total`` [B, G]; anchor-relative per component over
    each component's std across every rank's groups (``all_comps``); or the public recipe's
    (:func:`public_advantages`). The protect gate of the anchor-relative ones: ``cfg.protect``
    skip (a gated group is not valid) or halve (it trains at weight 0.5)."""
    if cfg.advantage == "group":
        adv, valid = group_advantages(total, eps=cfg.adv_eps, clip=cfg.adv_clip)
        return adv, valid, torch.ones_like(adv[:, 0])
    if cfg.advantage == "public":
        adv, safe = public_advantages(comps, anchor, weights, cfg.reward_scopes, cfg.adv_clip)
    else:
        sigma = {k: v.std() for k, v in all_comps.items()}
        adv, safe = anchor_advantages(comps, anchor, weights, sigma, cfg.adv_clip, cfg.adv_eps)
    if cfg.protect == "halve":
        return adv, torch.ones_like(safe), 1.0 - 0.5 * (~safe).to(adv.dtype)
    return torch.where(safe[:, None], adv, torch.zeros_like(adv)), safe, safe.to(adv.dtype)
