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
    # diversity: the RMS distance between two noises' samples of a prompt over their RMS, on
    # frames averaged down to 8 x 8 pixels (at most 16 x 16: these frames are 8 x 8 already)
    x = ((v.double() + 1) / 2).view(3, len(PROMPTS), -1)
    pair = [
        [(x[s, p] - x[t, p]).square().mean() for s in range(3) for t in range(3) if s != t]
        for p in range(len(PROMPTS))
    ]
    rms = [x[:, p].square().mean() for p in range(len(PROMPTS))]
    want = sum((sum(d) / len(d) / r).sqrt() for d, r in zip(pair, rms, strict=True)) / len(PROMPTS)
    assert two["eval_diversity"] == pytest.approx(float(want), rel=1e-5)
    assert "eval_diversity" not in one  # one noise: nothing to compare


def test_evaluation_in_passes_makes_the_same_samples(model):
    """batch=k makes k videos at a time, each from the noise it has in the whole batch."""
    reward = CompositeReward({"alignment": 1.0, "visual": 0.5})
    cpu = torch.device("cpu")
    whole, vids = evaluate(model, PROMPTS, reward, seed=3, device=cpu, seeds=3)
    for batch in (1, 4, 6, 10):
        part, vids_part = evaluate(model, PROMPTS, reward, seed=3, device=cpu, seeds=3, batch=batch)
        assert part == pytest.approx(whole, rel=1e-5, abs=1e-6)
        torch.testing.assert_close(vids_part, vids, rtol=0, atol=1e-5)


def test_cli_reproduces_the_runs_evaluation(base, tmp_path, capsys):
    """python -m kvpo.evaluate --checkpoint: the run's last held-out scores, policy and EMA."""
    import json

    from trainer_support import run_overrides

    from kvpo.config import build_config
    from kvpo.evaluate import main
    from kvpo.train import train

    cfg = build_config(run_overrides(base, tmp_path, ema=0.5, samples=False, eval_seeds=2))
    last = train(cfg).history[-1]
    ckpt = str(tmp_path / "checkpoint.safetensors")
    scores = main(["--checkpoint", ckpt, "--device", "cpu"])
    assert scores["eval_reward"] == pytest.approx(last["eval_reward"], rel=1e-6)
    assert scores["eval_alignment"] == pytest.approx(last["eval_alignment"], rel=1e-6)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == scores
    ema = main(["--checkpoint", ckpt, "--ema", "--device", "cpu"])
    assert ema["eval_reward"] == pytest.approx(last["eval_ema_reward"], rel=1e-6)
    one = main(["--checkpoint", ckpt, "--set", "eval_seeds=1", "--set", "eval_batch=3"])
    assert one["eval_reward"] != pytest.approx(scores["eval_reward"], rel=1e-6)
    for bad, match in (
        (["--set", "lr=1"], "not one of"),
        (["--set", "eval_seeds=0"], "eval_seeds"),
        (["--checkpoint", str(tmp_path / "none.safetensors")], "does not exist"),
    ):
        with pytest.raises(SystemExit, match=match):
            main(["--checkpoint", ckpt, *bad])


def test_evaluation_runs_in_eval_mode_and_restores_the_mode(model):
    """A policy evaluated between updates samples as deployed (no dropout), then trains on."""
    from kvpo.config import build_config
    from kvpo.evaluate import evaluate_sets

    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(m.training))
    model.train()
    sets = {"eval_": PROMPTS}
    cfg = build_config(dict(eval_seeds=1))
    evaluate_sets(model, sets, CompositeReward({"visual": 1.0}), cfg, torch.device("cpu"))
    assert seen and not any(seen) and model.training
