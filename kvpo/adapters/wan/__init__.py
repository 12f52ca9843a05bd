"""Wan2.1 (Self-Forcing, CausVid, LongLive) through diffusers: the streaming generator
(:mod:`.generator`) and its weights (:mod:`.weights`); ``python -m kvpo.adapters.wan`` exports a
trained transformer (LoRA merged) or its LoRA alone."""

from .generator import WAN_DTYPES, WAN_LORA_TARGETS, RoutedSelfAttention, WanStreamingGenerator
from .weights import (
    export,
    export_lora,
    from_checkpoint,
    load_from_config,
    load_original_weights,
    load_wan,
)

__all__ = [
    "WAN_DTYPES",
    "WAN_LORA_TARGETS",
    "RoutedSelfAttention",
    "WanStreamingGenerator",
    "export",
    "export_lora",
    "from_checkpoint",
    "load_from_config",
    "load_original_weights",
    "load_wan",
]
