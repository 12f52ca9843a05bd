"""An iteration's exploration: which groups a rank rolls out and where their window starts,
the rollouts with KV routing (``micro_batch`` groups at a time), their rewards and advantages,
the iteration's Gibbs temperature and the frozen reference's terms of the KL; and the checks,
before a run starts, that its routing can explore at all."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import data, distributed
from .config import ConfigError, TrainConfig, config_errors
from .grpo import anchor_advantages, group_advantages
from .likelihood import iteration_tau
from .memory import memory_stage
from .replay import step_weights
from .rewards import CompositeReward
from .rollout import Rollout, RolloutSpec, exploring_chunks, rollout
from .scoring import branch_rewards, fused_reward
from .update import reference_terms


def iteration_generator(
    cfg: TrainConfig, it: int, rank: int = 0, stream: int = 0
) -> torch.Generator:
    """Seeded per (seed, iteration, rank, stream): a resumed run draws what the original would."""
    return torch.Generator().manual_seed(((cfg.seed * 1_000_003 + it) * 131 + rank) * 7 + stream)


# Why an iteration can train no group (its row's valid_groups is 0), by advantage mode.
NO_GROUP = {
    "group": "every group's rewards tied",
    "anchor": "no branch beat its group's anchor (the protect gate)",
}


def shifted(window: tuple[int, int], by: int) -> tuple[int, int]:
    """The perturbed window ``[w0, w1)`` started ``by`` chunks later."""
    return (window[0] + by, window[1] + by)


def iteration_batch(
    cfg: TrainConfig, spec: RolloutSpec, it: int, train_prompts: list[str], chunks: int
) -> tuple[list[list[str]], RolloutSpec, torch.Generator]:
    """Iteration ``it``'s groups on this rank: each group's prompt per chunk (the iteration's
    ``prompts_per_iter`` prompts are drawn alike on every rank, which takes its share), ``spec``
    with the window started as drawn for the iteration, and the rank's generator for its
    rollouts. Every draw is seeded by (seed, it, rank): a resumed run draws the same."""
    rank, world = distributed.rank_and_world()
    pick = torch.randint(
        len(train_prompts),
        (cfg.prompts_per_iter,),
        generator=iteration_generator(cfg, it, stream=1),
    ).tolist()
    gen = iteration_generator(cfg, it, rank)
    batch = [
        data.segments(data.random_prompts([train_prompts[i]], chunks, cfg.multi_prompt, gen))
        for i in pick[rank::world]
    ]
    shift = torch.randint(
        cfg.window_shift + 1, (), generator=iteration_generator(cfg, it, stream=2)
    )
    return batch, dataclasses.replace(spec, window=shifted(cfg.window, int(shift))), gen


def rollout_spec(cfg: TrainConfig) -> RolloutSpec:
    """What the config's rollouts explore and record (the window before any shift)."""
    return RolloutSpec(
        group_size=cfg.group_size,
        window=tuple(cfg.window),
        p_keep=cfg.p_keep,
        routing=cfg.routing,
        recent_frames=cfg.recent_frames,
        score_after_window=cfg.score_after_window,
        score_steps=None if cfg.score_steps is None else tuple(cfg.score_steps),
        anchor=cfg.advantage == "anchor",
        record_prefix=cfg.kl_prefix and cfg.kl == "velocity",
        explore=cfg.explore,
        sde_noise=cfg.sde_noise,
        branches_per_pass=cfg.rollout_branches,
    )


def checked_spec(cfg: TrainConfig, model: nn.Module) -> RolloutSpec:
    """:func:`rollout_spec`, checked (:func:`check_exploration`) at every start of its window
    that ``window_shift`` allows."""
    spec = rollout_spec(cfg)
    for shift in range(cfg.window_shift + 1):
        at = shifted(cfg.window, shift)
        try:
            check_exploration(dataclasses.replace(spec, window=at), model)
        except ConfigError as e:
            if not shift:
                raise
            # the message names the shifted window, which the user never wrote
            raise ConfigError(
                f"window_shift={cfg.window_shift} starts window={tuple(cfg.window)} up to "
                f"{cfg.window_shift} chunks later; started {shift} later it is {at}, which fails: "
                f"{e}"
            ) from None
    return spec


