"""Before a long run, does the generator do what KVPO assumes of it?

``python -m kvpo.preflight [any python -m kvpo.train options]`` builds the policy a run with those
options would train (the built-in generator, Wan2.1 with ``--wan_dir``, a ``--resume`` state) and
checks, on one held-out prompt's group, what no error would report when it is missing:

1. **Replay reproduces streaming.** A step taken during generation (the KV cache written chunk by
   chunk) and replayed by teacher forcing under the same, unrouted context gives the same
   velocity, so an unrouted branch has a TVE of 0; otherwise every branch's likelihood carries an
   error that no reward explains (cache positions, rotary frame indices, a mask that differs
   between the two ways of calling ``forward``). Rounding may leave a floor, far below the TVE
   that routing gives the branches (:data:`NOISE_FLOOR`).
2. **The same noise and context make the same video**: branches differ through routing alone.
3. **Routing changes the video**: the model reads the pages its ``table`` lists and no others
   (a window whose branches all come out alike trains nothing).
4. **The replay's gradient reaches the parameters the run trains.**
5. **The reward scores the videos**: a finite score per video from each component.

:func:`check_generator` measures them for any :class:`kvpo.generators.interface.StreamingVideoGenerator`;
the command prints the measurements and exits with an error naming each property that fails.
When all hold, it also prints the run's ``tau`` against the energy spread it divides
(:func:`tau_line`): a temperature that no error reports as wrong, yet one that leaves every PPO
ratio at 1, or swings it to the clip, trains nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from kvpo.generators import data
from kvpo.generators.interface import StreamingVideoGenerator, require_generator
from kvpo.method.exploration import checked_spec
from kvpo.method.likelihood import energy_spread, policy_energies
from kvpo.method.replay import replay_velocities, step_weights
from kvpo.method.rollout import Rollout, RolloutSpec, deployment_spec, rollout, rollout_pages
from kvpo.rewards import CompositeReward
from kvpo.run.config import TrainConfig, amp_autocast, parse_args
from kvpo.run.policy import reference_and_policy
from kvpo.run.setup import (
    check_run_rewards,
    check_wan_paths,
    config_prompts,
    make_reward,
    resolve_resume,
    training_device,
)

# Largest branch spread (an RMS ratio) of one noise under one context: float rounding, not noise.
SAME_SPREAD = 1e-3
# Largest replay error of unrouted branches, as a fraction of the routed branches' TVE: the
# likelihood's noise floor against its signal. On the shipped generator (routed TVE 2.5e-3 of the
# velocities' energy) a frame index shifted by one between streaming and replay leaves a quarter.
NOISE_FLOOR = 0.01


@dataclass
class Preflight:
    """What :func:`check_generator` measured."""

    # unrouted branches: mean (replayed - taken velocity)^2 over mean taken velocity^2 (property 1)
    replay_error: float
    routed_tve: float  # the same over the routed branches' scored steps: the likelihood's signal
    same_spread: float  # branch spread of one noise under one context (property 2: 0)
    routed_spread: float  # branch spread under the spec's routing (property 3: > 0)
    reached: int  # trainable parameter tensors the replay's gradient reaches (property 4)
    trainable: int  # trainable parameter tensors
    rewards: dict[str, float]  # each component's mean over the routed group's videos (property 5)
    seconds: float
    # why each property that fails does, by name (replay, same, routing, gradient, reward)
    failures: dict[str, str]

    def lines(self) -> list[str]:
        """The measurements as the command prints them."""

        def mark(name: str) -> str:
            return "FAILS" if name in self.failures else "ok"

        rewards = ", ".join(f"{k} {v:.4f}" for k, v in self.rewards.items()) or "not scored"
        return [
            f"replay reproduces streaming: relative error {self.replay_error:.2e}, "
            f"{self.replay_error / max(self.routed_tve, 1e-30):.1e} of the routed branches' TVE "
            f"{self.routed_tve:.2e} (< {NOISE_FLOOR:.0e}) {mark('replay')}",
            f"one noise, one context, one video: branch spread {self.same_spread:.2e} "
            f"(< {SAME_SPREAD:.0e}) {mark('same')}",
            f"routing changes the video: branch spread {self.routed_spread:.4f} {mark('routing')}",
            f"the gradient reaches {self.reached} of {self.trainable} trainable parameter tensors "
            f"{mark('gradient')}",
            f"rewards: {rewards} {mark('reward')}",
            f"{self.seconds:.1f} s",
        ]


def check_generator(
    model: StreamingVideoGenerator,
    prompts: list[str],
    spec: RolloutSpec,
    reward: CompositeReward | None = None,
    device: torch.device | str = "cpu",
    autocast: Callable[[], object] = nullcontext,
    seed: int = 0,
) -> Preflight:
    """Measure the properties of the module's docstring on one group of ``model`` (two branches,
    from one noise).

    Args:
        prompts: one prompt per chunk.
        spec: the run's exploration (its window, routing, p_keep); the unrouted group keeps its
            window but drops nothing.
        reward: scores the routed group's videos (property 5); None skips it.
        autocast: the context the run's forwards run under.

    The unrouted branches' replay error must stay under :data:`NOISE_FLOOR` of the routed
    branches' TVE (or under 1e-10 of the velocities' energy); one noise's branches within
    :data:`SAME_SPREAD` of each other.

    Returns the measurements, ``failures`` naming each property that fails. The model's
    parameters, their gradients and its train/eval mode end as they were."""
    require_generator(model)
    t0 = time.perf_counter()
    group = dataclasses.replace(spec, group_size=2, anchor=False)
    # nothing routed out, every step from the window on (and before it) recorded and scored
    same = dataclasses.replace(
        group,
        routing="drop",
        p_keep=1.0,
        explore="routing",
        score_after_window=True,
        score_steps=None,
        record_prefix=True,
    )
    with _eval_mode(model):
        with torch.no_grad(), autocast():
            plain = rollout(model, [prompts], same, torch.Generator().manual_seed(seed), device)
            u = replay_velocities(model, plain)
            routed = rollout(model, [prompts], group, torch.Generator().manual_seed(seed), device)
            u_routed = replay_velocities(model, routed)
        reached, trainable = _gradient_reach(model, routed, autocast)
        videos = None
        if reward is not None:
            with torch.no_grad():
                videos = model.to_video(routed.tokens.flatten(0, 1)).float()
    replay_error = _relative_energy(u, plain.velocities)
    on = routed.scored.to(routed.velocities.device)
    routed_tve = _relative_energy(u_routed[:, :, on], routed.velocities[:, :, on])
    same_spread = float(plain.branch_spread().max())
    routed_spread = float(routed.branch_spread().max())
    failures = {}
    if not replay_error < max(NOISE_FLOOR * routed_tve, 1e-10):
        failures["replay"] = (
            f"replay does not reproduce streaming: replayed under the same unrouted context, the "
            f"velocities differ from those taken by {replay_error:.2e} (relative), "
            f"{replay_error / max(routed_tve, 1e-30):.1e} of the routed branches' TVE "
            f"{routed_tve:.2e} (>= {NOISE_FLOOR:.0e}): the likelihood's noise would drown its "
            "signal; forward must give the same velocity for a row whether its history comes "
            "from the KV cache written chunk by chunk or is recomputed (check frame_index, cache "
            "slots, and that table selects exactly the pages it lists)"
        )
    if not same_spread < SAME_SPREAD:
        failures["same"] = (
            f"one noise under one context made different videos: branch spread {same_spread:.2e}"
            f" (>= {SAME_SPREAD:.0e}); forward must be deterministic (dropout off in eval "
            "mode, no noise of its own)"
        )
    if not routed_spread > max(10 * same_spread, SAME_SPREAD):
        failures["routing"] = (
            f"routing does not change the video: branch spread {routed_spread:.2e} under "
            f"window {spec.window}, p_keep {spec.p_keep} ({spec.routing}); forward must read only "
            "the pages each row's table lists (-1: routed out), or the window must reach history "
            "the model attends to"
        )
    if not reached:
        failures["gradient"] = (
            f"the replay's gradient reaches none of the {trainable} trainable parameter tensors"
            + (" (none requires grad)" if not trainable else "")
        )
    rewards = {}
    if videos is not None:
        try:
            comps = reward.components((videos + 1) / 2, [prompts] * videos.shape[0])
            rewards = {k: float(c.mean()) for k, c in comps.items()}
        except ValueError as e:
            failures["reward"] = f"reward: {e}"
    return Preflight(
        replay_error,
        routed_tve,
        same_spread,
        routed_spread,
        reached,
        trainable,
        rewards,
        time.perf_counter() - t0,
        failures,
    )


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode within, back in the mode it was in after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _relative_energy(u: torch.Tensor, v: torch.Tensor) -> float:
    """mean (u - v)^2 over mean v^2, in float32."""
    v = v.float()
    return float((u.float() - v).square().mean() / v.square().mean().clamp_min(1e-30))


def _gradient_reach(
    model: nn.Module, ro: Rollout, autocast: Callable[[], object]
) -> tuple[int, int]:
    """(trainable parameter tensors that the gradient of the routed group's first branch's
    replayed velocities reaches, trainable ones; one branch: the activations of one, as
    ``replay_branches: 1`` trains); their ``.grad`` are left as they were.

    The velocities are projected on a fixed random direction: the TVE itself has no gradient at
    the rollout's own policy wherever replay matches what was taken."""
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        with autocast():
            u = replay_velocities(model, ro.branches(slice(0, 1)))
        if params and u.requires_grad:
            direction = torch.randn(u.shape, generator=torch.Generator().manual_seed(0))
            (u.float() * direction.to(u.device)).sum().backward()
        return sum(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params), len(params)
    finally:
        for p, g in zip(params, before, strict=True):
            p.grad = g


