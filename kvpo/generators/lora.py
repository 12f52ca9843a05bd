"""LoRA adapters: train a low-rank update of a generator's linear layers, everything else frozen.

The public KVPO recipe trains LoRA (rank 256) on the 1.3 B-parameter generator; the built-in one is
small enough to train in full, and takes adapters with the same code (``--lora_rank``).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    """``y = base(x) + (alpha / rank) * x A^T B^T`` with ``base`` frozen.

    ``A: [rank, in]`` starts random (Kaiming-uniform) and ``B: [out, rank]`` at zero, so an adapted
    layer starts as its base layer. The adapters are at least float32 whatever the base's dtype
    (a 16-bit base saves memory; AdamW on 16-bit adapters would lose small updates).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA rank must be a positive int, got {rank!r}")
        self.base = base.requires_grad_(False)
        self.rank = rank
        self.scale = (rank if alpha is None else alpha) / rank
        w = base.weight
        kw = dict(device=w.device, dtype=torch.promote_types(w.dtype, torch.float32))
        self.lora_a = nn.Parameter(torch.empty(rank, w.shape[1], **kw))
        self.lora_b = nn.Parameter(torch.zeros(w.shape[0], rank, **kw))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        delta = x.to(self.lora_a.dtype) @ self.lora_a.t() @ self.lora_b.t()
        return y + (delta * self.scale).to(y.dtype)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function (for deployment)."""
        out = nn.Linear(self.base.in_features, self.base.out_features, self.base.bias is not None)
        out.to(self.base.weight.device, self.base.weight.dtype)
        delta = self.scale * self.lora_b @ self.lora_a
        out.weight.copy_((self.base.weight.to(delta.dtype) + delta).to(out.weight.dtype))
        if self.base.bias is not None:
            out.bias.copy_(self.base.bias)
        return out


def add_lora(
    root: nn.Module, targets: tuple[str, ...], rank: int, alpha: float | None = None
) -> int:
    """Freeze every parameter of ``root`` and wrap its ``nn.Linear`` children named in ``targets``
    (e.g. ``("q", "kv", "proj")``; a child of an ``nn.Sequential`` is named by its index) in
    :class:`LoRALinear`. Returns how many layers were adapted."""
    root.requires_grad_(False)
    n = 0
    for module in list(root.modules()):
        for name, child in list(module.named_children()):
            if name in targets and type(child) is nn.Linear:
                setattr(module, name, LoRALinear(child, rank, alpha))
                n += 1
    if n == 0:
        raise ValueError(f"no nn.Linear named {targets} to adapt")
    return n


def merge_lora(root: nn.Module) -> int:
    """Fold every :class:`LoRALinear` under ``root`` into a plain ``nn.Linear``; returns how many."""
    n = 0
    for module in list(root.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
                n += 1
    return n
