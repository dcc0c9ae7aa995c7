"""One writer per run directory: an advisory ``flock`` on a hidden file, released when the process dies."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

from lmforge.config import LmforgeError


class RunLockedError(LmforgeError, RuntimeError):
    """Another lmforge process is writing this run directory."""


@contextlib.contextmanager
def run_lock(run_dir: str | Path, command: str) -> Iterator[None]:
    """Hold ``RUN_DIR/.<command>.lock`` while the block runs; a second holder fails at once with a
    message naming the directory (two writers would interleave checkpoints and ``metrics.jsonl``)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / f".{command}.lock", "a+")  # noqa: SIM115 (held open for the whole block)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise RunLockedError(f"{run_dir} is in use by another lmforge {command} process") from None
    try:
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()
