"""Options drawn together at random, as users combine them: each draw trains two iterations of the
tiny generator with an evaluation and a checkpoint. Each option has tests of its own; these catch
the combinations no test names (sample routing with micro-batches and per-step likelihood, LoRA
under bf16 autocast with replay in slices, the SDE baseline with anchor advantages, ...)."""

import json
import math
import random

import pytest
import torch
from trainer_support import checkpoint_meta, run_overrides, straight_and_resumed

from kvpo.config import build_config
from kvpo.train import train

OPTIONS = {
    "group_size": [2, 3, 4],
    "rollout_branches": [0, 1, 2],
    "window": [(1, 3), (2, 4), (1, 5), (3, 5)],
    "window_shift": [0, 1],
    "p_keep": [0.3, 0.7],
    "multi_prompt": [0.0, 0.5, 1.0],
    "recache": [None, True],
    "score_after_window": [False, True],
    "score_steps": [None, (0,), (0, 1), (2,)],
    "kl_prefix": [False, True],
    "step_weighting": ["uniform", "sigma"],
    "likelihood": ["branch", "step"],
    "group_normalize": [True, False],
    "reward_scopes": [{"video": 1.0}, {"local": 1.0, "global": 0.5}, {"global": 1.0}],
    "advantage": ["group", "anchor"],
    "epochs": [1, 2],
    "replay_branches": [0, 1, 2],
    "micro_batch": [0, 1],
    "prompts_per_iter": [2, 3],
    "lr_warmup": [0, 2],
    "lr_schedule": ["constant", "cosine"],
    "kl": ["velocity", "softmax", "none"],
    "lora_rank": [0, 2],
    "amp": ["none", "bf16"],
    "grad_checkpointing": [False, True],
    "ema": [0.0, 0.9],
    "eval_batch": [0, 3],
    "eval_multi_prompt": [False, True],
    "reward_batch": [0, 5],
    "samples_at_eval": [False, True],
    "tau_auto": [0.0, 1.0],
}


def draw(seed: int) -> dict:
    """About half the options, each at a random value; then what makes the draw a run that
    explores: sample routing on a local window whose history overflows it, the SDE baseline
    with its own KL and no tau_auto."""
    rng = random.Random(seed)
    over = {k: rng.choice(v) for k, v in OPTIONS.items() if rng.random() < 0.5}
    window = over.get("window", (2, 4))
    over["window_shift"] = min(over.get("window_shift", 0), 5 - window[1])
    if rng.random() < 0.3:
        over.update(routing="sample", local_window=2, recent_frames=1, window=(3, 5))
        over["window_shift"] = 0
    if rng.random() < 0.2:
        over["explore"] = "sde"
        if over.get("kl") == "softmax":
            over["kl"] = "velocity"
        over.pop("tau_auto", None)  # the SDE baseline has no Gibbs temperature
    return over


@pytest.mark.parametrize("seed", range(24))
def test_drawn_options_train_evaluate_and_save(base, tmp_path, seed):
    over = draw(seed)
    samples = bool(over.get("samples_at_eval"))  # it needs them; the rest leaves them out
    cfg = build_config(run_overrides(base, tmp_path, samples=samples, eval_seeds=1, **over))
    result = train(cfg)
    what = json.dumps({k: str(v) for k, v in over.items()})
    assert [row["iter"] for row in result.history] == [-1, 0, 1], what
    for row in result.history[1:]:
        for key in ("reward", "tve", "ratio", "loss", "grad_norm", "eval_reward"):
            assert math.isfinite(row[key]), f"{what}: {key} = {row[key]}"
    assert int(checkpoint_meta(tmp_path / "checkpoint.safetensors")["iteration"]) == 2, what


@pytest.mark.parametrize("seed", range(100, 106))
def test_drawn_options_resume_exactly(base, tmp_path, seed):
    """A run of a drawn option set resumed after 2 of its 3 iterations, in this process, ends
    on the weights of the run never stopped (what found LoRA adapters drawn from the global
    RNG: a resumed run's earlier part had started from other adapters)."""
    over = {**draw(seed), "lora_rank": 2} if seed % 2 else draw(seed)
    kw = dict(over, samples=bool(over.get("samples_at_eval")), eval_seeds=1)
    straight, resumed = straight_and_resumed(base, tmp_path, **kw)
    what = json.dumps({k: str(v) for k, v in over.items()})
    pairs = zip(straight.named_parameters(), resumed.parameters(), strict=True)
    for (name, p), q in pairs:
        assert torch.equal(p, q), f"{what}: {name}"
