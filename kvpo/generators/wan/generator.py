"""Wan2.1 as a streaming generator: a diffusers ``WanTransformer3DModel`` run chunk by chunk.

Self-Forcing, CausVid and LongLive turn Wan2.1-T2V-1.3B into a chunk-wise autoregressive
generator: each chunk of latent frames is denoised in a few steps attending to the clean K/V of
earlier frames. :class:`WanStreamingGenerator` runs the transformer that way over kvpo's paged KV
cache (one page per latent frame, 1560 tokens at 480x832), which is what KVPO's routing needs:
every self-attention goes through :func:`kvpo_kernels.routed_attention`, so each branch's page
table decides which history frames it sees. Everything else (patch embedding, timestep and text
conditioning, modulation, cross-attention, feed-forward, output head) is the transformer's own
code and weights, so a checkpoint in diffusers' layout (``WanTransformer3DModel.from_pretrained``,
or Self-Forcing's weights converted to it) loads unchanged.

Tokens are the latents patchified (``C * ph * pw`` features, 64 for Wan2.1's 16 channels and 2x2
patches); rows carry one timestep for their whole chunk (Self-Forcing's block-wise schedule).
``tests/trainer/test_wan.py`` checks the adapter against the transformer's own forward: a single
chunk over all frames equals its bidirectional forward, and streaming with the cache equals its
forward over ``[clean history, noisy chunk]`` with per-token timesteps and a block-causal mask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kvpo.generators import lora
from kvpo.generators.context import recache_policy
from kvpo.generators.sampler import check_sampler
from kvpo.generators.streaming import (
    PagedKVCache,
    chunk_attention,
    patchify,
    shift_timesteps,
    unpatchify,
)

# --wan_dtype: the transformer's weights
WAN_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Linear layers of a Wan block that LoRA adapts (WanStreamingGenerator.add_lora): self- and
# cross-attention projections (to_out[0] is child "0"), feed-forward in ("proj") and out ("2").
WAN_LORA_TARGETS = ("to_q", "to_k", "to_v", "0", "proj", "2")


class _Shared:
    """A callable every copy of the generator shares (the policy, its frozen reference, the EMA):
    the text encoder and the VAE are not trained, so they are neither parameters of the module
    (``nn.Module`` attributes would be) nor duplicated by ``copy.deepcopy``."""

    def __init__(self, fn: Callable[..., torch.Tensor] | None) -> None:
        self.fn = fn

    def __deepcopy__(self, memo: dict) -> _Shared:
        return self

    def __call__(self, *args: torch.Tensor | list[str]) -> torch.Tensor:
        return self.fn(*args)


@dataclass
class _Rows:
    """What a forward's self-attentions need beside the hidden states: the rows' rotary angles
    and where their K/V go. Passed through each block as its ``rotary_emb`` argument, which the
    block hands untouched to its self-attention, so a checkpointed block recomputes with the
    same context."""

    cos: torch.Tensor  # [R, L, 1, head_dim]
    sin: torch.Tensor
    chunk_frames: int
    table: torch.Tensor
    cache: PagedKVCache | None
    layer: int
    slots: torch.Tensor | None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on interleaved pairs: x [R, L, H, D], cos/sin [R, L, 1, D] (each
    angle repeated for its pair)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2).type_as(x)


class RoutedSelfAttention:
    """Processor of a Wan block's self-attention (``attn1``): q/k/v with the block's own
    projections and RMS norms, rotary angles of the rows' absolute frames, then attention over the
    paged cache through the rows' page table (:func:`kvpo.generators.streaming.chunk_attention`)."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: _Rows | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        rows = rotary_emb
        if not isinstance(rows, _Rows):
            raise TypeError(
                "RoutedSelfAttention runs inside WanStreamingGenerator.forward only (the block "
                f"must receive the rows' context as rotary_emb, got {type(rows).__name__})"
            )
        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q = _rotate(attn.norm_q(q).unflatten(2, (attn.heads, -1)), rows.cos, rows.sin)
        k = _rotate(attn.norm_k(k).unflatten(2, (attn.heads, -1)), rows.cos, rows.sin)
        v = v.unflatten(2, (attn.heads, -1))
        out = chunk_attention(
            q.transpose(1, 2),
            k,
            v,
            rows.chunk_frames,
            rows.table,
            rows.cache,
            rows.layer,
            rows.slots,
        )
        out = out.transpose(1, 2).flatten(2).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


