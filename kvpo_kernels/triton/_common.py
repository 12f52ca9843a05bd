"""Small helpers shared by the Triton kernels."""

from __future__ import annotations

import os

import torch
import triton


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))
