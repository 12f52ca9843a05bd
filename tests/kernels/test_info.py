"""python -m kvpo_kernels.info: the report of what this installation runs, and where."""

import json
import os

import torch

from kvpo_kernels import _backend
from kvpo_kernels.info import environment, main, report


def test_the_report_names_each_ops_backend_as_dispatch_picks_it(monkeypatch):
    for key in [k for k in os.environ if k.startswith("KVPO_")]:
        monkeypatch.delenv(key)
    env = environment()
    assert env["torch"] == torch.__version__ and env["switches"] == {}
    want = "cpu" if _backend.native_available() else "reference"
    cpu = {op: picks["cpu"] for op, picks in env["backends"].items()}
    assert cpu == {"routed_attention": want, "velocity_energy": want}
    text = report(env)
    assert f"routed_attention  cpu tensors -> {want}" in text and "switches: none set" in text

    monkeypatch.setenv("KVPO_BACKEND", "reference")
    env = environment()
    assert env["switches"] == {"KVPO_BACKEND": "reference"}
    assert {b for picks in env["backends"].values() for b in picks.values()} == {"reference"}


def test_a_backend_that_cannot_run_here_says_why(monkeypatch):
    monkeypatch.setenv("KVPO_VELOCITY_ENERGY_BACKEND", "cuda")
    picks = environment()["backends"]["velocity_energy"]
    assert picks["cpu"] == (
        "error: velocity_energy: backend 'cuda' needs CUDA tensors, got device cpu"
    )


def test_json_output(capsys):
    env = main(["--json"])
    assert json.loads(capsys.readouterr().out) == env


def test_the_report_names_the_library_the_kernels_came_from(monkeypatch):
    """With KVPO_NATIVE_LIBRARY (a sanitizer build), not kvpo_kernels._C."""
    monkeypatch.delenv("KVPO_NATIVE_LIBRARY", raising=False)
    env = environment()
    assert "compiled extension kvpo_kernels._C: " in report(env)
    env["switches"] = {"KVPO_NATIVE_LIBRARY": "/b/libkvpo_ops.so"}
    text = report(env)
    assert "compiled kernels from KVPO_NATIVE_LIBRARY=/b/libkvpo_ops.so: " in text
    assert "kvpo_kernels._C" not in text
