"""kvpo: KVPO training (KV-routing exploration, TVE replay, GRPO) for streaming AR video generators."""

__version__ = "0.1.0"
