"""Generators: the interface the trainer relies on, the built-in streaming generator and its
procedural data, the paged KV cache and deployment context every generator shares, the few-step
samplers, LoRA and EMA, and the Wan2.1 adapter (:mod:`kvpo.generators.wan`)."""
