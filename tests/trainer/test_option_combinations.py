"""Options drawn together at random, as users combine them: each draw trains two iterations of the
tiny generator with an evaluation and a checkpoint. Each option has tests of its own; these catch
the combinations no test names (sample routing with micro-batches and per-step likelihood, LoRA
under bf16 autocast with replay in slices, the SDE baseline with anchor advantages, ...)."""

import json
import math

import pytest
import torch
from trainer_support import checkpoint_meta, draw, run_overrides, straight_and_resumed

from kvpo.run.config import build_config
from kvpo.trainer import train


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
