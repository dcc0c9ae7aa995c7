"""Which directories a run may write into: never a user's folder that is not an lmforge run."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from lmforge.atomic import atomic_write_text
from lmforge.config import LmforgeError
from lmforge.runs.lock import run_lock

RUN_FILE = "lmforge-run.json"
"""Written first into every new run directory (:func:`mark_run`): the proof that lmforge made it."""
RUN_MARKERS = (RUN_FILE, "checkpoints", "best", "pipeline.json", "trials", "final")
"""Entries that only an lmforge run writes; a directory holding one of them is a run (or a tune run) and may
be resumed. Names users also give their own files prove nothing: ``config.yaml`` (users keep their own
configs), ``metrics.jsonl`` and ``task.json`` (a user's folder with such files was appended to, #14.8). A run
made before :data:`RUN_FILE` existed is still recognised by its ``checkpoints``/``best``."""
IGNORED = frozenset({".DS_Store", ".train.lock", ".tune.lock", ".finetune.lock"})


class OutDirError(LmforgeError, ValueError):
    """``--out`` cannot be used (a file, read-only, or a non-empty folder that is not an lmforge run)."""


def check_out_dir(out: str | Path) -> Path:
    """Return ``out`` as a Path when a run may write there: it does not exist yet (its parent can be
    created), is empty, or already holds an lmforge run. Otherwise raise :class:`OutDirError` with one line."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutDirError(f"--out {out} is a file, not a directory")
    if out.is_dir():
        entries = {p.name for p in out.iterdir()} - IGNORED
        if entries and not entries & set(RUN_MARKERS):
            shown = ", ".join(sorted(entries)[:5]) + (", ..." if len(entries) > 5 else "")
            raise OutDirError(
                f"--out {out} is a non-empty directory that is not an lmforge run ({shown}); "
                "choose a new or empty directory"
            )
        if not os.access(out, os.W_OK | os.X_OK):
            raise OutDirError(f"--out {out} is not writable")
        return out
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and (not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK)):
        raise OutDirError(f"--out {out} cannot be created: {parent} is not a writable directory")
    return out


def mark_run(out: str | Path, command: str) -> None:
    """Write ``OUT/lmforge-run.json`` unless it exists: call it before anything else is written into ``out``
    (after :func:`check_out_dir` and under the run lock), so that a half-started run is still a run."""
    path = Path(out) / RUN_FILE
    if path.exists():
        return
    atomic_write_text(path, json.dumps({"format": 1, "command": command, "created": time.time()}) + "\n")


@contextlib.contextmanager
def claim_run_dir(out: str | Path, command: str, *, writer: bool = True) -> Iterator[Path]:
    """``lmforge train``/``finetune``'s hold on ``--out`` for the whole run: :func:`check_out_dir` before
    anything is written, then (``writer``: the one process that writes the run, rank 0 under torchrun) the
    ``train`` run lock, so that two runs never interleave in one directory, and :func:`mark_run`.
    Every refusal is an :class:`OutDirError` (or ``RunLockedError``) of one line."""
    if not writer:
        # the other ranks do not look: the launcher checked ``out`` before it started them, and rank 0 may be
        # writing its first file there right now (a half-written temporary name is no run marker yet)
        yield Path(out)
        return
    out = check_out_dir(out)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(run_lock(out, "train"))
            mark_run(out, command)
        except OSError as err:
            raise OutDirError(describe_os_error(err, err.filename or out)) from None
        yield out


def describe_os_error(err: OSError, path: str | Path) -> str:
    """One line for an OS error while writing a run (disk full, read-only, permissions)."""
    if err.errno == errno.ENOSPC:
        return f"no space left on the device while writing {path}; free some space and resume (--train.resume auto)"
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write {path}: {os.strerror(err.errno)}"
    return f"cannot write {path}: {err.strerror or err}"
