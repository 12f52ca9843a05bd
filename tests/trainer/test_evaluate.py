"""Held-out evaluation: fixed prompts, fixed noises, deployment sampling."""

import torch
from trainer_support import PROMPTS

from kvpo.evaluate import evaluate
from kvpo.rewards import CompositeReward
from kvpo.rollout import generate


def test_evaluate_averages_over_fixed_noises(model):
    reward = CompositeReward({"alignment": 1.0, "visual": 0.5})
    one, vids_one = evaluate(model, PROMPTS, reward, seed=3, device=torch.device("cpu"))
    two, vids_two = evaluate(model, PROMPTS, reward, seed=3, device=torch.device("cpu"), seeds=3)
    # The videos returned are those of the first noise, the same whatever the number of noises.
    assert vids_two.shape == vids_one.shape == (2, model.num_frames, 3, 8, 8)
    torch.testing.assert_close(vids_two, vids_one)
    # The reward averages all 3 x 2 samples: recompute it from the videos of the same seed.
    nC = model.num_frames // model.chunk_frames
    asked = PROMPTS * 3
    v = generate(model, [[p] * nC for p in asked], torch.Generator().manual_seed(3))
    want = reward.total(reward.components((v + 1) / 2, asked)).mean()
    assert abs(two["eval_reward"] - float(want)) < 1e-6
    assert abs(two["eval_reward"] - one["eval_reward"]) > 1e-6
