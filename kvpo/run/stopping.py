"""Stopping a run cleanly when a scheduler asks, or when its time is up: a checkpoint, then exit,
instead of losing the iterations since the last save.

SIGTERM (preemption, ``scancel``, ``kill``), SIGUSR1 (SLURM's ``--signal=USR1@<seconds>``
before a time limit) and SIGINT (Ctrl-C) no longer kill the trainer: it finishes or drops the
iteration under way (see :func:`kvpo.trainer.train`), saves, and exits with status
``128 + signal`` so that a job script tells it from a finished run (0). A second signal (not the
echo of the first, :data:`ECHO_S`) stops it at once, as before (a second Ctrl-C raises
KeyboardInterrupt, as Python does: a notebook's kernel lives on).
``max_minutes`` stops a run before an iteration that would end past that time (exit status 0,
as other trainers' time limits).
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
import threading
import time
from types import FrameType

from kvpo.run import distributed

STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")
TIME_UP = 1 << 8  # above every signal number: a rank out of time outranks a signal
# One request often arrives twice at a rank within milliseconds: SLURM's scancel signals every
# process of the job, torchrun among them, and torchrun passes the signal on; a terminal's Ctrl-C
# reaches torchrun and its ranks alike, and torchrun passes it on. The same signal again within
# this many seconds is that echo, not a second request.
ECHO_S = 2.0


class StopSignals:
    """While entered, the signals of ``names`` ask the run to stop instead of killing it;
    :meth:`requested` reads the request. A signal the process ignores stays ignored. Outside the
    main thread (where Python cannot take signals) it changes nothing."""

    def __init__(self, names: tuple[str, ...] = STOP_SIGNALS, echo_s: float = ECHO_S) -> None:
        self.names = names
        self.echo_s = echo_s
        self.received: signal.Signals | None = None
        self._at = 0.0  # when it was received (time.monotonic)
        self._calls = itertools.count()  # calls of _handle
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in self.names:
                sig = getattr(signal, name, None)  # SIGUSR1 is POSIX only
                # A signal ignored on entry stays ignored: a shell without job control starts
                # background jobs with SIGINT ignored, so that a Ctrl-C meant for the foreground
                # command does not reach them.
                if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            if handler is not None:  # None: a handler set outside Python, not restorable
                signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # CPython runs a Python handler between bytecodes, its own too: the echo can interrupt
        # this call anywhere. next() is one C call, so exactly one call draws 0 and is the request.
        if next(self._calls) == 0:
            # _at first: until received is set, a call that interrupts this one takes itself
            # for the echo
            self._at, self.received = time.monotonic(), signal.Signals(signum)
            print(
                f"kvpo: got {self.received.name}: saving a checkpoint and stopping at the next "
                f"safe point, before or after this iteration's update (send "
                f"{self.received.name} again to stop at once)",
                file=sys.stderr,
                flush=True,
            )
            return
        if self.received is None:
            return  # it interrupted the first call: the same request, microseconds apart
        if signum == self.received and time.monotonic() - self._at < self.echo_s:
            return  # the same request, delivered twice (ECHO_S)
        # asked twice: what the signal did before kvpo took it
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def requested(self, late: bool = False) -> str | None:
        """Why the run stops now: the name of the signal that asked this rank or any rank to
        (``"SIGTERM"``, ``"SIGUSR1"``, ``"SIGINT"``), ``"max_minutes"`` when this rank or any is
        ``late`` for its time limit, or None. Under ``torchrun`` a collective: every rank calls it
        at the same points, so all stop alike."""
        code = 0 if self.received is None else int(self.received)
        code = distributed.max_over_ranks(code + (TIME_UP if late else 0))
        if code >= TIME_UP:
            return "max_minutes"
        return signal.Signals(code).name if code else None
