"""Which directories a run may write into: never a user's folder that is not an lmforge run."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from lmforge.config import LmforgeError

RUN_MARKERS = ("checkpoints", "best", "pipeline.json", "metrics.jsonl", "task.json", "trials", "final")
"""Entries that only an lmforge run writes; a directory holding one of them is a run (or a tune run) and may
be resumed. ``config.yaml`` alone proves nothing: users keep their own."""
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


def describe_os_error(err: OSError, path: str | Path) -> str:
    """One line for an OS error while writing a run (disk full, read-only, permissions)."""
    if err.errno == errno.ENOSPC:
        return f"no space left on the device while writing {path}; free some space and resume (--train.resume auto)"
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write {path}: {os.strerror(err.errno)}"
    return f"cannot write {path}: {err.strerror or err}"
