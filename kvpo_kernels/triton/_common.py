"""Small helpers shared by the Triton kernels."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from triton.runtime.autotuner import Autotuner


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _probe_loop(X, n):
    acc = 0.0
    for j in range(0, n):
        acc += tl.load(X + j)
    tl.store(X, acc)


@functools.cache
def interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run the kernels here, or None when it can.

    Triton 3.6's interpreter turns a scalar argument used as a loop bound into a Python int with
    ``int()`` of a one-element array, which NumPy 2.4 refuses; the kernels' page loops then stop
    with an opaque InterpreterError. Probed once with a loop of the same form."""
    x = torch.arange(4, dtype=torch.float32)
    try:
        _probe_loop[(1,)](x, 4)
    except Exception as e:  # the interpreter's own failure, whatever its type
        import numpy

        return (
            f"Triton {triton.__version__}'s interpreter cannot run a loop over a scalar argument "
            f"with NumPy {numpy.__version__} ({type(e).__name__}: {e}); install numpy<2.4 or "
            "triton>=3.8 to run the Triton kernels under TRITON_INTERPRET=1"
        )
    if float(x[0]) != 6.0:
        return (
            f"Triton {triton.__version__}'s interpreter computed a wrong sum ({float(x[0])} != 6)"
        )
    return None


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


@dataclass
class Launch:
    """One kernel launch, built by the op wrappers before it runs.

    Calling it runs the kernel. :mod:`kvpo_kernels.triton.aot` compiles the same launch for a GPU
    this machine may not have, so what CI checks is exactly what the wrappers launch.
    """

    kernel: Any  # triton.JITFunction, or an Autotuner around one
    grid: tuple[int, ...] | Callable[[dict], tuple[int, ...]]
    args: tuple
    meta: dict[str, Any]  # constexpr arguments and launch options (num_warps, num_stages)

    def __call__(self) -> None:
        if interpreted() and (problem := interpreter_problem()) is not None:
            raise RuntimeError(problem)
        self.kernel[self.grid](*self.args, **self.meta)

    @property
    def jit_fn(self) -> triton.JITFunction:
        return self.kernel.fn if isinstance(self.kernel, Autotuner) else self.kernel

    def variants(self) -> list[dict[str, Any]]:
        """Every full set of constexprs and options this launch may compile: the autotuner's
        candidates left after its pruning, or the one fixed choice."""
        if not isinstance(self.kernel, Autotuner):
            return [dict(self.meta)]
        configs = self.kernel.configs
        prune = self.kernel.early_config_prune
        if prune is not None:
            configs = prune(
                configs, dict(zip(self.kernel.arg_names, self.args, strict=False)), **self.meta
            )
        return [
            {**self.meta, **c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
            for c in configs
        ]
