"""Small helpers shared by the Triton kernels."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import triton
from triton.runtime.autotuner import Autotuner


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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
