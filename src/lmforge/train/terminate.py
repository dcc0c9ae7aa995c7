"""SIGTERM as a request, not a kill: the loop finishes the current step, saves a checkpoint and returns.

Schedulers (Slurm, Kubernetes, torchrun's launcher) send SIGTERM before they kill; catching it is what
lets a preempted run resume bit for bit.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any


class TerminateRequest:
    """While entered, SIGTERM sets :attr:`requested` instead of ending the process."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> TerminateRequest:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, nothing to restore
            self._previous = None
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
