"""What a search run left, read for the report: ``pipeline.json``, ``summary.json`` and the study (from the
storage and name ``pipeline.json`` records, or ``DIR/study.journal``). A run that is still going or was
killed is read as far as it got; what cannot be read becomes a note."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from lmforge.config import LmforgeError
from lmforge.search.context import SearchContext
from lmforge.search.study import open_storage, quiet_optuna


class ReportError(LmforgeError):
    """The report cannot be built (no such run directory...)."""


# ------------------------------------------------------------------------------------------ run data
@dataclass
class ReportRun:
    run_dir: Path
    state: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    study: Any = None
    ctx: Any = None
    trials: list[Any] = field(default_factory=list)
    objectives: list[str] = field(default_factory=lambda: ["val_loss"])
    notes: list[str] = field(default_factory=list)
    steps: dict[str, Any] = field(default_factory=dict)
    """Pipeline step -> status, from ``pipeline.json`` or the newer ``summary.json``."""

    @property
    def complete(self) -> list[Any]:
        return [
            t
            for t in self.trials
            if t.state == TrialState.COMPLETE and t.values and all(math.isfinite(v) for v in t.values)
        ]

    def best(self) -> Any:
        done = self.complete
        return min(done, key=lambda t: (t.values[0], t.number)) if done else None


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def load_run(run_dir: Path) -> ReportRun:
    run = ReportRun(
        run_dir=run_dir, state=read_json(run_dir / "pipeline.json"), summary=read_json(run_dir / "summary.json")
    )
    run.steps = {k: (v or {}).get("status") for k, v in ((run.state or {}).get("steps") or {}).items()}
    if isinstance((run.summary or {}).get("steps"), dict) and (
        not run.steps or _mtime(run_dir / "summary.json") >= _mtime(run_dir / "pipeline.json")
    ):  # the pipeline writes the summary (and builds this report) just before it saves its state
        run.steps = dict((run.summary or {})["steps"])
    url = (run.state or {}).get("storage")
    name = (run.state or {}).get("study_name")
    if url is None and (run_dir / "study.journal").is_file():
        url = str(run_dir / "study.journal")
    if url is None:
        run.notes.append(
            "no study found (neither pipeline.json nor study.journal): figures from trial directories only"
        )
        return run
    if "://" not in url and not Path(url).is_file():
        run.notes.append(f"the study storage {url} does not exist (yet)")
        return run
    try:
        quiet_optuna()
        storage = open_storage(url)
        if name is None:
            names = optuna.get_all_study_names(storage)
            if len(names) != 1:
                run.notes.append(f"{url} holds {len(names)} studies and no pipeline.json names one")
                return run
            name = names[0]
        run.study = optuna.load_study(study_name=name, storage=storage)
        run.trials = run.study.get_trials(deepcopy=False)
    except Exception as err:  # a storage that cannot be read must not stop the report
        run.notes.append(f"cannot read the study {name!r} in {url}: {type(err).__name__}: {err}")
        return run
    raw_ctx = run.study.user_attrs.get("lmforge")
    if raw_ctx:
        try:
            run.ctx = SearchContext.from_dict(raw_ctx)
            run.objectives = list(run.ctx.objectives)
        except Exception:  # an older or foreign context: the report still works without it
            run.ctx = None
    n_obj = len(run.study.directions)
    if len(run.objectives) != n_obj:
        run.objectives = ["val_loss", *[f"objective {i}" for i in range(1, n_obj)]][:n_obj]
    return run
