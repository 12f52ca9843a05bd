"""Backend selection for every kvpo op, in one place.

Backends:
  ``reference`` pure PyTorch (:mod:`kvpo_kernels.reference`), any device;
  ``cpu``       the C++ kernels of ``kvpo_kernels._C`` on CPU tensors;
  ``cuda``      the CUDA C++ kernels of ``kvpo_kernels._C`` on CUDA tensors (CUDA builds only);
  ``triton``    the Triton kernels: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``;
  ``triton_tma`` routed_attention only: Triton kernels with TMA loads and flat loops
                (Hopper and data-centre Blackwell: compute capability 9.x and 10.x, whose SMs
                hold the forward's 160 KB of shared memory);
  ``auto``      CPU tensors -> ``cpu``; CUDA tensors -> per op and direction (forward,
                backward) the GPU backend measured fastest (:data:`CUDA_PREFERENCE`) among those
                built, else ``reference``.

The choice comes, first match wins, from the op's ``backend=`` argument, the environment variable
``KVPO_<OP>_BACKEND`` (``KVPO_ROUTED_ATTENTION_BACKEND``, ``KVPO_VELOCITY_ENERGY_BACKEND``), the
environment variable ``KVPO_BACKEND``, and finally ``auto``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import torch

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton", "triton_tma")
DIRECTIONS = ("forward", "backward")

# ``auto``'s order on CUDA tensors, per (op, direction), each from the measurement named beside
# it (benchmarks/RESULTS.md). A backend absent from a row has not been measured in that direction
# and is never picked by ``auto``: name it with ``backend=``.
CUDA_PREFERENCE: dict[tuple[str, str], tuple[str, ...]] = {
    # H200 suite, 2026-11-26: Triton forward 409 TFLOP/s, CUDA C++ (mma.sync) 246
    ("routed_attention", "forward"): ("triton", "cuda"),
    # H200 suite: only the Triton backward existed (the CUDA C++ backward is unmeasured)
    ("routed_attention", "backward"): ("triton",),
    # H200 suite: equal GPU time; a CUDA call costs half a Triton call (0.08 vs 0.14 ms forward,
    # 0.18 vs 0.38 ms with the backward)
    ("velocity_energy", "forward"): ("cuda", "triton"),
    ("velocity_energy", "backward"): ("cuda", "triton"),
}
# The ops a backend is limited to.
ONLY_FOR = {"triton_tma": ("routed_attention",)}


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
    """The backend asked for by argument or environment, before resolution of ``auto``. A
    global ``KVPO_BACKEND`` naming an op's variant (``triton_tma``) gives the other ops its
    family (``triton``); named for the op itself, a backend it lacks is an error."""
    own = backend or os.environ.get(f"KVPO_{op.upper()}_BACKEND")
    choice = (own or os.environ.get("KVPO_BACKEND", "auto")).strip().lower()
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {choice!r} (op {op})")
    if op not in ONLY_FOR.get(choice, (op,)):
        if own:
            raise ValueError(f"backend {choice!r} serves {ONLY_FOR[choice]} only, not {op}")
        choice = "triton"
    return choice


def resolve(
    op: str,
    device: torch.device,
    backend: str | None = None,
    native_op: str = "",
    dtype: torch.dtype = torch.float32,
    direction: str = "forward",
) -> str:
    """Return the concrete backend that runs ``op``'s ``direction`` (``forward`` or
    ``backward``) on tensors of ``device`` and ``dtype``.

    ``native_op`` names the C++ op (``kvpo::<native_op>``) whose CUDA kernel ``cuda`` needs. The
    GPU kernels (Triton, CUDA) accumulate in float32, so ``auto`` sends float64 on CUDA to the
    reference, and asking them for float64 is an error rather than a silent loss of precision.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    choice = requested(op, backend)
    native_op = native_op or op
    if choice == "auto":
        if device.type == "cpu":
            return "cpu" if native_available() else "reference"
        if device.type == "cuda" and dtype != torch.float64:
            available = {
                "triton": triton_available,
                "triton_tma": lambda: triton_available() and _tma_capable(device),
                "cuda": lambda: native_cuda_available(native_op),
            }
            for name in CUDA_PREFERENCE.get((op, direction), ("triton", "cuda")):
                if available[name]():
                    return name
        return "reference"
    if choice in ("triton", "triton_tma", "cuda") and dtype == torch.float64:
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
    elif choice in ("triton", "triton_tma"):
        if not triton_available():
            raise RuntimeError(f"{op}: backend {choice!r} needs the triton package")
        if device.type != "cuda" and not (device.type == "cpu" and triton_interpreted()):
            raise ValueError(
                f"{op}: backend {choice!r} needs CUDA tensors, or CPU tensors with "
                f"TRITON_INTERPRET=1 set before triton is imported; got device {device}"
            )
        if choice == "triton_tma" and device.type == "cuda" and not _tma_capable(device):
            raise ValueError(
                f"{op}: backend 'triton_tma' needs a GPU of compute capability 9.x or 10.x (TMA "
                f"and 160 KB of shared memory per block), got {torch.cuda.get_device_name(device)}"
                f" ({'.'.join(map(str, torch.cuda.get_device_capability(device)))}); use "
                "backend='triton'"
            )
    return choice


# Compute capabilities (major) whose GPUs run triton_tma: Hopper and data-centre Blackwell (the
# RTX Blackwells' 99 KB of shared memory per block do not hold its tiles).
TMA_MAJORS = (9, 10)


def _tma_capable(device: torch.device) -> bool:
    """Whether ``device`` runs the triton_tma kernels (:data:`TMA_MAJORS`)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] in TMA_MAJORS


def deterministic(requested: bool | None) -> bool:
    """Whether a backward must give the same bits on every run: ``requested``, else the
    environment variable ``KVPO_DETERMINISTIC`` (default on; ``0`` turns it off); always on
    under ``torch.use_deterministic_algorithms(True)``."""
    if requested is not None and not isinstance(requested, bool):
        raise TypeError(f"deterministic must be a bool or None, got {requested!r}")
    if torch.are_deterministic_algorithms_enabled():
        return True
    if requested is not None:
        return requested
    value = os.environ.get("KVPO_DETERMINISTIC", "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"KVPO_DETERMINISTIC must be 0 or 1, got {value!r}")
    return value == "1"


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
