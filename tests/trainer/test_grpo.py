"""GRPO pieces against hand-computed cases."""

import math

import pytest
import torch

from kvpo.method.advantages import anchor_advantages, group_advantages
from kvpo.method.likelihood import gibbs_log_probs
from kvpo.method.update import ppo_objective


def test_group_advantages_hand_computed():
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]])
    adv, valid = group_advantages(r, eps=0.0, clip=10.0)
    std = math.sqrt(1.25)  # population std of 1..4
    expected = torch.tensor([-1.5, -0.5, 0.5, 1.5]) / std
    torch.testing.assert_close(adv[0], expected)
    assert valid.tolist() == [True, False]
    assert adv[1].abs().max() == 0  # zero-spread group skipped


def test_group_advantages_clip():
    r = torch.tensor([[0.0] * 9 + [1.0]])  # one outlier: (1 - 0.1) / 0.3 = 3
    adv, _ = group_advantages(r, eps=0.0, clip=2.5)
    assert adv[0, -1].item() == pytest.approx(2.5)
    assert adv[0, 0].item() == pytest.approx(-0.1 / 0.3, rel=1e-5)


def test_anchor_advantages_and_protect_gate():
    comps = {
        "a": torch.tensor([[0.5, 0.7], [0.1, 0.2]]),
        "b": torch.tensor([[1.0, 0.0], [0.0, 0.0]]),
    }
    anchor = {"a": torch.tensor([0.6, 0.3]), "b": torch.tensor([0.0, 0.0])}
    adv, valid = anchor_advantages(
        comps, anchor, {"a": 1.0, "b": 0.5}, sigma={"a": 0.1, "b": 1.0}, clip=2.5, eps=0.0
    )
    # group 0: branch 0 = (0.5-0.6)/0.1 + 0.5*1 = -0.5; branch 1 = (0.7-0.6)/0.1 + 0 = 1.0
    torch.testing.assert_close(adv[0], torch.tensor([-0.5, 1.0]))
    assert valid.tolist() == [True, False]  # no branch of group 1 beats its anchor
    torch.testing.assert_close(adv[1], torch.tensor([-2.0, -1.0]))


def test_gibbs_log_probs():
    e = torch.tensor([[1.0, 2.0, 4.0]])
    tau = 2.0
    z = sum(math.exp(-x / tau) for x in (1.0, 2.0, 4.0))
    expected = torch.tensor([[math.log(math.exp(-x / tau) / z) for x in (1.0, 2.0, 4.0)]])
    torch.testing.assert_close(gibbs_log_probs(e, tau), expected)
    with pytest.raises(ValueError, match="tau"):
        gibbs_log_probs(e, 0.0)


def test_ppo_objective_clipping_hand_computed():
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    ratio = torch.tensor([[1.5, 1.5, 0.5, 0.5]])
    logp_old = torch.zeros(1, 4)
    logp = ratio.log().requires_grad_(True)
    loss, st = ppo_objective(logp, logp_old, adv, torch.tensor([True]), clip_low=0.1, clip_high=0.2)
    # min(r A, clip(r) A): 1.2 (clipped), -1.5, 0.5, -0.9 (clipped)
    assert loss.item() == pytest.approx(-(1.2 - 1.5 + 0.5 - 0.9) / 4)
    assert st["clip_frac"] == pytest.approx(0.5)
    loss.backward()
    # clipped terms carry no gradient; unclipped: d(-r A / 4)/d logp = -r A / 4
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 1.5 / 4, -0.5 / 4, 0.0]]))


def test_ppo_objective_skips_invalid_groups():
    logp = torch.zeros(2, 2, requires_grad=True)
    adv = torch.tensor([[1.0, -1.0], [3.0, -3.0]])
    old = torch.tensor([[0.0, 0.0], [-0.5, 0.5]])
    loss, st = ppo_objective(logp, old, adv, torch.tensor([False, True]))
    ratio = torch.tensor([0.0, 0.0, 0.5, -0.5]).exp()  # exp(logp - old), row-major
    assert st["ratio"] == pytest.approx(float(ratio[2:].mean()))  # the valid group's alone
    loss, st = ppo_objective(logp, old, adv, torch.tensor([False, False]))
    assert loss.item() == 0.0
    # no group trains: the ratio over every branch (a KL step alone moves the policy), not 0
    assert st["ratio"] == pytest.approx(float(ratio.mean())) and st["clip_frac"] == 0.0


def test_gradient_is_contrastive_in_energy():
    """grad_E of -A log p_i: lowers energy of positive-advantage branches, raises negative ones."""
    e = torch.tensor([[0.3, 0.1, 0.2]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, 0.0]])
    logp = gibbs_log_probs(e, 0.1)
    loss, _ = ppo_objective(logp, logp.detach(), adv, torch.tensor([True]))
    loss.backward()
    assert e.grad[0, 0] > 0 and e.grad[0, 1] < 0  # descent lowers E_0, raises E_1
