"""`make bench`'s CPU suites run: every benchmark once (``--benchmark-disable``: no timing rounds,
no peak-memory subprocesses), so a change that breaks one (a renamed helper, a changed table of
modes) fails CI instead of the next person who times the kernels. Each benchmark also checks its
method's result against the reference before timing it."""

import sys
from pathlib import Path

from helpers import run_ok

ROOT = Path(__file__).resolve().parents[2]


def test_cpu_benchmarks_run():
    res = run_ok(
        [
            sys.executable,
            "-m",
            "pytest",
            "benchmarks",
            "-q",
            "--benchmark-disable",
            "-p",
            "no:cacheprovider",
        ],
        cwd=ROOT,
    )
    counts = res.stdout.strip().splitlines()[-1]
    assert " passed" in counts and "failed" not in counts and "skipped" not in counts, counts
