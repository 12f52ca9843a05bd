"""Example user rewards for ``--reward_fns`` (README, "Rewards").

    python -m kvpo.train --reward_fns colorful=examples/rewards.py:colorfulness \
        --reward_weights alignment=1,path=1,colorful=0.5

A reward is any callable ``fn(videos, prompts) -> [B]`` with ``videos: [B, T, C, H, W]`` float in
[0, 1] (RGB) and one prompt per video; or a class whose instances are, constructed once with no
arguments (where a real reward model would load its weights from local disk and pick a device).
"""

from __future__ import annotations

import torch


def colorfulness(videos: torch.Tensor, prompts: list) -> torch.Tensor:
    """Hasler and Suesstrunk's colourfulness, per frame then averaged over the video, scaled to
    about [0, 1]: ``sqrt(std(rg)^2 + std(yb)^2) + 0.3 sqrt(mean(rg)^2 + mean(yb)^2)`` with
    ``rg = R - G`` and ``yb = (R + G) / 2 - B`` over a frame's pixels. [B] float32."""
    r, g, b = videos.float().unbind(2)  # [B, T, H, W] each
    rg, yb = r - g, (r + g) / 2 - b
    std = (rg.flatten(2).var(2, unbiased=False) + yb.flatten(2).var(2, unbiased=False)).sqrt()
    mean = (rg.flatten(2).mean(2) ** 2 + yb.flatten(2).mean(2) ** 2).sqrt()
    return (std + 0.3 * mean).mean(1)


class Contrast:
    """RMS contrast of each frame's luma, averaged over the video; a class, to show the form a
    reward model with weights takes (``__init__`` runs once per process)."""

    def __init__(self) -> None:
        self.luma = torch.tensor([0.299, 0.587, 0.114])

    @torch.no_grad()
    def __call__(self, videos: torch.Tensor, prompts: list) -> torch.Tensor:
        y = torch.einsum("btchw,c->bthw", videos.float(), self.luma.to(videos.device))
        return y.flatten(2).std(2, unbiased=False).mean(1)
