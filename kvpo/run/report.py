"""Run outputs: CSV/JSONL logs, the reward-curve PNG, sample videos (GIF, MP4) and the record of
each process that ran the run."""

from __future__ import annotations

import csv
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def check_writable(directory: str | Path, what: str) -> None:
    """Make ``directory`` (and its parents) and write a file in it, or raise a ValueError naming
    ``what`` (the option that asked for it): before the work whose results go there, not after
    it."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise ValueError(
            f"{what}: cannot write in {str(directory)!r} ({e.strerror or e})"
        ) from None


def read_rows(path: Path) -> list[dict]:
    """The rows of a ``.jsonl`` file ([] if there is none). A last line cut off mid-write (a
    process killed while appending it: SIGKILL, the OOM killer) is left out; the rows before it
    stand, and a resumed run rewrites the file without it."""
    if not path.is_file():
        return []
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{str(path)!r}: line {i + 1} is not JSON ({e.msg})") from None
    return rows


def write_rows(path: Path, rows: list[dict]) -> None:
    """``rows`` as the ``.jsonl`` file ``path``, a JSON line each (its directory made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


class MetricsLog:
    """Appends rows (each with its ``iter``) to ``<name>.jsonl`` and ``<name>.csv``: one per
    iteration in ``metrics`` (and the evaluation before training as iteration -1), one per
    held-out prompt and evaluation in ``eval_prompts``."""

    def __init__(self, out_dir: Path, name: str = "metrics") -> None:
        self.jsonl = out_dir / f"{name}.jsonl"
        self.csv = out_dir / f"{name}.csv"

    def write(self, *rows: dict) -> None:
        with self.jsonl.open("a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        rows = read_rows(self.jsonl)
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with self.csv.open("w", newline="") as f:  # rewritten: columns may appear later (eval)
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)

    def truncate(self, iterations: int) -> None:
        """Keep rows of iterations < ``iterations``, those a resumed run's checkpoint holds (the
        evaluation before training is iteration -1: -1 keeps none of a former run's rows)."""
        if self.jsonl.exists():
            write_rows(self.jsonl, [r for r in read_rows(self.jsonl) if r["iter"] < iterations])


def plot_rewards(history: list[dict], path: Path) -> None:
    """A PNG of the training reward per iteration and the evaluation rewards of ``history``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8), dpi=110)
    tr = [(h["iter"], h["reward"]) for h in history if "reward" in h]
    if tr:
        ax.plot(*zip(*tr, strict=True), label="train reward (mean of branches)", alpha=0.6)
    # The evaluation before training is logged as iteration -1 and drawn at 0.
    ev = [(max(h["iter"] + 1, 0), h["eval_reward"]) for h in history if "eval_reward" in h]
    if ev:
        ax.plot(*zip(*ev, strict=True), "o-", label="held-out eval reward")
    ax.set_xlabel("iteration")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    div = [(max(h["iter"] + 1, 0), h["eval_diversity"]) for h in history if "eval_diversity" in h]
    if div:  # on its own scale: a fall says the policy's samples of a prompt converge
        ax2 = ax.twinx()
        ax2.plot(*zip(*div, strict=True), "s--", color="tab:gray", label="held-out diversity")
        ax2.set_ylabel("diversity")
        more = ax2.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    # below the axes: the curves fill them
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def preview(videos: torch.Tensor, max_tile: int = 256) -> torch.Tensor:
    """[B, T, C, H, W] -> float32 [B, T, C, H', W'] clamped to [-1, 1]: frames taller than
    ``max_tile`` pixels averaged down by a whole factor (a Wan2.1 480x832 video to 240x416), the
    size :func:`video_grid` draws them at, so a grid of real videos stays a few hundred MB, not
    tens of GB."""
    B, T, C, H, W = videos.shape
    v = videos.detach().float().clamp(-1, 1)
    if H <= max_tile:
        return v
    v = torch.nn.functional.avg_pool2d(v.flatten(0, 1), math.ceil(H / max_tile), ceil_mode=True)
    return v.view(B, T, C, *v.shape[-2:])


def video_grid(
    videos: torch.Tensor, tile: int = 96, max_tile: int = 256, max_width: int = 2048
) -> torch.Tensor:
    """[B, T, C, H, W] in [-1, 1] -> uint8 frames [T, H', W', C] of the videos side by side,
    separated by 1-pixel white lines: one row when it fits ``max_width`` pixels, else a square-ish
    grid. Frames shorter than ``tile`` pixels are enlarged by a whole factor (the built-in 24x24
    ones 4x); taller than ``max_tile`` are averaged down (:func:`preview`)."""
    v = preview(videos, max_tile)
    B, T, C = v.shape[:3]
    up = max(1, tile // v.shape[-2])
    h, w = v.shape[-2:]
    cols = B if B * (w + 1) * up <= max_width else math.ceil(math.sqrt(B))
    rows = math.ceil(B / cols)
    v = ((v + 1) * 127.5).round().to(torch.uint8)
    v = torch.nn.functional.pad(v, (0, 1, 0, 1 if rows > 1 else 0), value=255)  # separators
    if rows * cols > B:  # white tiles fill the last row
        v = torch.cat([v, v.new_full((rows * cols - B, *v.shape[1:]), 255)])
    hh, ww = v.shape[-2:]
    frames = v.view(rows, cols, T, C, hh, ww).permute(2, 0, 4, 1, 5, 3)
    frames = frames.reshape(T, rows * hh, cols * ww, C)
    return frames.repeat_interleave(up, 1).repeat_interleave(up, 2)


def save_videos(videos: torch.Tensor, stem: Path, fps: int = 6, mp4: bool = True) -> list[Path]:
    """Write ``stem.gif`` (and ``stem.mp4``) of a grid of videos; returns the paths written."""
    import imageio.v3 as iio

    frames = video_grid(videos).numpy()
    out = [stem.with_suffix(".gif")]
    stem.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(out[0], frames, duration=1000 / fps, loop=0)
    if not mp4:
        return out
    # libx264's yuv420p needs an even height and width: pad the grid by a black row / column
    frames = np.pad(frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)))
    try:
        iio.imwrite(
            stem.with_suffix(".mp4"),
            frames,
            fps=fps,
            codec="libx264",
            macro_block_size=1,
            plugin="pyav" if _has_pyav() else "FFMPEG",
        )
        out.append(stem.with_suffix(".mp4"))
    except Exception as e:  # noqa: BLE001 - no video codec must not stop training
        stem.with_suffix(".mp4").unlink(missing_ok=True)  # no empty file left behind
        print(f"warning: could not write {stem.with_suffix('.mp4')}: {e}")
    return out


def _has_pyav() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def source_revision(root: Path | None = None) -> str | None:
    """The git commit of the kvpo source this process runs (or of ``root``), ``+dirty`` with
    local changes; None when it is not a git checkout."""
    root = root or Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        # an installed copy inside some other repository (a project's .venv) is not a checkout
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root.resolve():
            return None
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def record_process(
    path: Path, start: int, device: torch.device, world: int, resumed: bool = False
) -> dict:
    """Append to ``path`` (``environment.jsonl``; a run not ``resumed`` starts it afresh) the
    record of the process starting the run at iteration ``start``: when, where, the command
    line, the kvpo source revision, and what kvpo_kernels runs there
    (:func:`kvpo_kernels.info.environment`). A run resumed after a requeue gets a line per
    start."""
    from kvpo import __version__
    from kvpo_kernels.info import environment

    entry = {
        "start_iteration": start,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "argv": sys.argv,
        "device": str(device),
        "ranks": world,
        "kvpo": __version__,
        "source_revision": source_revision(),
        **environment(),
    }
    with path.open("a" if resumed else "w") as f:
        f.write(json.dumps(entry) + "\n")
    return entry
