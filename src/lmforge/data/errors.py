"""The error type of the data layer: one class that every data module raises (sources, demo, tokenizer,
dataset, sampler).

It lives on its own so that those modules depend on it and not on each other: ``demo`` once imported it
from ``sources`` inside a function because ``sources`` imports ``demo``.
"""

from __future__ import annotations

from lmforge.config import LmforgeError


class DataError(LmforgeError, ValueError):
    """A user-facing data problem; the message names the source (file, line, byte offset or field)."""