def cache_lines(
    cfg: TrainConfig,
    model: StreamingVideoGenerator,
    prompts: list[str],
    spec: RolloutSpec,
    device: torch.device,
    autocast: Callable[[], object],
) -> list[str]:
    """What the run's KV caches will hold, by :func:`kvpo.method.rollout.rollout_pages` times a page's
    bytes in the run's precision: a training rollout's (a micro-batch of groups: ``micro_batch``,
    or every prompt of an iteration on one process, at the window's earliest start) and an
    evaluation pass's (``eval_batch`` videos, or all of them)."""
    with autocast():  # under autocast the pages are in its 16-bit dtype
        page = model.new_cache(1, device).nbytes()

    def size(pages: int) -> str:
        return f"{pages} pages of {page / 2**20:.3g} MiB, {pages * page / 2**30:.3g} GiB"

    groups = cfg.micro_batch or cfg.prompts_per_iter
    videos = cfg.eval_batch or cfg.eval_prompts * cfg.eval_seeds
    train_pages = rollout_pages(model, [prompts] * groups, spec)
    eval_pages = rollout_pages(model, [prompts] * videos, deployment_spec(model))
    anchor = " and its anchor" if spec.anchor else ""
    return [
        f"rollout KV cache: {size(train_pages)}, for {groups} group(s) of {spec.group_size} "
        f"branches{anchor} (micro_batch {cfg.micro_batch}, rollout_branches "
        f"{cfg.rollout_branches}, window from chunk {spec.window[0]})",
        f"evaluation KV cache: {size(eval_pages)}, for {videos} video(s) at a time (eval_batch "
        f"{cfg.eval_batch})",
    ]


