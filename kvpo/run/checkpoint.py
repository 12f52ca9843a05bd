"""safetensors checkpoints: model weights with their config, and full training state.

A training checkpoint holds ``model.*`` weights (and ``ema.*`` with an EMA), ``ref.*`` is not
stored (the reference policy is the base checkpoint named in the config, or the generator the
caller passed), ``optim.<i>.<state>`` AdamW tensors, and JSON metadata (model config, trainer
config, iteration, optimizer hyper-parameters). A user's own generator is saved the same way and
loaded back into an instance the caller makes (``module=``).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from kvpo.generators.model import ModelConfig, TinyARVideo

if TYPE_CHECKING:
    from kvpo.run.config import TrainConfig


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match what is asked of it."""


def save_model(model: TinyARVideo, path: str | Path, extra: dict | None = None) -> None:
    """The built-in generator's weights and config (and ``extra``, JSON) as a safetensors file."""
    meta = {"model_config": json.dumps(model.config_dict()), "extra": json.dumps(extra or {})}
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _write(path, tensors, meta)


def _write(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """A safetensors file written beside ``path`` and renamed onto it: an interrupted save never
    leaves a half-written checkpoint under the real name (nor destroys the one there)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


_UNREADABLE = (SafetensorError, OSError, ValueError)


def _unreadable(path: str | Path, e: Exception) -> CheckpointError:
    return CheckpointError(f"checkpoint {str(path)!r} is not a readable safetensors file: {e}")


def checkpoint_file(path: str | Path) -> Path:
    """``path``, or for a run's ``out_dir`` its latest ``checkpoint.safetensors``."""
    path = Path(path)
    if path.is_dir():
        if not (path / "checkpoint.safetensors").is_file():
            raise CheckpointError(
                f"checkpoint {str(path)!r} is a directory without a checkpoint.safetensors"
            )
        return path / "checkpoint.safetensors"
    return path


def _header(path: str | Path) -> dict[str, str]:
    """The metadata of a safetensors checkpoint, read without its tensors."""
    path = checkpoint_file(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except _UNREADABLE as e:
        raise _unreadable(path, e) from e


def _read(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = checkpoint_file(path)
    meta = _header(path)
    try:
        tensors = load_file(str(path))
    except _UNREADABLE as e:
        raise _unreadable(path, e) from e
    if "model_config" not in meta:
        raise CheckpointError(f"checkpoint {str(path)!r} has no model_config metadata")
    return tensors, meta


def _meta_value(meta: dict[str, str], key: str, path, default: str | None = None):
    """Metadata entry ``key`` of a checkpoint, parsed as JSON (a CheckpointError naming the file
    and the entry when it is not)."""
    text = meta.get(key, default)
    if text is None:
        raise CheckpointError(f"checkpoint {str(path)!r} has no {key} metadata")
    try:
        return json.loads(text)
    except ValueError as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: its {key} metadata is not JSON: {e}"
        ) from e


def _model_config(meta: dict[str, str], path) -> ModelConfig:
    """The built-in generator's config in a checkpoint's metadata (a CheckpointError if it
    describes none)."""
    config = _meta_value(meta, "model_config", path)
    try:
        return ModelConfig.from_dict(config)
    except (ValueError, TypeError) as e:  # fields of no generator
        raise CheckpointError(
            f"checkpoint {str(path)!r}: its model_config metadata does not describe the "
            f"built-in generator: {e}"
        ) from e


def model_config(path: str | Path) -> ModelConfig:
    """The config of the built-in generator a checkpoint holds, read from its header without
    loading the weights."""
    return _model_config(_header(path), path)


def _model_from(
    tensors: dict[str, torch.Tensor],
    meta: dict[str, str],
    path,
    prefix: str = "",
    module: nn.Module | None = None,
) -> nn.Module:
    """The built-in generator the checkpoint describes, or ``module`` (a user's generator) with
    the checkpoint's weights loaded into it."""
    model = TinyARVideo(_model_config(meta, path)) if module is None else module
    state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of another shape than the model's
        raise CheckpointError(f"checkpoint {str(path)!r} does not match the model: {e}") from e
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return model


def load_model(path: str | Path, ema: bool = False, module: nn.Module | None = None) -> nn.Module:
    """The model stored by :func:`save_model`, or the policy of a training checkpoint (its EMA
    weights with ``ema=True``); loaded into ``module`` if given (a user's own generator)."""
    tensors, meta = _read(path)
    if ema:
        if not any(k.startswith("ema.") for k in tensors):
            raise CheckpointError(
                f"checkpoint {str(path)!r} has no EMA weights (train with --ema 0.999, or any "
                "decay > 0)"
            )
        # the tensors the EMA shares with the policy (its frozen ones) are stored under model.
        shared = {"ema." + k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        return _model_from({**shared, **tensors}, meta, path, "ema.", module)
    prefix = "model." if "trainer" in meta else ""
    return _model_from(tensors, meta, path, prefix, module)


def save_training(
    path: str | Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    iteration: int,
    config: dict,
    history: list[dict],
    ema: nn.Module | None = None,
) -> None:
    """Weights, AdamW state, iteration, trainer config and log (and the EMA weights, if any)."""
    policy = model.state_dict()
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in policy.items()}
    if ema is not None:
        # The EMA shares the policy's frozen tensors (kvpo.generators.ema): stored once, under model.
        tensors.update(
            {
                f"ema.{k}": v.detach().contiguous().cpu()
                for k, v in ema.state_dict().items()
                if k not in policy or v.data_ptr() != policy[k].data_ptr()
            }
        )
    sd = opt.state_dict()
    scalars: dict[str, dict] = {}
    for i, st in sd["state"].items():
        for name, val in st.items():
            if torch.is_tensor(val) and val.dim() > 0:
                tensors[f"optim.{i}.{name}"] = val.contiguous().cpu()
            else:
                scalars.setdefault(str(i), {})[name] = float(val)
    meta = {
        "model_config": json.dumps(model.config_dict() if hasattr(model, "config_dict") else {}),
        "trainer": json.dumps(config),
        "iteration": str(iteration),
        "optim_groups": json.dumps(sd["param_groups"]),
        "optim_scalars": json.dumps(scalars),
        "history": json.dumps(history),
    }
    _write(path, tensors, meta)


def saved_progress(path: str | Path) -> tuple[int, int | None]:
    """(iterations done, iterations its run asked for, None if it records none) of a training
    checkpoint, read from its header."""
    meta = _header(path)
    asked = _meta_value(meta, "trainer", path, "{}").get("iterations")
    return _iterations_done(meta, path, "0"), asked


def _iterations_done(meta: dict[str, str], path, default: str | None = None) -> int:
    """The count of iterations a training checkpoint's metadata says are done (a CheckpointError
    if it is not a count)."""
    done = _meta_value(meta, "iteration", path, default)
    if not isinstance(done, int) or isinstance(done, bool) or done < 0:
        raise CheckpointError(f"checkpoint {str(path)!r}: iteration {done!r} is not a count")
    return done


def trainer_config(path: str | Path) -> dict:
    """The trainer config a training checkpoint was saved with ({} for a model checkpoint), read
    from its header without loading the tensors."""
    return _meta_value(_header(path), "trainer", path, "{}")


# Fields of a saved trainer config that do not describe the run's policy or its evaluation.
TRAINING_ONLY = ("resume", "samples_at_eval", "profile_iteration")


def run_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    """The trainer config a checkpoint's run was saved with (its defaults for a model
    checkpoint), ``overrides`` applied, validated. Left out: ``resume`` (where that run came
    from is not part of what it is) and what the run wrote as it trained (``samples_at_eval``,
    ``profile_iteration``), which an older version let take values it now refuses."""
    from kvpo.run.config import build_config

    saved = {k: v for k, v in trainer_config(path).items() if k not in TRAINING_ONLY}
    return build_config({**saved, **(overrides or {})})


def add_generator_arguments(ap: argparse.ArgumentParser) -> None:
    """The command-line arguments of :func:`load_generator`: ``--checkpoint``, ``--ema``,
    ``--wan_dir`` and ``--device``."""
    from kvpo.run.distributed import add_device_argument

    ap.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="model or training checkpoint, or a run's out_dir (its latest)",
    )
    ap.add_argument("--ema", action="store_true", help="the EMA weights of a training checkpoint")
    ap.add_argument("--wan_dir", default=None, help="a Wan run's directory, if it moved")
    add_device_argument(ap)


def load_generator(
    path: str | Path,
    ema: bool = False,
    wan_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """The generator a checkpoint holds, in eval mode on ``device``: the built-in one of a model
    or training checkpoint, or the Wan2.1 generator of a ``--wan_dir`` run (built from the run's
    directory, or ``wan_dir`` if it moved); its EMA weights with ``ema``."""
    if trainer_config(path).get("wan_dir"):
        from kvpo.generators.wan import from_checkpoint

        return from_checkpoint(path, ema=ema, wan_dir=wan_dir, device=device)
    return load_model(path, ema=ema).to(device).eval()


def load_training(
    path: str | Path,
    opt_factory: Callable[[nn.Module], torch.optim.Optimizer],
    module: nn.Module | None = None,
) -> tuple[nn.Module, torch.optim.Optimizer, int, dict, list]:
    """Model (the built-in generator, or ``module`` loaded), optimizer (made by
    ``opt_factory(model)`` then loaded), iteration, trainer config and log history of a
    checkpoint from :func:`save_training`."""
    tensors, meta = _read(path)
    if "trainer" not in meta:
        raise CheckpointError(f"checkpoint {str(path)!r} is a model checkpoint, not a training one")
    model = _model_from(tensors, meta, path, "model.", module)
    opt = opt_factory(model)
    scalars = _meta_value(meta, "optim_scalars", path)
    state: dict[int, dict] = {}
    for key, val in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = val
    for i, st in scalars.items():
        for name, val in st.items():
            state.setdefault(int(i), {})[name] = torch.tensor(val)
    groups = _meta_value(meta, "optim_groups", path)
    try:
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"optimizer state in {str(path)!r} does not fit: {e}") from e
    iteration = _iterations_done(meta, path)
    return (
        model,
        opt,
        iteration,
        _meta_value(meta, "trainer", path),
        _meta_value(meta, "history", path),
    )


def prune_checkpoints(folder: Path, done: int, keep: int) -> list[Path]:
    """Delete the ``step_N.safetensors`` of ``folder`` older than the newest ``keep`` up to step
    ``done``; returns those deleted. Files past ``done`` are left alone: a run resumed from an
    earlier checkpoint finds the later ones of the trajectory it left, and overwrites them as it
    gets there, never deleting its own newest for them."""
    steps = {}
    for f in folder.glob("step_*.safetensors"):
        m = re.fullmatch(r"step_(\d+)\.safetensors", f.name)
        if m and int(m.group(1)) <= done:
            steps[int(m.group(1))] = f
    old = [steps[n] for n in sorted(steps)[: max(len(steps) - keep, 0)]]
    for f in old:
        f.unlink()
    return old
