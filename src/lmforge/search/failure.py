"""Why a trial failed, in one line for the leaderboard (``fail_reason``): the one wording shared by the
objective, evolution children and Ray trials."""

from __future__ import annotations

import torch

from lmforge.config import LmforgeError


def failure_reason(err: BaseException) -> str:
    """A user-facing error as is, out-of-memory marked as such (the CUDA cache is emptied so the next trial
    starts clean), anything else with its type."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower():
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return f"out of memory: {text[:300]}"
    if isinstance(err, LmforgeError):
        return text[:500]
    return f"{type(err).__name__}: {text[:400]}"
