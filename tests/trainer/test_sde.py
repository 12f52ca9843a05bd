"""The Flow-GRPO baseline: the SDE keeps the ODE's marginals, its step log-probabilities are the
Gaussian densities, SDE rollouts record steps that replay reproduces, and the trainer runs it."""

import json
import math

import pytest
import torch
from trainer_support import PROMPTS, tiny_model

from kvpo.method.likelihood import branch_log_probs
from kvpo.method.replay import replay_velocities
from kvpo.method.rollout import RolloutSpec, rollout
from kvpo.method.sde import sde_mean_std, sde_step, sde_t_cap, step_log_probs
from kvpo.method.update import ppo_objective
from kvpo.run.checkpoint import save_model
from kvpo.run.config import build_config
from kvpo.trainer import train


def _gaussian_velocity(x, t, c):
    """The exact velocity field E[eps - x0 | x_t] for data x0 ~ N(0, c^2), x_t = (1-t) x0 + t eps."""
    var = (1 - t) ** 2 * c**2 + t**2
    return (t - (1 - t) * c**2) / var * x


@pytest.mark.parametrize("noise", [0.5, 1.0])
def test_sde_keeps_the_marginals_of_the_ode(noise):
    """Sampling N(0, c^2) data from N(0, 1) noise: the SDE's final spread is the data's, as the
    ODE's is; dropping the drift correction would not."""
    gen = torch.Generator().manual_seed(0)
    c, n, steps = 0.5, 200_000, 400
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    t_cap = float(ts[1])
    x = torch.randn(n, 1, 1, generator=gen, dtype=torch.float64)
    y = x.clone()  # the same start without the correction
    for k in range(steps):
        t, tn = ts[k], ts[k + 1]
        eps = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        x = sde_step(x, _gaussian_velocity(x, t, c), t, tn, t_cap, noise, eps)
        y = (
            y
            + (tn - t) * _gaussian_velocity(y, t, c)
            + (noise * math.sqrt(min(float(t), t_cap) / (1 - min(float(t), t_cap))))
            * math.sqrt(float(t - tn))
            * eps
        )
    assert float(x.std()) == pytest.approx(c, rel=0.03)
    assert abs(float(y.std()) - c) > 0.1  # uncorrected noise inflates the spread


