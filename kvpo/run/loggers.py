"""Experiment trackers beside metrics.jsonl / metrics.csv: TensorBoard and Weights & Biases.

``--log_to tensorboard`` writes every iteration's numbers to ``out_dir/tensorboard`` (read it with
``tensorboard --logdir runs``); ``--log_to wandb`` logs them to a W&B run of ``--wandb_project``
(``WANDB_MODE=offline`` keeps it on disk; ``wandb sync`` uploads it later); ``tensorboard,wandb``
does both. Metrics are grouped by their prefix: ``eval_reward`` is ``eval/reward``, ``time_update``
``time/update``, the rest ``train/...``. Iteration ``it``'s row is logged at step ``it + 1`` (the
updates made when it ends), so the evaluation before training is step 0; each evaluation's
scores per held-out prompt are a table, ``eval/prompts`` (W&B: a table; TensorBoard: text). The
sample GIFs (before and after training; with ``--samples_at_eval`` every evaluation's and the
group its iteration trained on, at its step) go to W&B as videos and to TensorBoard as images of a
few frames side by side.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Protocol

import numpy as np

LOGGERS = ("tensorboard", "wandb")


def parse_log_to(value: str) -> tuple[str, ...]:
    """``"tensorboard,wandb"`` -> ("tensorboard", "wandb"); "" -> (). Unknown names raise."""
    names = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        raise ValueError(f"unknown logger(s) {unknown}; known: {list(LOGGERS)}")
    return names


def missing_packages(log_to: str) -> list[str]:
    """The packages the loggers of ``log_to`` import that this environment lacks (looked up, not
    imported): a run checks them as it starts, not after the model has loaded."""
    return [name for name in parse_log_to(log_to) if not _importable(name)]


def _importable(name: str) -> bool:
    if name in sys.modules:  # imported already (or blocked: None)
        return sys.modules[name] is not None
    return importlib.util.find_spec(name) is not None


def metric_name(key: str) -> str:
    for prefix in ("eval_", "time_"):
        if key.startswith(prefix):
            return f"{prefix[:-1]}/{key[len(prefix) :]}"
    return f"train/{key}"


def scalars(row: dict) -> tuple[int, dict[str, float]]:
    """A metrics row -> (step, {name: value}) for its numbers (the iteration itself excluded)."""
    values = {
        metric_name(k): float(v)
        for k, v in row.items()
        if k != "iter" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    return row["iter"] + 1, values


def filmstrip(frames: np.ndarray, count: int = 4, max_width: int = 2048) -> np.ndarray:
    """``count`` evenly spaced frames of ``frames`` [T, H, W, C] side by side, [H', W', C],
    subsampled by a whole stride to at most ``max_width`` pixels wide."""
    T = frames.shape[0]
    picked = frames[np.linspace(0, T - 1, min(count, T)).round().astype(int)]
    strip = np.concatenate(list(picked), axis=1)
    stride = -(-strip.shape[1] // max_width)  # ceil
    return np.ascontiguousarray(strip[::stride, ::stride])


def prompt_table(rows: list[dict]) -> tuple[list[str], list[list]]:
    """Per-prompt evaluation rows (``eval_prompts.jsonl``'s, without ``iter``) -> (columns,
    data): the prompt, then each metric by its logged name (``eval_reward``: ``reward``)."""
    keys = [k for k in rows[0] if k != "prompt"]
    columns = ["prompt", *(metric_name(k).split("/", 1)[1] for k in keys)]
    return columns, [[_text(r["prompt"]), *(r[k] for k in keys)] for r in rows]


def _text(prompt: str | list[str]) -> str:
    return prompt if isinstance(prompt, str) else " / ".join(prompt)


class Logger(Protocol):
    def write(self, row: dict) -> None: ...

    def videos(self, paths: dict[str, Path]) -> None: ...

    def prompts(self, rows: list[dict], step: int) -> None: ...

    def close(self) -> None: ...


def _missing(name: str, package: str) -> ImportError:
    return ImportError(f"config log_to={name!r} needs the {package} package: pip install {package}")


class TensorBoardLogger:
    """Scalars (and the run's config as text) to ``out_dir/tensorboard``, flushed every row so
    that a run that stops early keeps what it logged."""

    def __init__(self, out_dir: Path, config: dict, start: int = 0) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise _missing("tensorboard", "tensorboard") from e
        # resumed after `start` iterations: what an earlier process logged past its checkpoint
        # (steps > start) is dropped when read, so those steps are not drawn twice
        purge = start + 1 if start else None
        self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=purge)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```")
        self.step = 0

    def write(self, row: dict) -> None:
        self.step, values = scalars(row)
        for name, value in values.items():
            self.writer.add_scalar(name, value, self.step)
        self.writer.flush()

    def videos(self, paths: dict[str, Path]) -> None:
        """Each GIF as an image of a few of its frames side by side (TensorBoard's own videos
        need moviepy); the GIF and MP4 files are in out_dir."""
        import imageio.v3 as iio

        for name, path in paths.items():
            if path.exists():
                strip = filmstrip(iio.imread(path)[..., :3])
                self.writer.add_image(f"samples/{name}", strip, self.step, dataformats="HWC")
        self.writer.flush()

    def prompts(self, rows: list[dict], step: int) -> None:
        """The evaluation's scores per prompt as a (Markdown) table, ``eval/prompts``."""
        columns, data = prompt_table(rows)
        lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
        for prompt, *values in data:
            cells = [prompt.replace("|", "\\|"), *(f"{v:.4f}" for v in values)]
            lines.append("| " + " | ".join(cells) + " |")
        self.writer.add_text("eval/prompts", "\n".join(lines), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """A W&B run in ``out_dir`` with the config, named after ``out_dir`` (``runs/lr3e-5`` ->
    ``lr3e-5``; ``WANDB_NAME`` overrides); scalars each row, sample GIFs as videos."""

    def __init__(self, out_dir: Path, config: dict, project: str, start: int = 0) -> None:
        try:
            import wandb
        except ImportError as e:
            raise _missing("wandb", "wandb") from e
        self.wandb = wandb
        # resumed after `start` iterations: the same W&B run goes on (its id kept in out_dir)
        id_file = out_dir / "wandb_run_id"
        same = {}
        if start and id_file.is_file():
            same = {"id": id_file.read_text().strip(), "resume": "allow"}
        if not os.environ.get("WANDB_NAME"):  # W&B reads it only when init names no run
            same["name"] = out_dir.resolve().name
        self.run = wandb.init(project=project, dir=str(out_dir), config=config, **same)
        id_file.write_text(self.run.id)
        self.step = 0

    def write(self, row: dict) -> None:
        self.step, values = scalars(row)
        self.run.log(values, step=self.step)

    def videos(self, paths: dict[str, Path]) -> None:
        media = {
            f"samples/{name}": self.wandb.Video(str(path), format="gif")
            for name, path in paths.items()
            if path.exists()
        }
        if media:
            self.run.log(media, step=self.step)

    def prompts(self, rows: list[dict], step: int) -> None:
        """The evaluation's scores per prompt as a W&B table, ``eval/prompts``."""
        columns, data = prompt_table(rows)
        self.run.log({"eval/prompts": self.wandb.Table(columns=columns, data=data)}, step=step)

    def close(self) -> None:
        self.run.finish()


def make_loggers(
    log_to: str, out_dir: Path, config: dict, wandb_project: str, start: int = 0
) -> list[Logger]:
    """The loggers ``log_to`` names (see :func:`parse_log_to`), for a run resumed after
    ``start`` iterations (0: a new run)."""
    made: list[Logger] = []
    for name in parse_log_to(log_to):
        if name == "tensorboard":
            made.append(TensorBoardLogger(out_dir, config, start))
        else:
            made.append(WandbLogger(out_dir, config, wandb_project, start))
    return made
