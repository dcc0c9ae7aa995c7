"""The error type of the training package (layer 3).

On its own so that the loop and the adapters beside it (device, data-parallel, data source, evaluation)
can all raise it without importing the loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from lmforge.config import LmforgeError
from lmforge.runs import describe_os_error


class TrainingError(LmforgeError):
    """Training cannot go on (diverged, nothing to train on, run directory in the way...)."""


@contextlib.contextmanager
def write_errors(path: Path) -> Iterator[None]:
    """Turn an OS error while writing ``path`` (disk full, read-only, permissions) into a one-line
    :class:`TrainingError`; the atomic writers leave the earlier files of the run intact."""
    try:
        yield
    except OSError as err:
        raise TrainingError(describe_os_error(err, path)) from None