def test_step_log_probs_are_gaussian_densities():
    gen = torch.Generator().manual_seed(1)
    B, G, K, L, d = 2, 3, 4, 5, 6
    u = torch.randn(B, G, K, L, d, generator=gen, dtype=torch.float64)
    x = torch.randn(B, G, K, L, d, generator=gen, dtype=torch.float64)
    v = torch.randn(B, G, K, L, d, generator=gen, dtype=torch.float64)
    t = torch.tensor([1.0, 0.8, 0.5, 0.2], dtype=torch.float64)
    tn = torch.tensor([0.8, 0.5, 0.2, 0.0], dtype=torch.float64)
    got = step_log_probs(u, x, v, t, tn, t_cap=0.8, noise=0.7)
    assert got.shape == (B, G, K)
    for k in range(K):
        tk, dt = float(t[k]), float(tn[k] - t[k])
        tc = min(tk, 0.8)
        sigma = 0.7 * math.sqrt(tc / (1 - tc))
        mean = x[:, :, k] + dt * (
            u[:, :, k] + sigma**2 / (2 * tk) * (x[:, :, k] + (1 - tk) * u[:, :, k])
        )
        dist = torch.distributions.Normal(mean, sigma * math.sqrt(-dt))
        want = dist.log_prob(x[:, :, k] + dt * v[:, :, k]).mean((-2, -1))
        torch.testing.assert_close(got[:, :, k], want.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler", ["euler", "renoise"])
def test_sde_rollout_branches_differ_and_replay_reproduces_their_steps(sampler):
    """On either sampler: the scored steps are the SDE's (per branch), the anchor is the
    deployment sample (the sampler's steps, its group's noise)."""
    model = tiny_model()
    model.set_sampler(sampler)
    spec = RolloutSpec(group_size=3, window=(2, 4), explore="sde", sde_noise=0.7, anchor=True)
    ro = rollout(
        model, [[PROMPTS[0]] * 5, [PROMPTS[1]] * 5], spec, torch.Generator().manual_seed(0)
    )
    assert ro.explore == "sde"
    w0 = ro.window[0]
    c = model.chunk_frames
    # shared prefix, then every branch its own noise
    prefix = ro.tokens[:, :, : w0 * c]
    assert torch.equal(prefix, prefix[:, :1].expand_as(prefix))
    assert (ro.tokens[:, 0, w0 * c :] - ro.tokens[:, 1, w0 * c :]).abs().max() > 1e-3
    # the anchor is the deterministic deployment sample
    ode = rollout(
        model,
        [[PROMPTS[0]] * 5, [PROMPTS[1]] * 5],
        RolloutSpec(group_size=1, window=(2, 4), p_keep=1.0, anchor=False),
        torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(ro.anchor_tokens, ode.tokens[:, 0], rtol=1e-4, atol=1e-5)
    # replayed under full context (the rollout's context) with the rollout policy, the recorded
    # steps are mean + std * eps: standardised residuals with unit second moment
    with torch.no_grad():
        u = replay_velocities(model, ro)
    t_cap = sde_t_cap(model.timesteps())
    x = ro.states
    tk = ro.t[:, None, None]
    tn = ro.t_next[:, None, None]
    mean, std = sde_mean_std(x, u, tk, tn, t_cap, 0.7)
    z = (x + (tn - tk) * ro.velocities - mean) / std
    assert float(z.pow(2).mean()) == pytest.approx(1.0, rel=0.05)
    assert abs(float(z.mean())) < 0.05


def test_ppo_objective_takes_per_step_log_probs():
    logp_old = torch.zeros(1, 2, 3)
    logp = torch.log(torch.tensor([[[1.5, 1.0, 0.5], [1.0, 1.0, 1.0]]]))
    adv = torch.tensor([[1.0, -1.0]])
    loss, st = ppo_objective(logp, logp_old, adv, torch.tensor([True]), 0.1, 0.2)
    # branch 0: min(r, clip(r)) = 1.2, 1.0, 0.5; branch 1: -1 each
    assert loss.item() == pytest.approx(-(1.2 + 1.0 + 0.5 - 3.0) / 6)
    assert st["clip_frac"] == pytest.approx(1 / 6)


def test_config_checks_the_baseline(tmp_path):
    with pytest.raises(ValueError, match="explore"):
        build_config({"explore": "noise"})
    with pytest.raises(ValueError, match="softmax"):
        build_config({"explore": "sde", "kl": "softmax"})
    with pytest.raises(ValueError, match="sde_noise"):
        build_config({"explore": "sde", "sde_noise": 0})


def test_trainer_runs_the_baseline(tmp_path):
    base = tmp_path / "tiny.safetensors"
    save_model(tiny_model(), base)
    cfg = build_config(
        dict(
            base_checkpoint=str(base),
            out_dir=str(tmp_path / "run"),
            iterations=2,
            prompts_per_iter=2,
            group_size=3,
            eval_prompts=2,
            eval_every=1,
            save_every=2,
            progress=False,
            threads=1,
            window=(2, 4),
            explore="sde",
            samples=False,
        )
    )
    res = train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows] == [-1, 0, 1]  # the evaluation before training, iterations
    rows = rows[1:]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["eval_reward"]) for r in rows)
    # per-step log-probs of the scored records only: [B, G, scored steps]
    model = res.model
    spec = RolloutSpec(group_size=3, window=(2, 4), explore="sde")
    ro = rollout(model, [[PROMPTS[0]] * 5], spec, torch.Generator().manual_seed(1))
    u = replay_velocities(model, ro)
    logp = branch_log_probs(cfg, model, u, ro, None)
    assert logp.shape == (1, 3, int(ro.scored.sum()))
