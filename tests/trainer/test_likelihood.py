"""Branch log-probabilities (branch TVE, per step, unnormalized) and the KL terms."""

import dataclasses

import pytest
import torch
from trainer_support import small_rollout

from kvpo.method.likelihood import branch_log_probs, iteration_tau, kl_term
from kvpo.method.replay import replay_velocities, step_energies, step_weights, trajectory_energy
from kvpo.run.config import TrainConfig


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
    want = (p * (p.log() - q.log())).sum(1).mean(1)  # per group, over its steps
    u = torch.zeros(3)
    normalized = kl_term(
        cfg, u, u, torch.log_softmax(-e / 0.1, 1), torch.log_softmax(-e_ref / 0.1, 1)
    )
    free = kl_term(cfg, u, u, -e / 0.1, -e_ref / 0.1)
    torch.testing.assert_close(normalized.double(), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(free.double(), want, rtol=1e-5, atol=1e-7)
    assert (want > 0).all() and kl_term(cfg, u, u, -e / 0.1, -e / 0.1 + 3.0).abs().max() < 1e-6
    a, b = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen)
    vel = kl_term(TrainConfig(kl="velocity"), a, b, None, None)
    torch.testing.assert_close(vel.double(), (a.double() - b.double()).pow(2).mean(1))


def _spreads_float64(cfg, model, ro) -> torch.Tensor:
    """Each group's (and scored step's) std over the branches of what the Gibbs form divides by
    tau, in float64 from the replayed velocities."""
    with torch.no_grad():
        u = replay_velocities(model, ro).double()
    dist = (u - ro.velocities.double()).pow(2).mean(dim=(3, 4))  # [B, G, K]
    if cfg.likelihood == "step":
        sigma = ro.t.double()[ro.scored].clamp_min(cfg.sigma_floor)
        return (dist[:, :, ro.scored] / sigma**2).std(1).flatten()
    return (dist * step_weights(ro).double()).sum(2).std(1)


@pytest.mark.parametrize("likelihood", ["branch", "step"])
def test_iteration_tau_is_tau_auto_times_the_median_spread_of_the_energies(model, likelihood):
    """tau_auto: the median over every group (and scored step) of the energies' std over the
    branches, times tau_auto; groups whose branches tie are left out; replayed in slices of
    branches alike; tau_auto 0 keeps tau."""
    parts = [small_rollout(model, p_keep=p) for p in (0.3, 0.6)]
    weights = [step_weights(ro) for ro in parts]
    cfg = TrainConfig(likelihood=likelihood, tau_auto=0.7, sigma_floor=0.2)
    spreads = torch.cat([_spreads_float64(cfg, model, ro) for ro in parts])
    # steps of a chunk whose branches all drew the same pages tie (per-step likelihood)
    spreads = spreads[spreads > 0]
    assert spreads.numel() > 2
    want = 0.7 * float(spreads.median())
    assert iteration_tau(cfg, model, parts, weights) == pytest.approx(want, rel=1e-4)
    sliced = dataclasses.replace(cfg, replay_branches=1)
    assert iteration_tau(sliced, model, parts, weights) == pytest.approx(want, rel=1e-4)
    tied = small_rollout(model, p_keep=1.0)  # one noise, one context: every branch alike
    assert iteration_tau(cfg, model, [tied], [step_weights(tied)]) == cfg.tau
    with_tied = iteration_tau(cfg, model, [tied, parts[0]], [step_weights(tied), weights[0]])
    only = _spreads_float64(cfg, model, parts[0])
    only = 0.7 * float(only[only > 0].median())
    assert with_tied == pytest.approx(only, rel=1e-4)
    fixed = TrainConfig(likelihood=likelihood, tau=0.03)
    assert iteration_tau(fixed, model, parts, weights) == 0.03
