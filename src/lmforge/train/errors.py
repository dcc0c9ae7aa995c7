"""The error type of the training package (layer 3).

On its own so that the loop and the adapters beside it (device, data-parallel, data source, evaluation)
can all raise it without importing the loop.
"""

from __future__ import annotations

from lmforge.config import LmforgeError


class TrainingError(LmforgeError):
    """Training cannot go on (diverged, nothing to train on, run directory in the way...)."""
