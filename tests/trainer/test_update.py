"""The KVPO update on a fixed rollout: it moves probability to high-advantage branches."""

import pytest
import torch
from trainer_support import PROMPTS, tiny_model

from kvpo.grpo import gibbs_log_probs, group_advantages, ppo_objective
from kvpo.replay import replay_velocities, step_weights, trajectory_energy
from kvpo.rollout import RolloutSpec, rollout


def test_update_raises_advantage_weighted_log_likelihood():
    model = tiny_model().train()
    nC = model.num_frames // model.chunk_frames
    spec = RolloutSpec(group_size=4, window=(2, 4), p_keep=0.3, anchor=False)
    ro = rollout(model, [[p] * nC for p in PROMPTS], spec, torch.Generator().manual_seed(0))
    w = step_weights(ro)
    rewards = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    adv, valid = group_advantages(rewards)
    tau = 1e-3

    def logp():
        return gibbs_log_probs(trajectory_energy(replay_velocities(model, ro), ro, w), tau)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with torch.no_grad():
        before = logp()
    for _ in range(3):
        loss, _ = ppo_objective(logp(), before, adv, valid, clip_low=0.5, clip_high=0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = logp()
    # sum_i A_i log p_i rises: the best branch gains probability, the worst loses it
    assert (adv * after).sum() > (adv * before).sum()
    best, worst = adv.argmax(1), adv.argmin(1)
    rows = torch.arange(2)
    assert (after[rows, best] > before[rows, best]).all()
    assert (after[rows, worst] < before[rows, worst]).all()


@pytest.mark.parametrize(
    "over",
    [
        dict(),  # branch likelihood, velocity KL
        dict(likelihood="step", kl="softmax", score_steps=(0, 1)),
        dict(explore="sde", kl="none"),
    ],
    ids=["branch-velocity_kl", "step-softmax_kl", "sde"],
)
def test_replay_in_branch_batches_gives_the_same_gradient(over):
    """replay_branches=1: the objective's gradient w.r.t. the replay velocities, pushed through
    one branch's replay at a time, is the gradient of the whole replay's objective."""
    import contextlib
    import copy

    from kvpo.config import build_config
    from kvpo.likelihood import branch_log_probs
    from kvpo.train import policy_gradients

    model = tiny_model().train()
    ref = copy.deepcopy(model).requires_grad_(False)
    nC = model.num_frames // model.chunk_frames
    cfg = build_config(dict(tau=1e-3, **over))
    spec = RolloutSpec(
        group_size=3, window=(2, 4), p_keep=0.3, anchor=False, explore=cfg.explore,
        score_steps=cfg.score_steps,
    )  # fmt: skip
    ro = rollout(model, [[p] * nC for p in PROMPTS], spec, torch.Generator().manual_seed(0))
    w = step_weights(ro)
    adv, valid = group_advantages(torch.randn(2, 3, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        u_ref = replay_velocities(ref, ro) if cfg.kl != "none" else None
        logp_ref = None
        if cfg.kl == "softmax":
            logp_ref = branch_log_probs(cfg, ref, u_ref, ro, trajectory_energy(u_ref, ro, w))

    grads, stats = [], []
    for per in (0, 1):
        run = build_config(dict(tau=1e-3, replay_branches=per, **over))
        model.zero_grad(set_to_none=True)
        st, _, _ = policy_gradients(
            run, model, ro, w, adv, valid, None, u_ref, logp_ref, contextlib.nullcontext
        )
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        stats.append(st)
    assert len(grads[0]) == len(grads[1]) > 0
    assert sum(g.abs().sum() for g in grads[0]) > 0
    scale = max(float(g.abs().max()) for g in grads[0])
    for a, b in zip(*grads, strict=True):  # float32 sums in another order: relative to the largest
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * scale)
    assert stats[0] == pytest.approx(stats[1], rel=1e-5, abs=1e-8)
