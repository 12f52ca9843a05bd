"""Exponential moving average of a policy's weights (the public recipe deploys the EMA)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ParamEMA:
    """``ema = decay * ema + (1 - decay) * param`` after every optimizer step; buffers are copied.

    The policy's frozen parameters (a LoRA run's whole base model) never change, so their average
    is themselves: the EMA shares those tensors with the policy instead of copying them.

    Args:
        model: the policy; the EMA starts as a frozen copy of it (or of ``init``, a model of the
            same architecture, e.g. the EMA saved in a checkpoint that training resumes from).
        decay: in [0, 1); the EMA averages over about ``1 / (1 - decay)`` steps.
    """

    def __init__(self, model: nn.Module, decay: float, init: nn.Module | None = None) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        src = model if init is None else init
        frozen = zip(src.parameters(), model.parameters(), strict=True)
        shared = {id(q): p for q, p in frozen if not p.requires_grad}
        self.model = copy.deepcopy(src, shared).requires_grad_(False).eval()
        self.model.to(next(model.parameters()).device)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """``ema = decay * ema + (1 - decay) * model``, parameter by parameter, in place."""
        for e, p in zip(self.model.parameters(), model.parameters(), strict=True):
            if e is not p:  # shared frozen parameters are their own average
                e.lerp_(p.detach().to(e.dtype), 1.0 - self.decay)
        for e, b in zip(self.model.buffers(), model.buffers(), strict=True):
            e.copy_(b)
