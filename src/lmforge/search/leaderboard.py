"""The trials of a study as rows: ``DIR/leaderboard.csv`` and the live progress table.

Rows are ranked: finished trials by the primary objective (validation loss), then pruned trials by their
last reported loss, then failed ones. With several objectives the Pareto front is marked (``pareto``).
"""

from __future__ import annotations

import csv
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from optuna.trial import TrialState

from lmforge.search.budget import Fidelity, format_count

_BASE_COLUMNS = [
    "rank",
    "trial",
    "state",
    "pareto",
    "val_loss",
    "params",
    "latency_ms",
    "tokens",
    "rung",
    "tokens_trained",
    "duration_s",
    "family",
    "retry_of",
    "note",
]
_KEY_PARAMS = ("model.family", "model.d_model", "model.n_layer", "optim.lr")


def _state(t: Any) -> str:
    return t.state.name.lower()


def _last_value(t: Any) -> float:
    if t.values:
        return float(t.values[0])
    if t.intermediate_values:
        return float(t.intermediate_values[max(t.intermediate_values)])
    v = t.user_attrs.get("val_loss")
    return float(v) if v is not None else math.nan


def rows(study: Any, objectives: list[str], fid: Fidelity | None = None) -> list[dict[str, Any]]:
    """One dict per trial (waiting ones and grid overflows left out), ranked."""
    trials = [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state != TrialState.WAITING and not t.user_attrs.get("discarded")
    ]
    pareto = set()
    if len(objectives) > 1:
        pareto = {t.number for t in study.best_trials}
    order = {"complete": 0, "running": 1, "pruned": 2, "fail": 3}

    def key(t: Any) -> tuple[int, float, int]:
        v = _last_value(t)
        return order.get(_state(t), 4), v if math.isfinite(v) else math.inf, t.number

    out = []
    for rank, t in enumerate(sorted(trials, key=key), start=1):
        ua = t.user_attrs
        tokens = int(ua.get("tokens", 0) or 0)
        row: dict[str, Any] = {
            "rank": rank,
            "trial": t.number,
            "state": _state(t),
            "pareto": t.number in pareto,
            "val_loss": _fmt(_last_value(t)),
            "params": ua.get("params"),
            "latency_ms": _fmt(ua.get("latency_ms")),
            "tokens": tokens,
            "rung": fid.rung_of(tokens) if fid is not None and tokens else None,
            "tokens_trained": ua.get("tokens_trained", 0),
            "duration_s": ua.get("duration_s"),
            "family": ua.get("family"),
            "retry_of": (t.system_attrs.get("retry_history") or [None])[-1],
            "note": ua.get("fail_reason") or ua.get("stopped") or ua.get("adjusted") or "",
        }
        for name, value in t.params.items():
            row[name] = value
        out.append(row)
    return out


def _fmt(v: Any) -> Any:
    if v is None:
        return None
    v = float(v)
    return round(v, 6) if math.isfinite(v) else v


def write_csv(table: list[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    params = sorted({k for r in table for k in r if k not in _BASE_COLUMNS})
    columns = _BASE_COLUMNS + params
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in table:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------------- progress table
def format_table(table: list[dict[str, Any]], header: str, max_rows: int = 12) -> str:
    """Running trials, then the best finished ones, then the latest stopped ones (at most ``max_rows``)."""
    running = [r for r in table if r["state"] == "running"]
    done = [r for r in table if r["state"] == "complete"]
    stopped = sorted((r for r in table if r["state"] in ("pruned", "fail")), key=lambda r: -r["trial"])
    keep = running + done[: max(3, max_rows - len(running) - 3)]
    keep += stopped[: max(0, max_rows - len(keep))]
    counts = {s: sum(r["state"] == s for r in table) for s in ("running", "complete", "pruned", "fail")}
    keys = [k for k in _KEY_PARAMS if any(k in r for r in table)]
    if not keys:
        keys = sorted({k for r in table for k in r if k not in _BASE_COLUMNS})[:4]
    cols = ["trial", "state", *keys, "rung", "tokens", "val_loss", "params"]
    lines = [header, "  ".join(c.split(".")[-1][:10].rjust(10) for c in cols) + "  note"]
    for r in keep:
        cells = []
        for c in cols:
            v = r.get(c)
            if c in ("tokens", "params") and isinstance(v, (int, float)) and v:
                v = format_count(v)
            elif isinstance(v, float):
                v = f"{v:.4g}"
            cells.append(("" if v is None else str(v))[:10].rjust(10))
        lines.append("  ".join(cells) + "  " + str(r.get("note") or "")[:60])
    lines.append(
        f"{counts['complete']} finished, {counts['pruned']} pruned, {counts['fail']} failed, "
        f"{counts['running']} running"
    )
    return "\n".join(lines)


class LiveTable:
    """Reprints the table to ``stream`` at most every ``interval`` seconds."""

    def __init__(
        self,
        study: Any,
        objectives: list[str],
        fid: Fidelity | None,
        header: Callable[[], str],
        interval: float = 15.0,
        stream: TextIO | None = None,
        enabled: bool = True,
    ) -> None:
        self.study = study
        self.objectives = objectives
        self.fid = fid
        self.header = header
        self.interval = interval
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self._last = 0.0

    def maybe_print(self, force: bool = False) -> None:
        if not self.enabled or (not force and time.time() - self._last < self.interval):
            return
        self._last = time.time()
        text = format_table(rows(self.study, self.objectives, self.fid), self.header())
        print("\n" + text, file=self.stream, flush=True)
