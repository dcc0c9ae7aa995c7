"""A pipeline's ledger clock: while a step runs, a daemon thread calls ``tick`` every
:data:`LEDGER_SAVE_S` seconds (it charges the time spent and saves the ledger), so a run killed with SIGKILL
has charged almost all it spent. Used by ``lmforge tune`` (:mod:`lmforge.search.pipeline`) and ``tune --task``
(:mod:`lmforge.search.task_run`)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

LEDGER_SAVE_S = 2.0
"""Seconds between two saves of a pipeline's ledger while a step runs."""


@contextlib.contextmanager
def ticking(tick: Callable[[], None], on_error: Callable[[OSError], None], *, name: str,
            interval_s: float = LEDGER_SAVE_S) -> Iterator[None]:
    """Call ``tick()`` every ``interval_s`` seconds from a daemon thread while inside; an ``OSError`` of it
    (a full or read-only disk) goes to ``on_error`` and the clock goes on."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval_s):
            try:
                tick()
            except OSError as err:
                on_error(err)

    thread = threading.Thread(target=loop, daemon=True, name=name)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)
