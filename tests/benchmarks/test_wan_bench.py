"""The Wan2.1 benchmark runs end to end on a tiny model on CPU, so a GPU session spends its minutes
measuring: both chunk-step methods give a time and agree, and one KVPO iteration is timed."""

import re

import pytest

pytest.importorskip("diffusers")


def test_wan_bench_smoke(tmp_path):
    from benchmarks.wan_bench import main

    out = tmp_path / "wan.md"
    main(
        [
            "--smoke",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--run_dir",
            str(tmp_path / "run"),
            "--rollout_branches",
            "2",
        ]
    )
    text = out.read_text()
    for method in ("kvpo adapter, paged cache", "diffusers forward, 21 frames, block-causal mask"):
        (row,) = [ln for ln in text.splitlines() if ln.startswith(f"| {method} |")]
        assert float(row.split("|")[2]) > 0, row
    err = float(re.search(r"relative error vs diffusers ([0-9.e+-]+)", text).group(1))
    assert err < 1e-5
    assert "| one iteration, G = 4, rollout_branches = 2 | value |" in text
    for key in ("time_rollout", "time_replay", "time_update", "wall_s", "rollout_cache_mib"):
        assert re.search(rf"\| {key} \| [0-9.]+ \|", text), key
    # the preflight table: streaming and replay agree, routing explores, the gradient arrives
    err = float(re.search(r"\| replay error, relative \(bf16\) \| ([0-9.e+-]+) \|", text).group(1))
    assert err < 1e-10 and "| failures | none |" in text
