"""What training runs came to, side by side: ``python -m kvpo.summary RUN [RUN ...]``.

Reads each run's ``out_dir`` (``metrics.jsonl``, ``eval_prompts.jsonl``, ``config.yaml``), never
its checkpoint, so it works on a run still going, a stopped one, or a copy of its logs. Prints a
Markdown table, a row per run: where it ran (ranks x GPU or device, from ``environment.jsonl``),
iterations done, a held-out metric (``--metric``, default ``eval_reward``) before training, at its
best and at the end, the EMA's at the end, the held-out diversity, how many held-out prompts rose,
the share of rollout groups that trained, skipped optimizer steps, seconds per iteration and the
peak GPU memory; ``--json`` prints the rows as JSON instead. ``--prompts`` adds a table of each
held-out prompt's metric, before training and at each run's end.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import yaml

from kvpo.run.report import read_rows


def prompt_changes(path: Path, metric: str = "eval_reward") -> str | None:
    """A line on how each held-out prompt's ``metric`` moved between the first and the last
    evaluation in ``path`` (``eval_prompts.jsonl``): how many rose, the largest rise and the
    largest fall (or smallest rise). None if fewer than two evaluations are there."""
    moved = _prompt_moves(read_rows(path), metric)
    if not moved:
        return None
    rose = sum(d > 0 for d, _ in moved)
    (low, worst), (high, best) = moved[0], moved[-1]
    return (
        f"per prompt: {rose} of {len(moved)} held-out prompts rose (best {metric} {high:+.4f}: "
        f"{best!r}; worst {low:+.4f}: {worst!r}) in {path.name}"
    )


def _prompt_moves(rows: list[dict], metric: str) -> list[tuple[float, str]]:
    """(last - first value of ``metric``, prompt) of each prompt in both the first and the last
    evaluation of ``rows``, in increasing order; [] with fewer than two evaluations."""
    its = sorted({r["iter"] for r in rows if metric in r})
    if len(its) < 2:
        return []
    first, last = (
        {str(r["prompt"]): r[metric] for r in rows if r["iter"] == i and metric in r}
        for i in (its[0], its[-1])
    )
    return sorted((last[p] - first[p], p) for p in first if p in last)


def summarize(run: Path, metric: str = "eval_reward") -> dict:
    """One run's row (see the module's docstring); a metric it never logged is None."""
    if not run.is_dir():
        raise ValueError(f"run {str(run)!r}: not a directory (a run's out_dir)")
    rows = read_rows(run / "metrics.jsonl")
    config_file = run / "config.yaml"
    if not rows and not config_file.is_file():
        raise ValueError(f"run {str(run)!r}: no metrics.jsonl or config.yaml (not a run's out_dir)")
    cfg = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    trained = [r for r in rows if r["iter"] >= 0]
    evals = [r for r in rows if metric in r]
    best = max(evals, key=lambda r: r[metric], default=None)
    ema = [r for r in rows if metric.replace("eval_", "eval_ema_", 1) in r]
    diversity = [r["eval_diversity"] for r in rows if "eval_diversity" in r]
    moved = _prompt_moves(read_rows(run / "eval_prompts.jsonl"), metric)
    seconds = [sum(v for k, v in r.items() if k.startswith("time_")) for r in trained]
    peaks = [r["cuda_peak_gib"] for r in trained if "cuda_peak_gib" in r]
    kv = [r["rollout_cache_mib"] for r in trained if "rollout_cache_mib" in r]
    env = read_rows(run / "environment.jsonl")[-1:]  # the latest start's
    where = None
    if env:
        gpu = env[0].get("gpu")
        where = f"{env[0].get('ranks', 1)} x {gpu['name'] if gpu else env[0].get('device')}"
    return {
        "run": str(run),
        "where": where,
        "iterations": trained[-1]["iter"] + 1 if trained else 0,
        "of": cfg.get("iterations"),
        "metric": metric,
        "first": evals[0][metric] if evals else None,
        "first_iter": evals[0]["iter"] if evals else None,
        "best": best[metric] if best else None,
        "best_iter": best["iter"] if best else None,
        "last": evals[-1][metric] if evals else None,
        "last_iter": evals[-1]["iter"] if evals else None,
        "ema_last": ema[-1][metric.replace("eval_", "eval_ema_", 1)] if ema else None,
        "diversity_first": diversity[0] if diversity else None,
        "diversity_last": diversity[-1] if diversity else None,
        "prompts_rose": sum(d > 0 for d, _ in moved) if moved else None,
        "prompts": len(moved) if moved else None,
        # the share of rollout groups that trained (the others' branches tied)
        "trained_groups": (
            sum(r["valid_groups"] for r in trained) / sum(r["groups"] for r in trained)
            if trained and all("groups" in r for r in trained)
            else None
        ),
        "skipped_steps": sum(r.get("skipped_steps", 0) for r in trained),
        "seconds_per_iteration": sum(seconds) / len(seconds) if seconds else None,
        "cuda_peak_gib": max(peaks) if peaks else None,
        "rollout_cache_mib": max(kv) if kv else None,  # a rollout's KV pages, the largest
    }


def table(rows: list[dict]) -> str:
    """The runs' rows as a Markdown table. Iterations count as the metrics do: ``@-1`` is the
    evaluation before training, ``@9`` the one after the tenth iteration."""

    def num(x: float | None, fmt: str = ".4f") -> str:
        return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)

    def at(x: float | None, it: int | None) -> str:
        return "" if x is None else f"{num(x)} @{it}"

    metric = rows[0]["metric"] if rows else "eval_reward"
    head = [
        "run",
        "on",
        "iterations",
        f"{metric} first",
        "best",
        "last",
        "EMA last",
        "diversity",
        "prompts rose",
        "groups trained",
        "skipped steps",
        "s / iteration",
        "KV MiB",
        "peak GiB",
    ]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for r in rows:
        done = f"{r['iterations']}" + (f" / {r['of']}" if r["of"] is not None else "")
        div = ""
        if r["diversity_first"] is not None:
            div = f"{num(r['diversity_first'], '.3f')} -> {num(r['diversity_last'], '.3f')}"
        rose = "" if r["prompts"] is None else f"{r['prompts_rose']} / {r['prompts']}"
        share = "" if r["trained_groups"] is None else f"{100 * r['trained_groups']:.0f} %"
        cells = [
            r["run"],
            r["where"] or "",
            done,
            at(r["first"], r["first_iter"]),
            at(r["best"], r["best_iter"]),
            at(r["last"], r["last_iter"]),
            num(r["ema_last"]),
            div,
            rose,
            share,
            str(r["skipped_steps"]),
            num(r["seconds_per_iteration"], ".1f"),
            num(r.get("rollout_cache_mib"), ".1f"),
            num(r["cuda_peak_gib"], ".1f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def prompt_table(runs: list[Path], metric: str = "eval_reward") -> str:
    """A Markdown table of each held-out prompt's ``metric``: at the first run's first evaluation
    (``before``: before training, for a new run), then at each run's last evaluation."""
    logs = [read_rows(run / "eval_prompts.jsonl") for run in runs]
    if not logs[0]:
        raise ValueError(f"run {str(runs[0])!r}: no eval_prompts.jsonl (an older kvpo's run?)")

    def at(rows: list[dict], last: bool) -> dict[str, float]:
        its = [r["iter"] for r in rows if metric in r]
        it = (max if last else min)(its, default=None)
        return {str(r["prompt"]): r[metric] for r in rows if r["iter"] == it and metric in r}

    columns = [at(logs[0], last=False)] + [at(rows, last=True) for rows in logs]
    prompts = list(dict.fromkeys(p for c in columns for p in c))
    head = ["prompt", "before", *(str(run) for run in runs)]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for p in prompts:
        cells = [f"{c[p]:.4f}" if p in c else "" for c in columns]
        lines.append("| " + " | ".join([p.replace("|", "\\|"), *cells]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m kvpo.summary", description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="a run's out_dir")
    ap.add_argument(
        "--metric", default="eval_reward", help="the held-out metric to compare (eval_path, ...)"
    )
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    ap.add_argument(
        "--prompts",
        action="store_true",
        help="also a table of each held-out prompt's metric: before, then each run's last",
    )
    args = ap.parse_args(argv)
    if not args.metric.startswith("eval_"):
        raise SystemExit(f"error: --metric {args.metric!r}: a held-out metric, eval_...")
    try:
        rows = [summarize(run, args.metric) for run in args.runs]
        if all(row["first"] is None for row in rows):  # a typo, not a metric a run lacks
            logged = {k for run in args.runs for r in read_rows(run / "metrics.jsonl") for k in r}
            held_out = sorted(k for k in logged if k.startswith("eval_"))
            raise ValueError(f"--metric {args.metric!r}: no run logged it; they logged {held_out}")
        per = prompt_table(args.runs, args.metric) if args.prompts else None
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(rows, indent=1) if args.json else table(rows))
    if per is not None:
        print("\n" + per)
    return rows


if __name__ == "__main__":
    main()
