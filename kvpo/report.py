"""Run outputs: CSV/JSONL logs, the reward-curve PNG and sample videos (GIF, MP4)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch


class MetricsLog:
    """Appends one row per iteration to ``metrics.jsonl`` and ``metrics.csv``."""

    def __init__(self, out_dir: Path) -> None:
        self.jsonl = out_dir / "metrics.jsonl"
        self.csv = out_dir / "metrics.csv"

    def write(self, row: dict) -> None:
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        rows = [json.loads(line) for line in self.jsonl.read_text().splitlines() if line]
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with self.csv.open("w", newline="") as f:  # rewritten: columns may appear later (eval)
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)

    def truncate(self, iterations: int) -> None:
        """Keep rows of iterations < ``iterations`` (a resumed run rewrites what follows)."""
        if not self.jsonl.exists():
            return
        rows = [json.loads(line) for line in self.jsonl.read_text().splitlines() if line]
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows if r["iter"] < iterations))


def plot_rewards(history: list[dict], path: Path) -> None:
    """A PNG of the training reward per iteration and the evaluation rewards of ``history``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
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
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def video_grid(videos: torch.Tensor, scale: int = 4) -> torch.Tensor:
    """[B, T, C, H, W] in [-1, 1] -> [T, B*H*scale... ] uint8 frames [T, H', W', 3] (a column per
    video, separated by 1-pixel lines)."""
    B, T, C, H, W = videos.shape
    v = ((videos.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    v = torch.nn.functional.pad(v, (0, 1), value=255)  # separators
    frames = v.permute(1, 3, 0, 4, 2).reshape(T, H, B * (W + 1), C)
    return frames.repeat_interleave(scale, 1).repeat_interleave(scale, 2)


def save_videos(videos: torch.Tensor, stem: Path, fps: int = 6, mp4: bool = True) -> list[Path]:
    """Write ``stem.gif`` (and ``stem.mp4``) of a grid of videos; returns the paths written."""
    import imageio.v3 as iio

    frames = video_grid(videos).numpy()
    out = [stem.with_suffix(".gif")]
    stem.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(out[0], frames, duration=1000 / fps, loop=0)
    if not mp4:
        return out
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
        print(f"warning: could not write {stem.with_suffix('.mp4')}: {e}")
    return out


def _has_pyav() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True