def check_exploration(spec: RolloutSpec, model: nn.Module) -> None:
    """Validates ``spec`` for ``model`` and refuses a KV-routing window in which no chunk's
    branches can differ: their rewards would tie, every group would be skipped, and the run would
    train nothing while looking healthy."""
    with config_errors():
        spec.validate(model)
    if spec.explore != "routing" or spec.group_size < 2 or exploring_chunks(model, spec):
        return
    w0, w1 = spec.window
    c, sinks, lw = model.chunk_frames, model.sink_frames, model.local_window
    if spec.routing == "sample":
        why = (
            f"routing='sample' refills the local window ({sinks} sink frames + local_window "
            f"{lw}) from older history, but chunks {w0}..{w1 - 1} have at most {(w1 - 1) * c} "
            f"history frames, which the window (less recent_frames={spec.recent_frames}) already "
            f"shows whole; perturb chunks whose history passes {sinks + lw} frames, make the video "
            "longer, or use routing='drop'"
        )
    else:
        why = (
            f"routing='drop' with p_keep={spec.p_keep}: chunks {w0}..{w1 - 1} have no history "
            f"frame besides the {sinks} sink frames and the most recent one, or p_keep is 0 or 1; "
            "perturb later chunks or set 0 < p_keep < 1"
        )
    raise ConfigError(
        f"window {spec.window}: no chunk's branches can attend to different history, so the "
        f"{spec.group_size} branches of a group would be one video and nothing would train: {why}"
    )


def micro_batch_rewards(
    model: nn.Module, parts: list[Rollout], reward: CompositeReward, scopes: dict[str, float]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict[str, float]]:
    """:func:`kvpo.scoring.branch_rewards` of a batch rolled out in micro-batches: components
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
    spread: torch.Tensor  # [B] float32 on the CPU: each group's Rollout.branch_spread
    step_weights: list[torch.Tensor]  # each part's TVE step weights
    tau: float  # the iteration's Gibbs temperature (kvpo.likelihood.iteration_tau)
    refs: list[tuple[torch.Tensor | None, torch.Tensor | None]]  # each part's reference terms
    # time_rollout, time_reward (and advantages), time_reference; time_tau (its replay)
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
) -> Exploration:
    """Roll out this rank's groups ``batch`` (``micro_batch`` at a time: one's KV cache at a
    time), score them, take their advantages (over every rank's groups) and, without gradients,
    the frozen reference's terms of the KL."""
    t0 = time.perf_counter()
    model.eval()
    step = cfg.micro_batch or len(batch)
    with autocast(), memory_stage("rollout", cfg):
        parts = [
            rollout(model, batch[g : g + step], spec, gen, device)
            for g in range(0, len(batch), step)
        ]
    t1 = time.perf_counter()
    with memory_stage("reward", cfg):
        comps, anchor, weights = micro_batch_rewards(model, parts, reward, cfg.reward_scopes)
    total = fused_reward(comps, weights)
    all_comps = {k: distributed.all_gather(v) for k, v in comps.items()}
    adv, valid = advantages(cfg, total, comps, anchor, weights, all_comps)
    step_w = [step_weights(ro, cfg.step_weighting) for ro in parts]
    t2 = time.perf_counter()
    with autocast(), memory_stage("tau", cfg):
        tau = iteration_tau(cfg, model, parts, step_w)
    cfg = dataclasses.replace(cfg, tau=tau)  # the reference's log-probabilities share it
    t3 = time.perf_counter()
    with torch.no_grad(), autocast(), memory_stage("reference", cfg):
        refs = [reference_terms(cfg, ref, ro, w) for ro, w in zip(parts, step_w, strict=True)]
    # the frozen reference's forward for the KL: logged apart, it can cost more than the rewards
    seconds = {
        "time_rollout": t1 - t0,
        "time_reward": t2 - t1,
        "time_reference": time.perf_counter() - t3,
        **({"time_tau": t3 - t2} if cfg.tau_auto else {}),
    }
    spread = torch.cat([ro.branch_spread().cpu() for ro in parts])
    return Exploration(
        parts, comps, all_comps, total, adv.to(device), valid.to(device), spread, step_w, tau,
        refs, seconds,
    )  # fmt: skip
