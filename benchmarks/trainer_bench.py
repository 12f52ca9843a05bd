"""The trainer on this machine: seconds per KVPO iteration by stage, and rollout memory with the
pre-window pages shared by table against copied per branch, and with the branches rolled out a
few at a time (``branches_per_pass``, ``--rollout_branches``) (G = 8).

    python -m benchmarks.trainer_bench              # prints a Markdown table
    python -m benchmarks.trainer_bench rollout-peak MODE   # one measurement, fresh process

Peak memory of a rollout is measured in a fresh process per mode (sampled resident set); the KV
page bytes are exact.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks.routed_methods import peak_rss_mib
from kvpo.generators import data
from kvpo.method.rollout import RolloutSpec, rollout
from kvpo.run.checkpoint import load_model
from kvpo.run.config import BASE_CHECKPOINT, build_config
from kvpo.trainer import train

G = 8


# rollout modes: pre-window pages shared, branches per pass (0: all), the table's label
MODES = {
    "shared": (True, 0, "shared pre-window pages"),
    "copied": (False, 0, "copied pre-window pages"),
    "passes-2": (True, 2, "shared, 2 branches per pass"),
    "passes-1": (True, 1, "shared, 1 branch per pass"),
}


def _rollout_args(mode: str):
    share, per_pass, _ = MODES[mode]
    model = load_model(BASE_CHECKPOINT).eval()
    nC = model.num_frames // model.chunk_frames
    _, prompts = data.split_prompts()
    spec = RolloutSpec(
        group_size=G,
        window=(2, 4),
        p_keep=0.5,
        share_pages=share,
        anchor=False,
        branches_per_pass=per_pass,
    )
    return model, [[p] * nC for p in prompts[:4]], spec


def rollout_peak(mode: str) -> dict:
    model, prompts, spec = _rollout_args(mode)
    ro = rollout(model, prompts, spec, torch.Generator().manual_seed(0))  # warm up
    t0 = time.perf_counter()
    peak = peak_rss_mib(lambda: rollout(model, prompts, spec, torch.Generator().manual_seed(0)), 2)
    return {
        "mode": mode,
        "peak_mib": peak,
        "kv_mib": ro.cache_bytes / 2**20,
        "seconds": (time.perf_counter() - t0) / 2,
    }


def stage_times(iterations: int = 4) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cfg = build_config(
            {
                "out_dir": out,
                "iterations": iterations,
                "group_size": G,
                "prompts_per_iter": 4,
                "eval_every": 1000,
                "save_every": 1000,
                "samples": False,
                "progress": False,
                "eval_prompts": 1,
            }
        )
        hist = [h for h in train(cfg).history if h["iter"] >= 1]  # skip the warm-up iteration
    keys = ("time_rollout", "time_reward", "time_reference", "time_replay", "time_update")
    return {k: sum(h[k] for h in hist) / len(hist) for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", nargs="?", default="table", choices=["table", "rollout-peak"])
    ap.add_argument("mode", nargs="?", default="shared", choices=list(MODES))
    args = ap.parse_args()
    if args.what == "rollout-peak":
        print(json.dumps(rollout_peak(args.mode)))
        return
    mem = {}
    for mode in MODES:
        res = subprocess.run(
            [sys.executable, "-m", "benchmarks.trainer_bench", "rollout-peak", mode],
            capture_output=True,
            text=True,
            check=True,
        )
        mem[mode] = json.loads(res.stdout.strip().splitlines()[-1])
    st = stage_times()
    total = sum(st.values())
    print(f"torch threads: {torch.get_num_threads()}")
    print("\n| stage (4 prompts x G = 8, 2 inner epochs) | seconds / iteration | share |")
    # rollout: KV-routed sampling; reward: rewards and advantages; reference: the frozen
    # reference's replay for the KL; replay: policy replay forwards (with gradients) and TVE;
    # update: PPO loss, backward, AdamW.
    print("| --- | ---: | ---: |")
    for k, v in st.items():
        print(f"| {k.removeprefix('time_')} | {v:.2f} | {v / total:.0%} |")
    print(f"| total | {total:.2f} | |")
    print("\n| rollout (4 prompts x G = 8) | KV pages MiB | peak RSS MiB | seconds |")
    print("| --- | ---: | ---: | ---: |")
    for mode, m in mem.items():
        print(
            f"| {MODES[mode][2]} | {m['kv_mib']:.1f} | {m['peak_mib']:.1f} | {m['seconds']:.2f} |"
        )


if __name__ == "__main__":
    main()
