"""The built-in generator: a small streaming AR flow-matching video transformer on a paged KV cache.

Every attention goes through :func:`kvpo_kernels.routed_attention`: one page is one frame, and a
row of the page table says which frames a chunk sees. Teacher forcing (pretraining, replay) and
streaming sampling (rollout) are the same forward; only the table and the cache differ.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kvpo.generators import data, lora
from kvpo.generators.context import recache_policy
from kvpo.generators.sampler import check_sampler
from kvpo.generators.streaming import (
    PagedKVCache,
    chunk_attention,
    patchify,
    shifted_timesteps,
    unpatchify,
)

__all__ = ["ModelConfig", "PagedKVCache", "TinyARVideo", "shifted_timesteps"]

LORA_TARGETS = ("q", "kv", "proj", "0", "2")  # attention q/kv/out and the MLP's two layers


@dataclass
class ModelConfig:
    frame_size: int = 24
    channels: int = 3
    patch: int = 4
    num_frames: int = 12
    chunk_frames: int = 2
    dim: int = 128
    depth: int = 4
    heads: int = 4
    kv_heads: int = 2
    mlp_ratio: float = 4.0
    sink_frames: int = 1
    local_window: int | None = None  # frames of context besides sinks (None = all)
    recache: str = (
        "none"  # KV re-cache at a prompt switch (kvpo.generators.context): longlive | chunkwise
    )
    global_sink: bool = True  # longlive re-cache: the sinks keep their first prompt's K/V
    sampler: str = (
        "euler"  # the few-step sampler it deploys (kvpo.generators.sampler): trained as an ODE
    )
    steps: int = 4
    shift: float = 2.0
    lora_rank: int = 0  # > 0: the blocks' linear layers carry LoRA adapters (base frozen)
    lora_alpha: float | None = None  # adapter scale alpha / rank (None: 1)

    def __post_init__(self) -> None:
        self.recache = recache_policy(self.recache, "ModelConfig.recache")
        for name in (
            "frame_size",
            "channels",
            "patch",
            "num_frames",
            "chunk_frames",
            "dim",
            "depth",
            "heads",
            "kv_heads",
        ):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.sink_frames < 0 or self.sink_frames >= self.num_frames:
            raise ValueError(
                f"ModelConfig.sink_frames={self.sink_frames} must be in [0, "
                f"num_frames={self.num_frames})"
            )
        if self.local_window is not None and self.local_window < 1:
            raise ValueError(
                f"ModelConfig.local_window={self.local_window} must be >= 1 or None (all history)"
            )
        if self.frame_size % self.patch:
            raise ValueError(
                f"frame_size={self.frame_size} must be a multiple of patch={self.patch}"
            )
        if self.num_frames % self.chunk_frames:
            raise ValueError(
                f"num_frames={self.num_frames} must be a multiple of chunk_frames={self.chunk_frames}"
            )
        if self.dim % self.heads or self.heads % self.kv_heads:
            raise ValueError(
                f"dim={self.dim} must divide by heads={self.heads}, heads by kv_heads={self.kv_heads}"
            )
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ValueError(f"lora_rank={self.lora_rank!r} must be an int >= 0")
        if self.steps < 1 or self.shift <= 0:
            raise ValueError(f"steps={self.steps} must be >= 1 and shift={self.shift} > 0")

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class TextEncoder(nn.Module):
    """Word-level prompt encoder: embeddings, one self-attention layer, mean pooling."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.words = ["<pad>", "<unk>", *data.vocabulary()]
        self.index = {w: i for i, w in enumerate(self.words)}
        self.embed = nn.Embedding(len(self.words), dim)
        self.pos = nn.Parameter(torch.randn(16, dim) * 0.02)
        self.layer = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True)
        self.out = nn.Linear(dim, dim)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [[self.index.get(w, 1) for w in p.lower().split()][:16] or [1] for p in prompts]
        n = max(len(i) for i in ids)
        tok = torch.zeros(len(ids), n, dtype=torch.long)
        for r, i in enumerate(ids):
            tok[r, : len(i)] = torch.tensor(i)
        return tok, tok == 0

    def forward(self, prompts: list[str]) -> torch.Tensor:
        tok, pad = self.tokenize(prompts)
        tok, pad = tok.to(self.pos.device), pad.to(self.pos.device)
        h = self.embed(tok) + self.pos[: tok.shape[1]]
        h = self.layer(h, src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return self.out((h * keep).sum(1) / keep.sum(1))


def sinusoid(x: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """[...] -> [..., dim] sinusoidal features of a scalar (timestep or frame index)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device) / half)
    ang = x.float()[..., None] * freqs
    return torch.cat([ang.cos(), ang.sin()], dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under autocast x is 16-bit and the (fp32 master) weight follows it.
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), 1e-6)


class Block(nn.Module):
    """adaLN-zero transformer block whose attention reads paged K/V through a page table."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.head_dim = cfg.dim // cfg.heads
        kv = cfg.kv_heads * self.head_dim
        self.norm1 = nn.LayerNorm(cfg.dim, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(cfg.dim, elementwise_affine=False)
        self.q = nn.Linear(cfg.dim, cfg.dim)
        self.kv = nn.Linear(cfg.dim, 2 * kv)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, cfg.dim)
        )
        self.mod = nn.Linear(cfg.dim, 6 * cfg.dim)
        nn.init.zeros_(self.mod.weight)
        nn.init.zeros_(self.mod.bias)

    def attention(
        self,
        h: torch.Tensor,
        table: torch.Tensor,
        cache: PagedKVCache | None,
        layer: int,
        slots: torch.Tensor | None,
    ) -> torch.Tensor:
        R, L, _ = h.shape
        q = self.q_norm(self.q(h).view(R, L, self.cfg.heads, self.head_dim)).transpose(1, 2)
        k, v = self.kv(h).view(R, L, 2, self.cfg.kv_heads, self.head_dim).unbind(2)
        k = self.k_norm(k)
        out = chunk_attention(q, k, v, self.cfg.chunk_frames, table, cache, layer, slots)
        return self.proj(out.transpose(1, 2).reshape(R, L, self.cfg.dim))

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        table: torch.Tensor,
        cache: PagedKVCache | None,
        layer: int,
        slots: torch.Tensor | None,
    ) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.mod(c)[:, None].chunk(6, dim=-1)
        h = self.norm1(x) * (1 + scale1) + shift1
        x = x + gate1 * self.attention(h, table, cache, layer, slots)
        h = self.norm2(x) * (1 + scale2) + shift2
        return x + gate2 * self.mlp(h)


