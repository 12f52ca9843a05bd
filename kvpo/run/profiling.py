"""A ``torch.profiler`` trace of one training iteration (``--profile_iteration N``), to see where
an iteration's time goes: which ops, kernels and stages, on the CPU and the GPU."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function


class IterationProfiler:
    """Traces iteration ``iteration`` (none if < 0) of this rank: ``out/profile/iter_N_rank_R.json``
    (open in Perfetto or chrome://tracing) and ``.txt``, the ops by their own time. Call
    :meth:`step` as each iteration starts and :meth:`close` after the last."""

    def __init__(self, iteration: int, out: Path, rank: int, device: torch.device) -> None:
        self.iteration, self.out, self.rank = iteration, out / "profile", rank
        self.activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            self.activities.append(ProfilerActivity.CUDA)
        self._prof: profile | None = None
        self._label: record_function | None = None

    def step(self, it: int) -> None:
        """Iteration ``it`` starts: the trace of the previous one is written, this one's begun."""
        self.close()
        if it == self.iteration:
            self._prof = profile(activities=self.activities, record_shapes=True)
            self._prof.__enter__()
            self._label = record_function(f"kvpo iteration {it}")
            self._label.__enter__()

    def close(self) -> None:
        """Stop and write the trace under way, if any."""
        if self._prof is None:
            return
        self._label.__exit__(None, None, None)
        self._prof.__exit__(None, None, None)
        self.out.mkdir(parents=True, exist_ok=True)
        stem = self.out / f"iter_{self.iteration}_rank_{self.rank}"
        self._prof.export_chrome_trace(str(stem.with_suffix(".json")))
        by = "self_device_time_total" if len(self.activities) > 1 else "self_cpu_time_total"
        # whole names: the default width cuts the autograd nodes' (``...GeneratedBackwardFor_kvpo_...``)
        table = self._prof.key_averages().table(
            sort_by=by, row_limit=40, max_name_column_width=None
        )
        stem.with_suffix(".txt").write_text(table + "\n")
        self._prof = self._label = None
