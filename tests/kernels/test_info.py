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
    assert "routed_attention backward deterministic: yes" in text

    monkeypatch.setenv("KVPO_DETERMINISTIC", "0")
    assert environment()["deterministic_backward"] == "no (dq by atomics)"
    monkeypatch.setenv("KVPO_DETERMINISTIC", "maybe")
    assert "KVPO_DETERMINISTIC must be 0 or 1" in environment()["deterministic_backward"]
    monkeypatch.delenv("KVPO_DETERMINISTIC")

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


def test_a_cuda_torch_without_cuda_kernels_is_told_how_to_build_them():
    """pip hides setup.py's advice, so the report repeats it where it applies: a CUDA torch, the
    extension built, no CUDA kernel in it; a CPU torch or a CMake library gets a plain 'none'."""
    env = environment()
    env.update(torch_cuda="13.0", native_extension=True, native_cuda_kernels=[], switches={})
    env["triton"] = "3.8.0"
    text = report(env)
    assert "CUDA kernels: none (torch has CUDA: rebuild with" in text, text
    assert "TORCH_CUDA_ARCH_LIST" in text and "Triton serves every op on CUDA tensors" in text
    env["triton"] = None
    assert "the PyTorch reference serves every op" in report(env)
    env["native_cuda_kernels"] = ["velocity_energy_fwd"]
    assert "CUDA kernels: velocity_energy_fwd\n" in report(env)
    env.update(native_cuda_kernels=[], torch_cuda=None)
    assert "CUDA kernels: none\n" in report(env)
    env.update(torch_cuda="13.0", switches={"KVPO_NATIVE_LIBRARY": "/b/libkvpo_ops.so"})
    assert "CUDA kernels: none\n" in report(env)