class TinyARVideo(nn.Module):
    """A few-M-parameter streaming AR video generator (see :class:`kvpo.generators.interface.StreamingVideoGenerator`)."""

    def __init__(self, cfg: ModelConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or ModelConfig()
        self.num_frames = cfg.num_frames
        self.chunk_frames = cfg.chunk_frames
        self.frame_tokens = (cfg.frame_size // cfg.patch) ** 2
        self.token_dim = cfg.channels * cfg.patch**2
        self.sink_frames = cfg.sink_frames
        self.local_window = cfg.local_window
        self.recache = cfg.recache
        self.global_sink = cfg.global_sink
        self.sampler = check_sampler(cfg.sampler, "ModelConfig.sampler")
        self.grad_checkpointing = False  # recompute each block in backward (teacher forcing)
        self.text = TextEncoder(cfg.dim)
        self.embed = nn.Linear(self.token_dim, cfg.dim)
        self.spatial = nn.Parameter(torch.randn(self.frame_tokens, cfg.dim) * 0.02)
        self.t_mlp = nn.Sequential(
            nn.Linear(cfg.dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim)
        )
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(cfg.dim, elementwise_affine=False)
        self.final_mod = nn.Linear(cfg.dim, 2 * cfg.dim)
        self.head = nn.Linear(cfg.dim, self.token_dim)
        for m in (self.final_mod, self.head):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        if cfg.lora_rank:
            self._attach_lora(cfg.lora_rank, cfg.lora_alpha)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        return self.text(list(prompts))

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        frame_index: torch.Tensor,
        table: torch.Tensor,
        cache: PagedKVCache | None = None,
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity [R, chunk_frames * frame_tokens, token_dim] of R rows; the arguments are
        those of :meth:`kvpo.generators.interface.StreamingVideoGenerator.forward` (``x`` row states,
        ``t`` [R] timesteps, ``cond`` prompt conditioning, ``frame_index`` [R, chunk_frames],
        ``table`` [R, N] int32 pages, ``cache`` and ``slots`` where the chunk's K/V go)."""
        cfg = self.cfg
        R, L, _ = x.shape
        if L != cfg.chunk_frames * self.frame_tokens or x.shape[-1] != self.token_dim:
            raise ValueError(
                f"x must be [R, {cfg.chunk_frames * self.frame_tokens}, {self.token_dim}], got "
                f"{tuple(x.shape)}"
            )
        if (cache is None) != (slots is None):
            raise ValueError("cache and slots must be given together")
        pos = sinusoid(frame_index, cfg.dim)[:, :, None, :] + self.spatial  # [R, c, T, dim]
        h = self.embed(x) + pos.reshape(R, L, cfg.dim)
        c = F.silu(self.t_mlp(sinusoid(t * 1000.0, cfg.dim)) + cond)
        remat = self.grad_checkpointing and torch.is_grad_enabled() and cache is None
        for layer, block in enumerate(self.blocks):
            if remat:  # keep only block inputs; the replay's activations are recomputed
                h = checkpoint(block, h, c, table, None, layer, None, use_reentrant=False)
            else:
                h = block(h, c, table, cache, layer, slots)
        shift, scale = self.final_mod(c)[:, None].chunk(2, dim=-1)
        return self.head(self.final_norm(h) * (1 + scale) + shift)

    def new_cache(self, capacity: int, device: torch.device | str = "cpu") -> PagedKVCache:
        """Pages in the weights' dtype, or in autocast's 16-bit dtype when it is on (the keys and
        values the layers make then, and what attention must read beside 16-bit queries)."""
        cfg = self.cfg
        kind = torch.device(device).type
        dtype = self.head.weight.dtype
        if torch.is_autocast_enabled(kind):
            dtype = torch.get_autocast_dtype(kind)
        return PagedKVCache(
            cfg.depth,
            capacity,
            cfg.kv_heads,
            self.frame_tokens,
            cfg.dim // cfg.heads,
            device,
            dtype,
        )

    def to_tokens(self, video: torch.Tensor) -> torch.Tensor:
        """[N, F, C, H, W] video in [-1, 1] -> [N, F, frame_tokens, token_dim] tokens."""
        return patchify(video, self.cfg.patch, self.cfg.patch)

    def to_video(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, F, frame_tokens, token_dim] tokens -> [N, F, C, H, W] video in [-1, 1]."""
        cfg = self.cfg
        return unpatchify(
            tokens, cfg.channels, cfg.frame_size, cfg.frame_size, cfg.patch, cfg.patch
        )

    def timesteps(self) -> torch.Tensor:
        """[steps + 1] float32 noise levels of the few-step schedule, from 1 down to 0 (shifted)."""
        return shifted_timesteps(self.cfg.steps, self.cfg.shift)

    def set_local_window(self, frames: int | None) -> None:
        """Attend to the sinks and the last ``frames`` history frames (None: all history), in
        sampling, teacher forcing and the saved config alike."""
        self.local_window = self.cfg.local_window = frames

    def set_recache(self, policy: str | bool) -> None:
        """KV re-cache at prompt switches by ``policy`` (:mod:`kvpo.generators.context`; True: longlive), in
        sampling, teacher forcing and the saved config alike."""
        self.recache = self.cfg.recache = recache_policy(policy)

    def set_global_sink(self, on: bool) -> None:
        """Whether a longlive re-cache keeps the sinks' first K/V (:mod:`kvpo.generators.context`)."""
        self.global_sink = self.cfg.global_sink = bool(on)

    def set_sampler(self, kind: str) -> None:
        """Deploy the few-step sampler ``kind`` (:mod:`kvpo.generators.sampler`), in sampling, rollouts and
        the saved config alike."""
        self.sampler = self.cfg.sampler = check_sampler(kind)

    def add_lora(self, rank: int, alpha: float | None = None) -> None:
        """Freeze the model and give the attention and MLP layers of every block LoRA adapters
        of ``rank`` (saved with the model; :meth:`merge_lora` folds them back)."""
        if self.cfg.lora_rank:
            raise ValueError(f"the model already has LoRA adapters of rank {self.cfg.lora_rank}")
        self._attach_lora(rank, alpha)
        self.cfg.lora_rank, self.cfg.lora_alpha = rank, alpha

    def _attach_lora(self, rank: int, alpha: float | None) -> None:
        self.requires_grad_(False)  # before wrapping: the new adapters stay trainable
        lora.add_lora(self.blocks, LORA_TARGETS, rank, alpha)

    def merge_lora(self) -> None:
        """Fold the LoRA adapters into plain linear layers (same function, no adapters)."""
        lora.merge_lora(self)
        self.cfg.lora_rank, self.cfg.lora_alpha = 0, None

    def config_dict(self) -> dict:
        return asdict(self.cfg)
