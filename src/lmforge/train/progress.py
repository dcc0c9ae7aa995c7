"""The loop's progress bar (on stderr, so stdout stays for results and samples)."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress_bar(total: int | None, enabled: bool, initial: int) -> tqdm:
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                mininterval=0.5, file=sys.stderr, leave=True)
