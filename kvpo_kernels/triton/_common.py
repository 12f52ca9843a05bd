"""Small helpers shared by the Triton kernels."""

from __future__ import annotations

import functools
import os
import warnings
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


def resident_programs(n_regs: int, num_warps: int, regs_per_sm: int, warps_per_sm: int) -> int:
    """Programs of ``num_warps`` warps at ``n_regs`` registers per thread that one SM holds, by
    its register file (allocated per warp in units of 256) and its warp slots. For kernels without
    shared memory, as the CUDA occupancy calculator counts them."""
    per_warp = -(-max(n_regs, 1) * 32 // 256) * 256
    return max(1, min(regs_per_sm // (per_warp * num_warps), warps_per_sm // num_warps))


_RESIDENT: dict[tuple, int] = {}


def specialization(args: tuple) -> tuple:
    """What Triton's JIT compiles a kernel apart for, argument by argument: a tensor's dtype and
    16-byte alignment, an integer's being 1, a multiple of 16 or past int32. Two launches of one
    kernel with equal constexprs and equal specializations run the same binary (same registers);
    an odd row length, say, compiles without 16-byte loads and can take twice the registers."""
    spec = []
    for a in args:
        if isinstance(a, torch.Tensor):
            spec.append((a.dtype, a.data_ptr() % 16 == 0))
        elif isinstance(a, bool) or not isinstance(a, int):
            spec.append(type(a))
        else:
            spec.append((a == 1, a % 16 == 0, -(2**31) <= a < 2**31))
    return tuple(spec)


def programs_per_sm(launch: Launch, device: torch.device, default: int) -> int:
    """How many programs of ``launch``'s compiled kernel one SM of ``device`` holds, so that a
    grid can be sized to exactly one wave.

    The kernel is compiled (not run) the first time its binary is asked for, and the answer is
    cached under what picks that binary: kernel, constexprs, device and the arguments'
    :func:`specialization` (not the grid, which may be what the answer resizes). ``default`` off
    CUDA and under the interpreter, where nothing is built."""
    if interpreted() or device.type != "cuda":
        return default
    key = (launch.kernel, device, tuple(sorted(launch.meta.items())), specialization(launch.args))
    if key in _RESIDENT:
        return _RESIDENT[key]
    try:
        with torch.cuda.device(device):
            compiled = launch.jit_fn.warmup(*launch.args, grid=launch.grid, **launch.meta)
            compiled._init_handles()  # loads the binary, which is what reports its registers
            n_regs = int(compiled.n_regs)
    except (AttributeError, TypeError) as e:  # a Triton without these internals
        warnings.warn(
            f"Triton {triton.__version__} did not report {launch.jit_fn.__name__}'s registers "
            f"({type(e).__name__}: {e}); its grid assumes {default} programs per SM",
            stacklevel=2,
        )
        _RESIDENT[key] = default
        return default
    props = torch.cuda.get_device_properties(device)
    _RESIDENT[key] = resident_programs(
        n_regs,
        launch.meta["num_warps"],
        getattr(
            props, "regs_per_multiprocessor", 65536
        ),  # 64K on sm_50 to sm_90; not all torch have it
        props.max_threads_per_multi_processor // 32,
    )
    return _RESIDENT[key]


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
