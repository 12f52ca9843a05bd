"""KVPO on the shipped base generator raises the reward of held-out prompts (fixed seed)."""

import pytest

from kvpo.run.config import build_config
from kvpo.trainer import train


@pytest.mark.slow
def test_short_run_raises_held_out_reward(tmp_path):
    # The recipe that gains most on three seeds (benchmarks/RESULTS.md: sample routing keeping the
    # nearest frame of a 4-frame local window), shortened to 10 iterations of 4 training prompts x
    # G = 6 branches (about 2 minutes on 2 cores). The 16 evaluation prompts' scenes are never
    # trained or pretrained on; each is sampled with 4 fixed noises, so the figure is a mean over
    # 64 deployment-time videos.
    cfg = build_config(
        {
            "out_dir": str(tmp_path),
            "local_window": 4,
            "routing": "sample",
            "recent_frames": 1,
            "iterations": 10,
            "eval_every": 10,
            "samples": False,
            "progress": False,
            "threads": 2,
            "seed": 0,
        }
    )
    hist = train(cfg).history
    before, after = hist[0], hist[-1]
    assert before["iter"] == -1 and after["iter"] == 9
    # Measured on this seed: 1.126 -> 1.177 (alignment + path), driven by the path (0.521 ->
    # 0.573): the objects move more as asked.
    assert after["eval_reward"] > before["eval_reward"] + 0.03
    assert after["eval_path"] > before["eval_path"] + 0.03
