"""The KVPO update on a fixed rollout: it moves probability to high-advantage branches."""

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
