"""Branch log-probabilities (branch TVE, per step, unnormalized) and the KL terms."""

import torch
from trainer_support import small_rollout

from kvpo.config import TrainConfig
from kvpo.likelihood import branch_log_probs, kl_term
from kvpo.replay import replay_velocities, step_energies, step_weights, trajectory_energy


def test_step_energies_and_per_step_likelihood_match_float64(model):
    """likelihood='step': one Gibbs distribution per scored step over distance / max(t, floor)^2."""
    ro = small_rollout(model, p_keep=0.3, record_prefix=True)
    u = replay_velocities(model, ro)
    e = step_energies(u, ro)
    diff = (u.detach().double() - ro.velocities.double()).pow(2).mean(dim=(3, 4))  # [B, G, K]
    torch.testing.assert_close(e.double(), diff, rtol=1e-5, atol=1e-12)
    cfg = TrainConfig(likelihood="step", tau=0.01, sigma_floor=0.5)
    logp = branch_log_probs(cfg, model, u, ro, None)
    scored = ro.scored
    assert logp.shape == (*u.shape[:2], int(scored.sum())) and int((~scored).sum()) > 0
    sigma = ro.t.double()[scored].clamp_min(0.5)
    want = torch.log_softmax(-diff[:, :, scored] / sigma**2 / 0.01, dim=1)
    torch.testing.assert_close(logp.double(), want, rtol=1e-4, atol=1e-6)
    assert sigma.min() == 0.5 and sigma.max() > 0.5  # the floor binds on the last steps only
    free = branch_log_probs(
        TrainConfig(likelihood="step", tau=0.01, sigma_floor=0.5, group_normalize=False, kl="none"),
        model,
        u,
        ro,
        None,
    )
    torch.testing.assert_close(
        free.double(), -diff[:, :, scored] / sigma**2 / 0.01, rtol=1e-4, atol=1e-6
    )
    energy = trajectory_energy(u, ro, step_weights(ro))
    free = branch_log_probs(TrainConfig(group_normalize=False, kl="none"), model, u, ro, energy)
    torch.testing.assert_close(free, -energy / TrainConfig.tau)
    logp.sum().backward()  # differentiable in the policy
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_softmax_kl_is_the_branch_distributions_kl_normalized_or_not():
    gen = torch.Generator().manual_seed(0)
    e, e_ref = torch.rand(3, 5, 2, generator=gen), torch.rand(3, 5, 2, generator=gen)
    cfg = TrainConfig(kl="softmax")
    p = torch.softmax(-e.double() / 0.1, dim=1)
    q = torch.softmax(-e_ref.double() / 0.1, dim=1)
    want = (p * (p.log() - q.log())).sum(1).mean()
    u = torch.zeros(1)
    normalized = kl_term(
        cfg, u, u, torch.log_softmax(-e / 0.1, 1), torch.log_softmax(-e_ref / 0.1, 1)
    )
    free = kl_term(cfg, u, u, -e / 0.1, -e_ref / 0.1)
    torch.testing.assert_close(normalized.double(), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(free.double(), want, rtol=1e-5, atol=1e-7)
    assert want > 0 and kl_term(cfg, u, u, -e / 0.1, -e / 0.1 + 3.0).abs() < 1e-6
    a, b = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen)
    vel = kl_term(TrainConfig(kl="velocity"), a, b, None, None)
    torch.testing.assert_close(vel.double(), (a.double() - b.double()).pow(2).mean())
