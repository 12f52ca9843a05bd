"""The model interface the trainer relies on, so any streaming AR generator plugs in the same way.

Vocabulary:

* a *frame* is ``frame_tokens`` tokens of ``token_dim`` features (the model's latent frame) and one
  page of the paged KV cache (``routed_attention`` layout ``[P, Hkv, frame_tokens, D]``);
* a *chunk* is ``chunk_frames`` consecutive frames denoised together;
* a *row* is one chunk being processed for one video/branch: its queries attend to the pages its
  row of the page table lists (context frames and, always, the row's own frames).

``kvpo.trainer.train(cfg, generator=...)`` aligns any ``nn.Module`` with this protocol. It also uses,
when present: ``recache`` (KV re-cache at prompt switches), ``grad_checkpointing`` (a bool switch
for ``--grad_checkpointing``), ``set_local_window`` / ``set_recache`` / ``set_sampler`` (else
``--local_window``, ``--recache`` and ``--sampler`` set the attributes directly), ``add_lora(rank, alpha)`` (``--lora_rank``), and
``video_frames(first, last) -> slice`` (the frames of :meth:`~StreamingVideoGenerator.to_video`'s
output that frames ``[first, last)`` decode to, when a VAE makes several of each).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class KVCache(Protocol):
    """Physical KV pages per layer; page ids are allocated by the caller (rollout)."""

    capacity: int

    def allocate(self, n: int) -> torch.Tensor:
        """Reserve ``n`` fresh pages; returns their ids, [n] int64."""
        ...


@runtime_checkable
class StreamingVideoGenerator(Protocol):
    """A chunk-wise autoregressive flow-matching generator over a paged KV cache.

    Flow convention: ``x_t = (1 - t) x_0 + t * noise``, velocity ``v = noise - x_0``; a chunk is
    denoised from ``t = 1`` to ``t = 0`` over :meth:`timesteps` by the generator's own sampler,
    its optional ``sampler`` attribute (:mod:`kvpo.generators.sampler`): ``euler`` (the default, the ODE
    ``dx/dt = v``) or ``renoise`` (predict ``x_0``, re-noise it to the next timestep: the sampler
    Self-Forcing, CausVid and LongLive were distilled with).
    """

    num_frames: int
    chunk_frames: int
    frame_tokens: int
    token_dim: int
    sink_frames: int
    local_window: int | None
    # Optional ``recache: bool``: at a prompt switch the frames the new chunk sees are re-encoded
    # under the new prompt (LongLive's KV re-cache); rollout, replay and pretraining follow it.

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Prompt conditioning, [N, ...]: a vector per prompt ([N, C], the built-in generator) or
        token embeddings ([N, L, C], Wan's text encoder); rows of it are indexed along dim 0."""
        ...

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        frame_index: torch.Tensor,
        table: torch.Tensor,
        cache: KVCache | None = None,
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity of R rows.

        Args:
            x: [R, chunk_frames * frame_tokens, token_dim] row states.
            t: [R] float timesteps in [0, 1] (0 = clean: the pass that writes a chunk's cache).
            cond: [R, ...] prompt conditioning of each row (rows of :meth:`encode_prompts`).
            frame_index: [R, chunk_frames] int64 absolute frame positions.
            table: [R, N] int32 pages each row attends to (-1 = none); must list the row's own
                pages. Without ``cache`` the pages are this call's own (row r, frame f has page
                ``r * chunk_frames + f``); with ``cache``, they are cache page ids.
            cache: paged KV cache to read, and to write this call's pages into at ``slots``.
            slots: [R, chunk_frames] int64 cache pages that receive this call's K/V.

        Returns:
            [R, chunk_frames * frame_tokens, token_dim] velocity.
        """
        ...

    def new_cache(self, capacity: int, device: torch.device) -> KVCache:
        """An empty cache of ``capacity`` pages."""
        ...

    def to_tokens(self, video: torch.Tensor) -> torch.Tensor:
        """[N, T, C, H, W] in [-1, 1] -> [N, T, frame_tokens, token_dim]."""
        ...

    def to_video(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, T, frame_tokens, token_dim] -> [N, T, C, H, W] in [-1, 1]."""
        ...

    def timesteps(self) -> torch.Tensor:
        """[S + 1] float, decreasing from 1 to 0: the S-step schedule of one chunk."""
        ...


# What the trainer reads of a generator: the protocol's attributes, then its methods.
GENERATOR_MEMBERS = (
    *StreamingVideoGenerator.__annotations__,
    "encode_prompts",
    "forward",
    "new_cache",
    "to_tokens",
    "to_video",
    "timesteps",
)


def require_generator(model: object) -> None:
    """Raise a TypeError naming what ``model`` lacks of :class:`StreamingVideoGenerator` (an
    ``nn.Module`` with its attributes and methods), before a rollout fails on the first one
    it reads."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            "generator must be a torch.nn.Module implementing "
            f"kvpo.generators.interface.StreamingVideoGenerator, got {type(model).__name__}"
        )
    missing = [name for name in GENERATOR_MEMBERS if not hasattr(model, name)]
    if missing:
        raise TypeError(
            f"generator {type(model).__name__} lacks {', '.join(missing)} of "
            "kvpo.generators.interface.StreamingVideoGenerator (see its docstrings)"
        )
    if model.num_frames % model.chunk_frames:
        raise ValueError(
            f"generator {type(model).__name__}: num_frames={model.num_frames} must be a multiple "
            f"of chunk_frames={model.chunk_frames}"
        )