# A fixed tau within this factor of the energy spread moves the PPO ratios as the tuned runs do
# (benchmarks/RESULTS.md: the built-in generator's hand-tuned tau is about its spread; a tau
# 7-45x the spread left every ratio at 1).
TAU_FACTOR = 5.0


def tau_line(
    cfg: TrainConfig,
    model: StreamingVideoGenerator,
    prompts: list[str],
    spec: RolloutSpec,
    device: torch.device,
    autocast: Callable[[], object],
) -> str | None:
    """The run's Gibbs temperature against the energy spread it divides (the median std over
    one group of the run's G branches under its routing, :func:`kvpo.method.likelihood.energy_spread`):
    a fixed ``tau`` far from it leaves the PPO ratios at 1 or swings them to the clip. None for
    the SDE baseline, which has no temperature."""
    if cfg.explore == "sde":
        return None
    with _eval_mode(model):
        with torch.no_grad(), autocast():
            group = dataclasses.replace(spec, anchor=False)
            ro = rollout(model, [prompts], group, torch.Generator().manual_seed(cfg.seed), device)
        with autocast():
            energies = policy_energies(cfg, model, [ro], [step_weights(ro, cfg.step_weighting)])
    spread = energy_spread(energies)
    if spread is None:
        return (
            f"tau: the {spec.group_size} branches of the group tie: no energy spread to set it by"
        )
    what = f"energy spread {spread:.2e} (one group of {spec.group_size} branches)"
    if cfg.tau_auto:
        return f"tau: tau_auto {cfg.tau_auto:g} x the {what}, {cfg.tau_auto * spread:.2e} here"
    x0 = cfg.likelihood == "x0"  # the public recipe's: no temperature, tau = 1
    tau = 1.0 if x0 else cfg.tau
    ratio = tau / spread
    name = "tau 1 (likelihood x0)" if x0 else f"tau {tau:.2e}"
    if 1 / TAU_FACTOR <= ratio <= TAU_FACTOR:
        return f"{name}: {ratio:.2g}x the {what}, within {TAU_FACTOR:g}x of it"
    effect = "stay at 1" if ratio > 1 else "swing to the clip on small changes"
    fix = "" if x0 else "; --tau_auto 1 sets tau to the spread every iteration"
    return f"{name}: {ratio:.2g}x the {what}, far from it: the PPO ratios would {effect}{fix}"


