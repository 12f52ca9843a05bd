"""The GPU benchmark suite runs end to end at toy size on CPU (Triton under the interpreter), so
the first session with a GPU spends its minutes measuring. What a GPU alone can fail (the flash
SDPA backend, flash-attn, the CUDA kernels, timings) is not exercised here."""

import math

import pytest

from kvpo_kernels import _backend

pytestmark = pytest.mark.skipif(
    not (_backend.triton_available() and _backend.triton_interpreted()),
    reason="needs triton and TRITON_INTERPRET=1 at import",
)


@pytest.fixture(scope="module")
def tables():
    from benchmarks.gpu_suite import sections

    return dict(sections(smoke=True, device="cpu"))


def _row(rows, method):
    (row,) = [r for r in rows if r["method"] == method]
    return row


def test_every_table_is_there(tables):
    assert list(tables) == [
        "routed_attention forward, Wan2.1 shape, float16",
        "routed_attention forward + backward, Wan2.1 shape, float16",
        "velocity_energy, float16",
        "sweep: 3 frames of cache, G = 2",
    ]


def test_routed_methods_agree_with_kvpo(tables):
    fwd = tables["routed_attention forward, Wan2.1 shape, float16"]
    methods = (
        "kvpo triton",
        "kvpo triton_tma",
        "FlexAttention + BlockMask build",
        "SDPA flash on gathered K/V",
    )
    for method in methods:
        row = _row(fwd, method)
        assert row["error"] == "", row
        assert row["rel_err_vs_kvpo"] < 2e-3, row  # fp16 outputs
        assert row["ms"] > 0 and row["tflops"] > 0, row
    sweep = tables["sweep: 3 frames of cache, G = 2"]
    names = ["kvpo triton", "FlexAttention + BlockMask build", "kvpo triton_tma"]
    assert [r["method"] for r in sweep] == names
    assert all(r["error"] == "" for r in sweep), sweep


def test_backward_rows_run_or_name_their_error(tables):
    bwd = tables["routed_attention forward + backward, Wan2.1 shape, float16"]
    for method in (
        "kvpo triton",
        "kvpo triton, atomic dq",
        "kvpo triton_tma",
        "kvpo triton_tma, atomic dq",
        "SDPA flash on gathered K/V",
    ):
        row = _row(bwd, method)
        assert row["error"] == "", row
        assert row["bwd_ms"] > 0 and row["bwd_tflops"] > 0 and row["ms"] > 0, row
    assert _row(bwd, "kvpo triton, atomic dq")["rel_err_vs_kvpo"] < 2e-3
    flex = _row(bwd, "FlexAttention + BlockMask build")  # no CPU backward in torch
    assert flex["error"] == "" or "backward" in flex["error"]
    assert flex["error"] != "" or flex["ms"] > 0


def test_velocity_energy_rows_are_correct(tables):
    rows = tables["velocity_energy, float16"]
    alone = "kvpo triton fwd kernel alone (no op, no zero fill)"
    from benchmarks.gpu_suite import ENERGY_TILINGS

    tilings = [f"{alone.split(' (')[0]}, {t}" for t in ENERGY_TILINGS]
    for method in ("kvpo triton fwd", "kvpo triton bwd", "torch eager fwd", alone, *tilings):
        row = _row(rows, method)
        assert row["error"] == "", row
        assert row["rel_err"] < 2e-3 and row["of_copy"] > 0 and row["of_copy_clean"] > 0, row
        assert row["call_ms"] > 0 and row["gpu_ms"] > 0 and row["gpu_ms_clean"] > 0, row
        graphed = method != "torch eager fwd" and "bwd" not in method
        assert row["graph_ms"] > 0 if graphed else math.isnan(row["graph_ms"]), row
    copies = [r for r in rows if r["method"].startswith("device copy (read + write)")]
    assert len(copies) == 2
    for row in copies:
        assert row["of_copy"] == row["of_copy_clean"] == row["of_copy_graph"] == 1.0, row
        assert row["GB/s"] > 0, row
        assert math.isnan(row["gpu_ms"]), row
    for method in (
        "copy of the same bytes (read + write)",
        "torch.sum over the same bytes (read only)",
    ):
        row = _row(rows, method)
        assert row["error"] == "" and row["gpu_ms"] > 0 and row["GB/s"] > 0, row


def test_the_velocity_part_runs_velocity_energy_alone():
    from benchmarks.gpu_suite import _gpu_ms, sections

    (title,) = [t for t, _ in sections(smoke=True, part="velocity", device="cpu")]
    assert title == "velocity_energy, float16"
    with pytest.raises(ValueError, match="flush must be"):
        _gpu_ms(lambda: None, "cpu", flush="none")
    with pytest.raises(ValueError, match="part must be one of"):
        next(sections(smoke=True, part="everything", device="cpu"))


def test_a_rows_environment_is_set_for_it_alone(monkeypatch):
    """The Hopper comparison row runs under KVPO_CUDA_HOPPER=0; the variable is restored after."""
    import os

    from benchmarks.gpu_suite import METHOD_ENV, _env

    monkeypatch.delenv("KVPO_CUDA_HOPPER", raising=False)
    monkeypatch.setenv("KVPO_BACKEND", "triton")
    with _env({**METHOD_ENV["kvpo cuda, KVPO_CUDA_HOPPER=0"], "KVPO_BACKEND": "cuda"}):
        assert os.environ["KVPO_CUDA_HOPPER"] == "0" and os.environ["KVPO_BACKEND"] == "cuda"
    assert "KVPO_CUDA_HOPPER" not in os.environ and os.environ["KVPO_BACKEND"] == "triton"