class WanStreamingGenerator(nn.Module):
    """A :class:`kvpo.generators.interface.StreamingVideoGenerator` around a diffusers
    ``WanTransformer3DModel`` (text-to-video: no image conditioning).

    Args:
        transformer: the ``WanTransformer3DModel`` (its temporal patch must be 1: a latent frame is
            a page). Its self-attention processors are replaced by :class:`RoutedSelfAttention`.
        text_encoder: ``prompts -> [N, L, text_dim]`` embeddings (Wan: UMT5-XXL's last hidden
            states, 512 tokens of 4096), computed without gradient. It, ``decode`` and
            ``encode`` are shared by the copies the trainer makes and are not parameters: not
            trained, not checkpointed, not moved by ``.to()``.
        latent_shape: ``(C, h, w)`` of one latent frame (Wan2.1 at 480x832: ``(16, 60, 104)``).
        num_frames: latent frames per video (21 in Self-Forcing); a multiple of ``chunk_frames``.
        chunk_frames: latent frames denoised together (3 in Self-Forcing).
        sink_frames, local_window: attention sinks and the local window in frames (LongLive: 3
            and 12; None = all history).
        steps: denoising timesteps in (0, 1], first 1 (Self-Forcing's [1000, 750, 500, 250] / 1000);
            ``shift`` warps them by :func:`kvpo.generators.streaming.shift_timesteps`.
        decode: latents ``[N, T, C, h, w]`` -> video ``[N, T', 3, H, W]`` in [-1, 1] (the Wan VAE,
            its latent normalization undone), for rewards and samples; without it
            :meth:`to_video` returns the latents.
        encode: video ``[N, T', 3, H, W]`` in [-1, 1] -> latents, the inverse (pretraining data).
        temporal_stride: video frames per latent frame of ``decode`` (4 for Wan's causal VAE:
            latent frame 0 is video frame 0, latent frame f > 0 is frames 4f-3 .. 4f).
        recache: KV re-cache at prompt switches (:mod:`kvpo.generators.context`): ``longlive`` (or True),
            ``chunkwise``, ``none`` (or False).
        global_sink: a ``longlive`` re-cache keeps the sinks' first K/V (LongLive's default).
        sampler: the few-step sampler it deploys (:mod:`kvpo.generators.sampler`): ``renoise``, the one
            Self-Forcing, CausVid and LongLive were distilled with (``euler`` for a Wan model
            trained as a flow).
    """

    def __init__(
        self,
        transformer: nn.Module,
        text_encoder: Callable[[list[str]], torch.Tensor],
        latent_shape: tuple[int, int, int],
        num_frames: int,
        chunk_frames: int = 3,
        sink_frames: int = 0,
        local_window: int | None = None,
        steps: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25),
        shift: float = 5.0,
        decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
        encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
        temporal_stride: int = 1,
        recache: str | bool = "none",
        global_sink: bool = True,
        sampler: str = "renoise",
    ) -> None:
        super().__init__()
        if not all(
            hasattr(transformer, a) for a in ("rope", "condition_embedder", "blocks")
        ) or not hasattr(transformer.rope, "freqs_cos"):
            raise TypeError(
                f"transformer must be a diffusers WanTransformer3DModel (diffusers >= 0.42), got "
                f"{type(transformer).__name__}"
            )
        cfg = transformer.config
        pt, ph, pw = cfg.patch_size
        C, h, w = latent_shape
        if pt != 1:
            raise ValueError(
                f"transformer.config.patch_size {tuple(cfg.patch_size)}: the temporal "
                "patch must be 1 (one latent frame per KV page)"
            )
        if C != cfg.in_channels or h % ph or w % pw:
            raise ValueError(
                f"latent_shape {tuple(latent_shape)} must have in_channels={cfg.in_channels} "
                f"channels and a height and width divisible by the patch {ph}x{pw}"
            )
        if cfg.out_channels not in (None, cfg.in_channels):
            raise ValueError(
                f"out_channels {cfg.out_channels} != in_channels {cfg.in_channels}: "
                "the velocity must live in the latent space"
            )
        if num_frames <= 0 or chunk_frames <= 0 or num_frames % chunk_frames:
            raise ValueError(
                f"num_frames={num_frames} must be a positive multiple of chunk_frames={chunk_frames}"
            )
        if num_frames > transformer.rope.max_seq_len:
            raise ValueError(
                f"num_frames={num_frames} exceeds the rotary table's {transformer.rope.max_seq_len}"
            )
        st = torch.tensor(steps, dtype=torch.float64)
        if st.ndim != 1 or len(st) == 0 or st[0] != 1 or (st <= 0).any() or (st.diff() >= 0).any():
            raise ValueError(f"steps {steps} must decrease from 1 and stay above 0")
        if temporal_stride < 1:
            raise ValueError(f"temporal_stride must be >= 1, got {temporal_stride}")
        self.transformer = transformer
        self.text_encoder = _Shared(text_encoder)
        self.latent_shape = (C, h, w)
        self.patch = (ph, pw)
        self.num_frames = num_frames
        self.chunk_frames = chunk_frames
        self.frame_tokens = (h // ph) * (w // pw)
        self.token_dim = C * ph * pw
        self.sink_frames = sink_frames
        self.local_window = local_window
        self.recache = recache_policy(recache)
        self.global_sink = bool(global_sink)
        self.sampler = check_sampler(sampler)
        self.grad_checkpointing = False
        self.steps, self.shift = st, float(shift)
        self.decode, self.encode = _Shared(decode), _Shared(encode)
        self.temporal_stride = temporal_stride
        for block in transformer.blocks:
            block.attn1.set_processor(RoutedSelfAttention())

    # -- the protocol ---------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """[N, L, text_dim] text embeddings (the transformer projects them in :meth:`forward`)."""
        emb = self.text_encoder(list(prompts))
        text_dim = self.transformer.config.text_dim
        if (
            not torch.is_tensor(emb)
            or emb.ndim != 3
            or emb.shape[0] != len(prompts)
            or emb.shape[-1] != text_dim
        ):
            raise ValueError(
                f"text_encoder must return [{len(prompts)}, L, {text_dim}] embeddings, got "
                f"{tuple(emb.shape) if torch.is_tensor(emb) else type(emb).__name__}"
            )
        return emb.to(self._param().device)

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
        """Velocity of R rows (see :meth:`kvpo.generators.interface.StreamingVideoGenerator.forward`);
        ``cond``: [R, L, text_dim] text embeddings of each row."""
        R, L, _ = x.shape
        c = self.chunk_frames
        if L != c * self.frame_tokens or x.shape[-1] != self.token_dim:
            raise ValueError(
                f"x must be [R, {c * self.frame_tokens}, {self.token_dim}], got {tuple(x.shape)}"
            )
        if (cache is None) != (slots is None):
            raise ValueError("cache and slots must be given together")
        tf = self.transformer
        dtype = self._param().dtype
        emb = tf.patch_embedding
        h = nn.functional.linear(x.to(dtype), emb.weight.flatten(1), emb.bias)
        temb, proj, text, _ = tf.condition_embedder(t * 1000.0, cond.to(dtype), None)
        proj = proj.unflatten(1, (6, -1))
        cos, sin = self._rotary(frame_index)
        remat = self.grad_checkpointing and torch.is_grad_enabled() and cache is None
        for layer, block in enumerate(tf.blocks):
            rows = _Rows(cos, sin, c, table, cache, layer, slots)
            if remat:  # keep the block inputs only; replay recomputes the activations
                h = checkpoint(block, h, text, proj, rows, use_reentrant=False)
            else:
                h = block(h, text, proj, rows)
        shift, scale = (tf.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        h = (tf.norm_out(h.float()) * (1 + scale) + shift).type_as(h)
        out = tf.proj_out(h)  # features ordered (row, column, channel) of each patch
        ph, pw = self.patch
        out = out.unflatten(-1, (ph, pw, -1)).permute(0, 1, 4, 2, 3).flatten(2)
        return out.to(x.dtype)

    def new_cache(self, capacity: int, device: torch.device | str = "cpu") -> PagedKVCache:
        """Pages in the weights' dtype, or in autocast's 16-bit dtype when it is on."""
        kind = torch.device(device).type
        dtype = self._param().dtype
        if torch.is_autocast_enabled(kind):
            dtype = torch.get_autocast_dtype(kind)
        heads = self.transformer.config.num_attention_heads
        head_dim = self.transformer.config.attention_head_dim
        layers = len(self.transformer.blocks)
        return PagedKVCache(layers, capacity, heads, self.frame_tokens, head_dim, device, dtype)

    def to_tokens(self, video: torch.Tensor) -> torch.Tensor:
        """Video (or, without ``encode``, latents [N, T, C, h, w]) -> tokens."""
        latents = self.encode(video) if self.encode.fn is not None else video
        return patchify(latents, *self.patch)

    def to_video(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens -> video through ``decode`` (without it: the latents [N, T, C, h, w])."""
        latents = unpatchify(tokens, *self.latent_shape, *self.patch)
        return self.decode(latents) if self.decode.fn is not None else latents

    def video_frames(self, first: int, last: int) -> slice:
        """The frames of :meth:`to_video`'s output that latent frames ``[first, last)`` decode to."""
        s = self.temporal_stride
        return slice(0 if first == 0 else s * (first - 1) + 1, s * (last - 1) + 1)

    def timesteps(self) -> torch.Tensor:
        """[S + 1]: ``steps`` and 0, shifted (Self-Forcing's schedule with shift 5)."""
        return shift_timesteps(torch.cat([self.steps, self.steps.new_zeros(1)]), self.shift).float()

    def add_lora(self, rank: int, alpha: float | None = None) -> int:
        """Freeze the whole generator and give every block's attention and feed-forward layers
        LoRA adapters of ``rank`` (the public recipe: 256 on Wan2.1-1.3B); returns how many
        layers. :func:`kvpo.generators.lora.merge_lora` folds them back for deployment."""
        self.requires_grad_(False)
        return lora.add_lora(self.transformer.blocks, WAN_LORA_TARGETS, rank, alpha)

    # -- helpers --------------------------------------------------------------------------------

    def _param(self) -> torch.Tensor:
        return self.transformer.proj_out.weight

    def _rotary(self, frame_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [R, c*T, 1, head_dim] of each token's (absolute frame, row, column), in
        float32 (float64 for a float64 model): diffusers keeps the tables in float64, which would
        promote every rotated q and k of a 16-bit model to float64 temporaries."""
        rope = self.transformer.rope
        dtype = torch.float64 if self._param().dtype == torch.float64 else torch.float32
        ph, pw = self.patch
        hp, wp = self.latent_shape[1] // ph, self.latent_shape[2] // pw
        sizes = [rope.t_dim, rope.h_dim, rope.w_dim]
        R, c = frame_index.shape
        out = []
        for table in (rope.freqs_cos, rope.freqs_sin):
            ft, fh, fw = table.to(dtype).split(sizes, dim=1)
            parts = (
                ft[frame_index].view(R, c, 1, 1, -1).expand(R, c, hp, wp, -1),
                fh[:hp].view(1, 1, hp, 1, -1).expand(R, c, hp, wp, -1),
                fw[:wp].view(1, 1, 1, wp, -1).expand(R, c, hp, wp, -1),
            )
            out.append(torch.cat(parts, dim=-1).reshape(R, c * hp * wp, 1, -1))
        return out[0], out[1]
