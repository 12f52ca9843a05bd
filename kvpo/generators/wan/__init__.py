"""Wan2.1 (Self-Forcing, CausVid, LongLive) through diffusers: the streaming generator
(:mod:`.generator`) and its weights (:mod:`.weights`); ``python -m kvpo.generators.wan`` exports a
trained transformer (LoRA merged, in diffusers' or the original layout) or its LoRA alone (in
diffusers' or LongLive's layout)."""

from kvpo.generators.wan.generator import (
    WAN_DTYPES,
    WAN_LORA_TARGETS,
    RoutedSelfAttention,
    WanStreamingGenerator,
)
from kvpo.generators.wan.weights import (
    export,
    export_longlive_lora,
    export_lora,
    export_original,
    from_checkpoint,
    load_from_config,
    load_longlive_lora,
    load_original_weights,
    load_wan,
    read_longlive_lora,
    to_original_layout,
)

__all__ = [
    "WAN_DTYPES",
    "WAN_LORA_TARGETS",
    "RoutedSelfAttention",
    "WanStreamingGenerator",
    "export",
    "export_longlive_lora",
    "export_lora",
    "export_original",
    "from_checkpoint",
    "load_from_config",
    "load_longlive_lora",
    "load_original_weights",
    "load_wan",
    "read_longlive_lora",
    "to_original_layout",
]
