"""Training recipes side by side on the built-in generator: each run's held-out reward before and
after, its training reward, and the untrained guard rewards of its final policy (``motion``,
``visual`` and alignment's ``size`` part, which no recipe trains on).

    bash benchmarks/recipes.sh                         # the runs of benchmarks/RESULTS.md
    python -m benchmarks.recipes runs/recipes          # their Markdown table (one row per run)

A run directory is named ``NAME-sSEED``; rows of one NAME are summarised by their mean gain.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

import torch
import yaml

from kvpo.evaluate import evaluate
from kvpo.generators import data
from kvpo.rewards import CompositeReward, alignment_scores
from kvpo.run.checkpoint import load_model
from kvpo.run.config import build_config
from kvpo.run.policy import set_context


def size_reward(videos: torch.Tensor, prompts: list) -> torch.Tensor:
    """The alignment reward's size part alone: [B]."""
    return alignment_scores(videos, prompts)[:, 2]


GUARDS = CompositeReward({"motion": 0.0, "visual": 0.0, "size": 1.0}, {"size": size_reward})


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def guards(run: Path) -> dict[str, float]:
    """The guard rewards on the run's held-out prompts and noises of its base (``base_*``, under
    the run's deployment context) and of its final policy (``eval_*``); kept in the run's
    ``guards.json``."""
    kept = run / "guards.json"
    if kept.is_file():
        return json.loads(kept.read_text())
    cfg = build_config(yaml.safe_load((run / "config.yaml").read_text()))
    base = load_model(cfg.base_checkpoint)
    set_context(cfg, base)
    _, held = data.split_prompts(num_eval=cfg.eval_prompts)
    out = {}
    for tag, model in (("base_", base), ("eval_", load_model(run / "checkpoint.safetensors"))):
        ev = evaluate(model.eval(), held, GUARDS, cfg.seed, torch.device("cpu"), cfg.eval_seeds)
        out.update({tag + g: ev.scores["eval_" + g] for g in ("motion", "visual", "size")})
    kept.write_text(json.dumps(out))
    return out


def summary(run: Path) -> dict:
    """One run's figures."""
    rows = _rows(run)
    evals = [r for r in rows if "eval_reward" in r]
    trained = [r for r in rows if r["iter"] >= 0]
    out = {
        "run": run.name,
        "before": evals[0]["eval_reward"],
        "after": evals[-1]["eval_reward"],
        "train_last5": statistics.mean(r["reward"] for r in trained[-5:]),
        "seconds": sum(v for r in trained for k, v in r.items() if k.startswith("time_")),
        **guards(run),
    }
    out["gain"] = out["after"] - out["before"]
    return out


def table(root: Path) -> str:
    """The Markdown table of every run under ``root``, then each recipe's mean gain."""
    runs = sorted(p for p in root.iterdir() if (p / "checkpoint.safetensors").is_file())
    sums = [summary(p) for p in runs]
    head = "| run | held-out before -> after | gain | train reward (last 5) | motion | visual | size | s |"
    lines = [head, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in sums:
        guard = " | ".join(
            f"{s['base_' + k]:.3f} -> {s['eval_' + k]:.3f}" for k in ("motion", "visual", "size")
        )
        lines.append(
            f"| {s['run']} | {s['before']:.3f} -> {s['after']:.3f} | {s['gain']:+.3f} | "
            f"{s['train_last5']:.3f} | {guard} | {s['seconds']:.0f} |"
        )
    by_name: dict[str, list[float]] = {}
    for s in sums:
        by_name.setdefault(re.sub(r"-s\d+$", "", s["run"]), []).append(s["gain"])
    lines += ["", "| recipe | seeds | gains | mean gain |", "| --- | ---: | --- | ---: |"]
    for name, gains in by_name.items():
        shown = ", ".join(f"{g:+.3f}" for g in gains)
        lines.append(f"| {name} | {len(gains)} | {shown} | {statistics.mean(gains):+.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.recipes", description=__doc__)
    ap.add_argument("root", type=Path, help="a folder of NAME-sSEED run directories")
    print(table(ap.parse_args(argv).root))


if __name__ == "__main__":
    main()