def main(argv: list[str] | None = None) -> Preflight:
    try:
        cfg = resolve_resume(
            parse_args(
                argv,
                prog="python -m kvpo.preflight",
                description="Checks a generator as KVPO needs it, under a run's options.",
            )
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        device = training_device(cfg)
        generator = None
        if cfg.wan_dir:
            from kvpo.generators.wan import load_from_config

            check_wan_paths(cfg)
            generator = load_from_config(cfg.to_dict(), device)
        _, model, *_ = reference_and_policy(cfg, device, generator)
        spec = checked_spec(cfg, model)  # as train checks it, at every window start
        reward = make_reward(cfg, device)
        nC = model.num_frames // model.chunk_frames
        train_prompts, eval_prompts = config_prompts(cfg)
        eval_prompts = eval_prompts[: cfg.eval_prompts]
        check_run_rewards(cfg, model, reward, train_prompts + eval_prompts)  # as train does
        prompt = eval_prompts[0]
        prompts = data.segments([prompt] * nC)
    except ValueError as e:  # ConfigError, CheckpointError: settings and files that cannot run
        raise SystemExit(f"error: {e}") from None
    bf16 = cfg.amp == "bf16"
    autocast = functools.partial(amp_autocast, cfg.amp, device)

    print(
        f"preflight: {type(model).__name__} on {device}"
        + (" (bf16 autocast)" if bf16 else "")
        + (f", resumed from {cfg.resume}" if cfg.resume else "")
        + f", prompt {prompt!r}, window {tuple(cfg.window)}, "
        + (
            "SDE exploration"
            if cfg.explore == "sde"
            else f"drop routing, p_keep {cfg.p_keep}"
            if cfg.routing == "drop"
            else f"{cfg.routing} routing, {cfg.recent_frames} recent frames kept"
        ),
        flush=True,
    )
    for line in cache_lines(cfg, model, prompts, spec, device, autocast):
        print("  " + line, flush=True)
    result = check_generator(model, prompts, spec, reward, device, autocast, cfg.seed)
    for line in result.lines():
        print("  " + line, flush=True)
    if not result.failures and (line := tau_line(cfg, model, prompts, spec, device, autocast)):
        print("  " + line, flush=True)
    if result.failures:
        raise SystemExit("error: " + "\nerror: ".join(result.failures.values()))
    return result


if __name__ == "__main__":
    main()
