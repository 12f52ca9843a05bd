"""Stopping a run cleanly when a scheduler asks, or when its time is up: a checkpoint, then exit,
instead of losing the iterations since the last save.

SIGTERM (preemption, ``scancel``, ``kill``) and SIGUSR1 (SLURM's ``--signal=USR1@<seconds>``
before a time limit) no longer kill the trainer: it finishes or drops the iteration under way
(see :func:`kvpo.train.train`), saves, and exits with status ``128 + signal`` so that a job
script tells it from a finished run (0). A second signal stops it at once, as before.
``max_minutes`` stops a run before an iteration that would end past that time (exit status 0,
as other trainers' time limits).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType

from . import distributed

STOP_SIGNALS = ("SIGTERM", "SIGUSR1")
TIME_UP = 1 << 8  # above every signal number: a rank out of time outranks a signal


class StopSignals:
    """While entered, the signals of ``names`` ask the run to stop instead of killing it;
    :meth:`requested` reads the request. Outside the main thread (where Python cannot take
    signals) it changes nothing."""

    def __init__(self, names: tuple[str, ...] = STOP_SIGNALS) -> None:
        self.names = names
        self.received: signal.Signals | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in self.names:
                sig = getattr(signal, name, None)  # SIGUSR1 is POSIX only
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            if handler is not None:  # None: a handler set outside Python, not restorable
                signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:  # asked twice: what the signal did before kvpo took it
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signal.Signals(signum)
        print(
            f"kvpo: got {self.received.name}: saving a checkpoint and stopping at the next safe "
            f"point, before or after this iteration's update (send {self.received.name} again to "
            "stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def requested(self, late: bool = False) -> str | None:
        """Why the run stops now: the name of the signal that asked this rank or any rank to
        (``"SIGTERM"``, ``"SIGUSR1"``), ``"max_minutes"`` when this rank or any is ``late``
        for its time limit, or None. Under ``torchrun`` a collective: every rank calls it at the
        same points, so all stop alike."""
        code = 0 if self.received is None else int(self.received)
        code = distributed.max_over_ranks(code + (TIME_UP if late else 0))
        if code >= TIME_UP:
            return "max_minutes"
        return signal.Signals(code).name if code else None
