"""The KVPO update on a fixed rollout: it moves probability to high-advantage branches."""

import math

import pytest
import torch
from trainer_support import PROMPTS, tiny_model

from kvpo.method.advantages import group_advantages
from kvpo.method.likelihood import gibbs_log_probs
from kvpo.method.replay import replay_velocities, step_weights, trajectory_energy
from kvpo.method.rollout import RolloutSpec, rollout
from kvpo.method.update import ppo_objective


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

    from kvpo.method.likelihood import branch_log_probs
    from kvpo.method.update import Part, policy_gradients
    from kvpo.run.config import build_config

    model = tiny_model().train()
    ref = copy.deepcopy(model).requires_grad_(False)
    nC = model.num_frames // model.chunk_frames
    cfg = build_config(dict(tau=1e-3, **over))
    spec = RolloutSpec(
        group_size=3,
        window=(2, 4),
        p_keep=0.3,
        anchor=False,
        explore=cfg.explore,
        score_steps=cfg.score_steps,
    )
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
        part = Part(ro, w, adv, valid, torch.ones(2), None, u_ref, logp_ref)
        st, _, _ = policy_gradients(run, model, part, contextlib.nullcontext)
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        stats.append(st)
    assert len(grads[0]) == len(grads[1]) > 0
    assert sum(g.abs().sum() for g in grads[0]) > 0
    scale = max(float(g.abs().max()) for g in grads[0])
    for a, b in zip(*grads, strict=True):  # float32 sums in another order: relative to the largest
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * scale)
    assert stats[0] == pytest.approx(stats[1], rel=1e-5, abs=1e-8)


@pytest.mark.parametrize(
    "over",
    [
        dict(),  # branch likelihood, velocity KL
        dict(likelihood="step", kl="softmax", score_steps=(0, 1), replay_branches=1),
        dict(explore="sde", kl="velocity"),
    ],
    ids=["branch-velocity_kl", "step-softmax_kl-one_branch", "sde"],
)
def test_micro_batches_accumulate_the_whole_batch_gradient(over):
    """Groups replayed and back-propagated in micro-batches (2 + 1 of 3 groups, one of them
    without a valid advantage) give the gradient, statistics and old log-probabilities of the
    whole batch at once."""
    import contextlib
    import copy
    from types import SimpleNamespace

    from kvpo.method.likelihood import branch_log_probs
    from kvpo.method.update import accumulate_gradients
    from kvpo.run.config import build_config

    model = tiny_model().train()
    ref = copy.deepcopy(model).requires_grad_(False)
    torch.manual_seed(3)
    with torch.no_grad():  # the policy has moved from the reference: a KL term to weigh
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    nC = model.num_frames // model.chunk_frames
    cfg = build_config(dict(tau=0.05, kl_coef=3.0, **over))
    spec = RolloutSpec(
        group_size=3,
        window=(2, 4),
        p_keep=0.3,
        anchor=False,
        explore=cfg.explore,
        score_steps=cfg.score_steps,
    )
    prompts = [*PROMPTS, PROMPTS[0].replace("left", "down")]
    ro = rollout(model, [[p] * nC for p in prompts], spec, torch.Generator().manual_seed(0))
    rewards = torch.randn(3, 3, generator=torch.Generator().manual_seed(1))
    rewards[1] = 0.5  # a tied group: no valid advantage
    adv, valid = group_advantages(rewards)
    assert valid.tolist() == [True, False, True]

    def refs(r, w):
        with torch.no_grad():
            u_ref = replay_velocities(ref, r)
            logp_ref = None
            if cfg.kl == "softmax":
                logp_ref = branch_log_probs(cfg, ref, u_ref, r, trajectory_energy(u_ref, r, w))
        return u_ref, logp_ref

    def run(split, logp_old):
        parts = [ro.groups(s) for s in split]
        w = [step_weights(r) for r in parts]
        olds = [None if logp_old is None else logp_old[s] for s in split]
        model.zero_grad(set_to_none=True)
        refs_of = [refs(r, x) for r, x in zip(parts, w, strict=True)]
        batch = SimpleNamespace(
            parts=parts,
            step_weights=w,
            adv=adv,
            valid=valid,
            group_weight=torch.ones(len(valid)),
            refs=refs_of,
            tau=cfg.tau,
        )
        st, olds, _ = accumulate_gradients(cfg, model, batch, olds, contextlib.nullcontext)
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        return grads, st, torch.cat(olds)

    whole = [slice(0, 3)]
    _, _, first = run(whole, None)  # the first epoch: old = current log-probabilities
    # a later epoch: the policy has moved away from the rollout's (ratios off 1, some clipped)
    old = first + 0.2 * torch.randn(first.shape, generator=torch.Generator().manual_seed(2))
    g_all, st_all, _ = run(whole, old)
    assert len(g_all) > 0 and sum(g.abs().sum() for g in g_all) > 0
    assert st_all["kl"] > 1e-5 and abs(st_all["loss"]) > 1e-3 and 0 < st_all["clip_frac"] < 1
    scale = max(float(g.abs().max()) for g in g_all)
    for split in ([slice(0, 2), slice(2, 3)], [slice(0, 1), slice(1, 3)]):
        torch.testing.assert_close(run(split, None)[2], first)
        grads, st, _ = run(split, old)
        assert len(grads) == len(g_all)
        for a, b in zip(g_all, grads, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * scale)
        assert st == pytest.approx(st_all, rel=1e-5, abs=1e-8)


def test_learning_rate_schedules():
    from kvpo.method.update import learning_rate
    from kvpo.run.config import build_config

    def lrs(**kw):
        cfg = build_config(dict(lr=1e-3, iterations=10, **kw))
        return [learning_rate(cfg, it) for it in range(10)]

    assert lrs() == [1e-3] * 10
    assert lrs(lr_warmup=4) == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3] + [1e-3] * 6)
    cos = lrs(lr_warmup=3, lr_schedule="cosine")
    want = [1e-3 / 3, 2e-3 / 3, 1e-3] + [5e-4 * (1 + math.cos(math.pi * k / 7)) for k in range(7)]
    assert cos == pytest.approx(want)
    assert cos[3] == pytest.approx(1e-3) and 0 < cos[-1] < 1e-4
    assert all(a > b for a, b in zip(cos[3:-1], cos[4:], strict=True))  # decays after warmup
