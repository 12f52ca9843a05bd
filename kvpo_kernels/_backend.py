"""Backend selection for every kvpo op, in one place.

Backends:
  ``reference`` pure PyTorch (:mod:`kvpo_kernels.reference`), any device;
  ``cpu``       the C++ kernels of ``kvpo_kernels._C`` on CPU tensors;
  ``cuda``      the CUDA C++ kernels of ``kvpo_kernels._C`` on CUDA tensors (CUDA builds only);
  ``triton``    the Triton kernels: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``;
  ``auto``      CPU tensors -> ``cpu``; CUDA tensors -> the op's faster GPU backend where both
                exist (:data:`CUDA_PREFERENCE`), else the other, else ``reference``.

The choice comes, first match wins, from the op's ``backend=`` argument, the environment variable
``KVPO_<OP>_BACKEND`` (``KVPO_ROUTED_ATTENTION_BACKEND``, ``KVPO_VELOCITY_ENERGY_BACKEND``), the
environment variable ``KVPO_BACKEND``, and finally ``auto``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import torch

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")

# ``auto``'s order on CUDA tensors, per op, from the H200 suite (benchmarks/RESULTS.md): Triton's
# routed attention forward ran at 409 TFLOP/s against the CUDA C++ kernel's 246; for
# velocity_energy the kernels take the same GPU time, and a CUDA call costs half a Triton call
# (0.08 against 0.14 ms forward, 0.18 against 0.38 ms with the backward).
CUDA_PREFERENCE: dict[str, tuple[str, str]] = {
    "routed_attention": ("triton", "cuda"),
    "velocity_energy": ("cuda", "triton"),
}


def _probe_native() -> bool:
    """Registers the C++ kernels: those of ``kvpo_kernels._C``, or of the library that
    ``KVPO_NATIVE_LIBRARY`` names (CMake's ``libkvpo_ops.so``: a sanitizer or debug build)."""
    library = os.environ.get("KVPO_NATIVE_LIBRARY")
    if library:
        if not os.path.isfile(library):
            raise ImportError(f"KVPO_NATIVE_LIBRARY={library!r} is not a file")
        torch.ops.load_library(library)
        return True
    try:
        from . import _C  # noqa: F401
    except ImportError:
        return False
    return True


# Probed once at import: plain constants keep resolve() traceable by torch.compile.
_NATIVE = _probe_native()
_TRITON = importlib.util.find_spec("triton") is not None


def native_available() -> bool:
    """True when the compiled extension ``kvpo_kernels._C`` imports."""
    return _NATIVE


def _has_cuda_kernel(op: str) -> bool:
    return _NATIVE and torch._C._dispatch_has_kernel_for_dispatch_key(f"kvpo::{op}", "CUDA")


# The native ops' CUDA kernels, probed once at import like _NATIVE: resolve() asks on every call
# with CUDA tensors, and a dispatcher query inside it would break torch.compile(fullgraph=True).
_NATIVE_CUDA = {
    op: _has_cuda_kernel(op)
    for op in ("routed_attn_fwd", "routed_attn_bwd", "velocity_energy_fwd", "velocity_energy_bwd")
}


def native_cuda_available(op: str) -> bool:
    """True when the extension registered a CUDA kernel for the native op ``kvpo::<op>``."""
    return _NATIVE_CUDA[op] if op in _NATIVE_CUDA else _has_cuda_kernel(op)


def triton_available() -> bool:
    return _TRITON


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def requested(op: str, backend: str | None) -> str:
    """The backend asked for by argument or environment, before resolution of ``auto``."""
    choice = (
        backend
        or os.environ.get(f"KVPO_{op.upper()}_BACKEND")
        or os.environ.get("KVPO_BACKEND", "auto")
    )
    choice = choice.strip().lower()
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {choice!r} (op {op})")
    return choice


def resolve(
    op: str,
    device: torch.device,
    backend: str | None = None,
    native_op: str = "",
    dtype: torch.dtype = torch.float32,
) -> str:
    """Return the concrete backend that runs ``op`` on tensors of ``device`` and ``dtype``.

    ``native_op`` names the C++ op (``kvpo::<native_op>``) whose CUDA kernel ``cuda`` needs. The
    GPU kernels (Triton, CUDA) accumulate in float32, so ``auto`` sends float64 on CUDA to the
    reference, and asking them for float64 is an error rather than a silent loss of precision.
    """
    choice = requested(op, backend)
    native_op = native_op or op
    if choice == "auto":
        if device.type == "cpu":
            return "cpu" if native_available() else "reference"
        if device.type == "cuda" and dtype != torch.float64:
            available = {"triton": triton_available(), "cuda": native_cuda_available(native_op)}
            for name in CUDA_PREFERENCE.get(op, ("triton", "cuda")):
                if available[name]:
                    return name
        return "reference"
    if choice in ("triton", "cuda") and dtype == torch.float64:
        raise TypeError(
            f"{op}: backend {choice!r} supports float16, bfloat16 and float32 inputs, got float64 "
            "(use backend='cpu' or 'reference' for float64)"
        )
    if choice == "cpu":
        if device.type != "cpu":
            raise ValueError(f"{op}: backend 'cpu' needs CPU tensors, got device {device}")
        if not native_available():
            raise RuntimeError(
                f"{op}: backend 'cpu' needs the compiled extension kvpo_kernels._C; build it with "
                "`pip install --no-build-isolation -e .`"
            )
    elif choice == "cuda":
        if device.type != "cuda":
            raise ValueError(f"{op}: backend 'cuda' needs CUDA tensors, got device {device}")
        if not native_cuda_available(native_op):
            raise RuntimeError(
                f"{op}: backend 'cuda' needs kvpo_kernels._C built with CUDA (CUDA torch and nvcc)"
            )
    elif choice == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend 'triton' needs the triton package")
        if device.type != "cuda" and not (device.type == "cpu" and triton_interpreted()):
            raise ValueError(
                f"{op}: backend 'triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 "
                f"set before triton is imported; got device {device}"
            )
    return choice


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / statistics dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def first_order_only(op: str) -> Callable[..., None]:
    """An autograd formula for ``op``'s backward op that refuses to be differentiated: the ops
    give first-order gradients (as FlashAttention's do), and PyTorch's own error for a missing
    formula reads as if the caller should register one."""

    def backward(ctx: object, *grads: torch.Tensor) -> None:
        raise NotImplementedError(
            f"kvpo_kernels.{op} has first-order gradients only: differentiating its gradient "
            "(a double backward, create_graph=True through it, e.g. a gradient penalty) is not "
            "supported"
        )

    return backward
