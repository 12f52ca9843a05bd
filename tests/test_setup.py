"""setup.py: which kernels a build compiles."""

import ast
import io
import os
import sys
import types
from contextlib import redirect_stderr
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]


def _setup_use_cuda(cuda_version: str | None, gpu: bool, env: dict[str, str]):
    """setup.py's decision whether to build the CUDA kernels, under a stand-in torch (``cuda``
    its CUDA version, ``gpu`` whether one is visible) and environment ``env``: its return value,
    or the SystemExit it raises, and what it printed to stderr."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    keep = [
        n
        for n in tree.body
        if isinstance(n, ast.FunctionDef)
        and n.name == "_use_cuda"
        or isinstance(n, ast.Assign)
        and any(getattr(t, "id", "") == "ARCH_EXAMPLE" for t in n.targets)
    ]
    fake_torch = types.SimpleNamespace(
        version=types.SimpleNamespace(cuda=cuda_version),
        cuda=types.SimpleNamespace(is_available=lambda: gpu),
    )
    scope = {"os": os, "sys": sys, "torch": fake_torch}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "setup.py", "exec"), scope)
    err = io.StringIO()
    with mock.patch.dict(os.environ, env, clear=True), redirect_stderr(err):
        try:
            result = scope["_use_cuda"]()
        except SystemExit as exc:
            result = exc
    return result, err.getvalue()


def test_setup_builds_cuda_kernels_where_it_can_name_the_architectures():
    """A CUDA torch builds them for the visible GPU, or without one for TORCH_CUDA_ARCH_LIST
    (a container image built on a CPU machine); with neither it says how and builds the rest;
    KVPO_FORCE_CUDA=1 there stops with the same advice instead of torch's IndexError."""
    assert _setup_use_cuda(None, False, {}) == (False, "")  # CPU torch: nothing to say
    assert _setup_use_cuda("12.8", True, {}) == (True, "")
    assert _setup_use_cuda("12.8", False, {"TORCH_CUDA_ARCH_LIST": "9.0"}) == (True, "")
    assert _setup_use_cuda("12.8", True, {"KVPO_NO_CUDA": "1"}) == (False, "")
    built, said = _setup_use_cuda("12.8", False, {})
    assert built is False and "TORCH_CUDA_ARCH_LIST" in said, said
    built, said = _setup_use_cuda("12.8", False, {"TORCH_CUDA_ARCH_LIST": "native"})
    assert built is False and "TORCH_CUDA_ARCH_LIST" in said, said
    stopped, _ = _setup_use_cuda("12.8", False, {"KVPO_FORCE_CUDA": "1"})
    assert isinstance(stopped, SystemExit) and "TORCH_CUDA_ARCH_LIST" in str(stopped.code)
    assert _setup_use_cuda(
        "12.8", False, {"KVPO_FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "8.0"}
    ) == (True, "")


def _setup_hopper_arch_list(capabilities: list[tuple[int, int]], env: dict[str, str]) -> str | None:
    """TORCH_CUDA_ARCH_LIST after setup.py's _hopper_arch_list, under a stand-in torch whose
    visible GPUs have ``capabilities``, in environment ``env``."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    keep = [
        n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_hopper_arch_list"
    ]
    fake_torch = types.SimpleNamespace(
        cuda=types.SimpleNamespace(
            is_available=lambda: bool(capabilities),
            device_count=lambda: len(capabilities),
            get_device_capability=lambda i: capabilities[i],
        )
    )
    scope = {"os": os, "torch": fake_torch}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "setup.py", "exec"), scope)
    with mock.patch.dict(os.environ, env, clear=True):
        scope["_hopper_arch_list"]()
        return os.environ.get("TORCH_CUDA_ARCH_LIST")


def test_setup_compiles_visible_hopper_gpus_for_sm90a():
    """Visible H100s / H200s alone: 9.0a (the Hopper forward's wgmma and TMA need it); any other
    GPU among them, no GPU, or an explicit list: torch's own choice, untouched."""
    assert _setup_hopper_arch_list([(9, 0), (9, 0)], {}) == "9.0a"
    assert _setup_hopper_arch_list([(9, 0)], {"TORCH_CUDA_ARCH_LIST": "native"}) == "9.0a"
    assert _setup_hopper_arch_list([(9, 0), (8, 0)], {}) is None
    assert _setup_hopper_arch_list([], {}) is None
    assert _setup_hopper_arch_list([(9, 0)], {"TORCH_CUDA_ARCH_LIST": "9.0"}) == "9.0"
