"""Pieces every streaming generator on kvpo's paged KV cache shares.

The built-in generator (:mod:`kvpo.generators.model`) and the adapters (:mod:`kvpo.generators`) build on the
same cache, the same chunk attention over it, the same frame <-> token patching and the same
shifted few-step schedule, so a page, a row and a table mean one thing everywhere.
"""

from __future__ import annotations

import torch

from kvpo_kernels import routed_attention


class PagedKVCache:
    """Per-layer K/V pages ``[capacity, Hkv, frame_tokens, head_dim]`` and a bump allocator."""

    def __init__(
        self,
        layers: int,
        capacity: int,
        kv_heads: int,
        page_size: int,
        head_dim: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (capacity, kv_heads, page_size, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.capacity = capacity
        self.used = 0

    def allocate(self, n: int) -> torch.Tensor:
        """Ids [n] int64 of ``n`` fresh pages (a RuntimeError when the cache is full)."""
        if self.used + n > self.capacity:
            raise RuntimeError(f"KV cache full: {self.used} + {n} pages > capacity {self.capacity}")
        ids = torch.arange(self.used, self.used + n)
        self.used += n
        return ids

    def nbytes(self) -> int:
        """Bytes of every layer's K and V pages (allocated, used or not)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def chunk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    chunk_frames: int,
    table: torch.Tensor,
    cache: PagedKVCache | None = None,
    layer: int = 0,
    slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of R chunk rows over paged K/V, one page per frame.

    Args:
        q: [R, H, c*T, D] queries of the rows' ``c = chunk_frames`` frames of T tokens.
        k, v: [R, c*T, Hkv, D] the rows' own keys and values.
        table: [R, N] int32 pages each row attends to (see
            :meth:`kvpo.generators.interface.StreamingVideoGenerator.forward`): without ``cache`` the pages
            are the rows' own (row r, frame f is page ``r * c + f``), with it cache page ids.
        cache, layer, slots: the rows' K/V are written to ``cache`` pages ``slots`` ([R, c]
            int64) of ``layer`` first, and the attention reads the cache.

    Returns:
        [R, H, c*T, D] in the dtype of q.
    """
    R, L, Hkv, D = k.shape
    T = L // chunk_frames
    k_pages = k.reshape(R * chunk_frames, T, Hkv, D).transpose(1, 2)
    v_pages = v.reshape(R * chunk_frames, T, Hkv, D).transpose(1, 2)
    if cache is not None:
        cache.k[layer][slots.reshape(-1)] = k_pages.to(cache.k[layer].dtype)
        cache.v[layer][slots.reshape(-1)] = v_pages.to(cache.v[layer].dtype)
        k_pages, v_pages = cache.k[layer], cache.v[layer]
    out, _ = routed_attention(q.contiguous(), k_pages.contiguous(), v_pages.contiguous(), table)
    return out


def patchify(frames: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """[N, T, C, H, W] -> [N, T, (H/ph)(W/pw), C*ph*pw]: tokens row-major over the patch grid,
    features ordered (channel, row, column) as a Conv3d patch embedding flattens its kernel."""
    N, T, C, H, W = frames.shape
    x = frames.reshape(N, T, C, H // ph, ph, W // pw, pw).permute(0, 1, 3, 5, 2, 4, 6)
    return x.reshape(N, T, (H // ph) * (W // pw), C * ph * pw)


def unpatchify(
    tokens: torch.Tensor, channels: int, height: int, width: int, ph: int, pw: int
) -> torch.Tensor:
    """The inverse of :func:`patchify`: [N, T, (H/ph)(W/pw), C*ph*pw] -> [N, T, C, H, W]."""
    N, T = tokens.shape[:2]
    x = tokens.reshape(N, T, height // ph, width // pw, channels, ph, pw)
    return x.permute(0, 1, 4, 2, 5, 3, 6).reshape(N, T, channels, height, width)


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow-matching timestep shift ``shift * t / (1 + (shift - 1) t)`` (keeps 0 and 1; shift
    > 1 spends more of the steps at high noise)."""
    return shift * t / (1 + (shift - 1) * t)


def shifted_timesteps(steps: int, shift: float) -> torch.Tensor:
    """[steps + 1] from 1 to 0: uniform steps warped by :func:`shift_timesteps`."""
    return shift_timesteps(torch.linspace(1.0, 0.0, steps + 1), shift)
