"""Keep the trials' checkpoints under a disk cap (``--disk-cap``).

When the trial directories together exceed the cap, checkpoints are deleted (metrics and config stay, so the
leaderboard and report are unaffected) in this order: failed and pruned trials, oldest first; then finished
trials, worst first. The ``keep_best`` best finished trials (and any trial on the Pareto front) and every
trial that is running or waiting to be retried keep theirs. A deleted trial gets a ``CHECKPOINTS_DELETED``
file, because a finished Optuna trial can no longer take attributes.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any

from optuna.trial import TrialState

MARKER = "CHECKPOINTS_DELETED"


def dir_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:  # removed meanwhile
                pass
    return total


def _checkpoint_dirs(run: Path) -> list[Path]:
    """``checkpoints/`` and ``best/`` of a trial directory, and of its cross-validation folds."""
    found = []
    for d in [run, *sorted(run.glob("fold-*"))]:
        found += [d / "checkpoints", d / "best"]
    return [p for p in found if p.exists()]


def enforce_disk_cap(study: Any, run_dir: Path, cap: int | None, keep_best: int = 3) -> list[int]:
    """Delete checkpoints of stopped trials until ``run_dir/trials`` fits ``cap`` bytes; return the trial
    numbers whose checkpoints went."""
    if cap is None:
        return []
    root = Path(run_dir) / "trials"
    if not root.is_dir():
        return []
    trials = study.get_trials(deepcopy=False)
    active = {t.user_attrs.get("run_dir") for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    complete.sort(key=lambda t: t.values[0] if t.values and math.isfinite(t.values[0]) else math.inf)
    protected = {t.user_attrs.get("run_dir") for t in complete[:keep_best]} | active
    if len(study.directions) > 1:
        protected |= {t.user_attrs.get("run_dir") for t in study.best_trials}
    sizes = {p.name: dir_size(p) for p in root.iterdir() if p.is_dir()}
    total = sum(sizes.values())
    if total <= cap:
        return []
    stopped = [t for t in trials if t.state in (TrialState.FAIL, TrialState.PRUNED)]
    order = stopped + list(reversed(complete[keep_best:]))
    deleted = []
    for t in order:
        rel = t.user_attrs.get("run_dir")
        if total <= cap:
            break
        if not rel or rel in protected:
            continue
        run = Path(run_dir) / rel
        dirs = _checkpoint_dirs(run)
        if not dirs:
            continue
        before = dir_size(run)
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
        (run / MARKER).write_text("checkpoints deleted under --disk-cap\n", encoding="utf-8")
        total -= before - dir_size(run)
        deleted.append(t.number)
    return deleted
