"""kvpo: KVPO training (KV-routing exploration, TVE replay, GRPO) for streaming AR video generators.

The public API, imported on first use (``python -m kvpo.train`` does not import the package's
other entry points, and Wan's optional dependencies load only with :func:`load_wan`)::

    from kvpo import TrainConfig, build_config, train

    result = train(build_config({"iterations": 20, "out_dir": "runs/kvpo"}))
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> the module that defines it
_API = {
    "train": "kvpo.trainer",
    "TrainConfig": "kvpo.run.config",
    "build_config": "kvpo.run.config",
    "parse_args": "kvpo.run.config",
    "StreamingVideoGenerator": "kvpo.generators.interface",
    "KVCache": "kvpo.generators.interface",
    "require_generator": "kvpo.generators.interface",
    "TinyARVideo": "kvpo.generators.model",
    "ModelConfig": "kvpo.generators.model",
    "RewardFn": "kvpo.rewards",
    "CompositeReward": "kvpo.rewards",
    "ClipReward": "kvpo.rewards",
    "load_reward": "kvpo.rewards",
    "generate": "kvpo.method.rollout",
    "rollout": "kvpo.method.rollout",
    "RolloutSpec": "kvpo.method.rollout",
    "load_model": "kvpo.run.checkpoint",
    "load_generator": "kvpo.run.checkpoint",
    "load_wan": "kvpo.generators.wan",
    "WanStreamingGenerator": "kvpo.generators.wan",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'kvpo' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
