"""The loop's progress bar (on stderr, so stdout stays for results and samples)."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm
from tqdm.std import tqdm as ProgressBar  # the base class of every tqdm front end, for annotations


def progress_bar(total: int | None, enabled: bool, initial: int) -> ProgressBar:
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                mininterval=0.5, file=sys.stderr, leave=True)
