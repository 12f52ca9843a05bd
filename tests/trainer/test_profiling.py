"""kvpo.run.profiling: --profile_iteration writes a trace of that iteration alone."""

import json
import re

import pytest
from trainer_support import run_overrides

from kvpo.run.config import build_config
from kvpo.trainer import train


def test_the_profiled_iteration_is_traced(base, tmp_path):
    over = run_overrides(
        base,
        tmp_path,
        iterations=3,
        profile_iteration=1,
        eval_before=False,
        eval_every=10,
        samples=False,
    )
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
    # the table: the traced ops by their own CPU time, most first (which ops make the 40 rows
    # depends on the machine's load, so the test checks the order, not the names)
    rows = _table_rows((tmp_path / "profile" / "iter_1_rank_0.txt").read_text())
    assert len(rows) == 40 and {name for name, _ in rows} <= names
    self_times = [t for _, t in rows]
    assert self_times == sorted(self_times, reverse=True) and self_times[-1] > 0


_UNIT_S = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


def _table_rows(table: str) -> list[tuple[str, float]]:
    """(name, self CPU seconds) of each row of a ``key_averages().table()``, checking its header."""
    lines = table.splitlines()
    header = re.split(r"\s{2,}", lines[1].strip())
    assert header[:3] == ["Name", "Self CPU %", "Self CPU"], header
    body = lines[3 : lines.index(lines[0], 3)]
    rows = []
    for line in body:
        name, _, self_cpu = re.split(r"\s{2,}", line.strip())[:3]
        value, unit = re.fullmatch(r"([0-9.]+)(s|ms|us|ns)", self_cpu).groups()
        rows.append((name, float(value) * _UNIT_S[unit]))
    return rows


def test_profile_iteration_is_checked(base, tmp_path):
    with pytest.raises(ValueError, match="profile_iteration=-2"):
        build_config(run_overrides(base, tmp_path, profile_iteration=-2))
