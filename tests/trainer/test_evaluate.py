"""Held-out evaluation: fixed prompts, fixed noises, deployment sampling."""

import pytest
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


def test_evaluation_in_passes_makes_the_same_samples(model):
    """batch=k makes k videos at a time, each from the noise it has in the whole batch."""
    reward = CompositeReward({"alignment": 1.0, "visual": 0.5})
    cpu = torch.device("cpu")
    whole, vids = evaluate(model, PROMPTS, reward, seed=3, device=cpu, seeds=3)
    for batch in (1, 4, 6, 10):
        part, vids_part = evaluate(model, PROMPTS, reward, seed=3, device=cpu, seeds=3, batch=batch)
        assert part == pytest.approx(whole, rel=1e-5, abs=1e-6)
        torch.testing.assert_close(vids_part, vids, rtol=0, atol=1e-5)
