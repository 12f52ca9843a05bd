"""kvpo.profiling: --profile_iteration writes a trace of that iteration alone."""

import json

import pytest
from trainer_support import run_overrides

from kvpo.config import build_config
from kvpo.train import train


def test_the_profiled_iteration_is_traced(base, tmp_path):
    over = run_overrides(
        base, tmp_path, iterations=3, profile_iteration=1, eval_before=False, eval_every=10,
        samples=False,
    )  # fmt: skip
    train(build_config(over))
    assert sorted(p.name for p in (tmp_path / "profile").iterdir()) == [
        "iter_1_rank_0.json",
        "iter_1_rank_0.txt",
    ]
    events = json.loads((tmp_path / "profile" / "iter_1_rank_0.json").read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    # one iteration's stages: the rollout's and replay's attention forwards, the update's backward
    assert {"kvpo iteration 1", "kvpo::routed_attn_fwd", "kvpo::routed_attn_bwd"} <= names
    assert not any("iteration 0" in (n or "") or "iteration 2" in (n or "") for n in names)
    table = (tmp_path / "profile" / "iter_1_rank_0.txt").read_text()
    assert "Self CPU" in table and "aten::mm" in table


def test_profile_iteration_is_checked(base, tmp_path):
    with pytest.raises(ValueError, match="profile_iteration=-2"):
        build_config(run_overrides(base, tmp_path, profile_iteration=-2))
