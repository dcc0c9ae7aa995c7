"""SIGTERM as a request, not a kill: the loop finishes the current step, saves a checkpoint and returns.

Schedulers (Slurm, Kubernetes, torchrun's launcher) send SIGTERM before they kill; catching it is what
lets a preempted run resume bit for bit.
"""

from __future__ import annotations

import faulthandler
import signal
import sys
from types import FrameType
from typing import Any

# a launcher (torchrun's, Kubernetes) kills 30 s after its SIGTERM: a loop still running well before then is
# stuck somewhere, and its stacks on stderr say where
STUCK_AFTER_S = 20.0


class TerminateRequest:
    """While entered, SIGTERM sets :attr:`requested` instead of ending the process; if the process is still
    inside ``with`` ``stuck_after_s`` seconds later, every thread's stack goes to stderr (once)."""

    def __init__(self, stuck_after_s: float = STUCK_AFTER_S) -> None:
        self.requested = False
        self.stuck_after_s = stuck_after_s
        self._armed = False
        self._previous: Any = None

    def __enter__(self) -> TerminateRequest:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, nothing to restore
            self._previous = None
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        if not self._armed:
            self._armed = True
            faulthandler.dump_traceback_later(self.stuck_after_s, exit=False, file=sys.stderr)

    def __exit__(self, *exc: object) -> None:
        if self._armed:
            faulthandler.cancel_dump_traceback_later()
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
