"""``OUT/metrics.jsonl``: one JSON record per evaluation, appended and fsynced (the one reader and writer)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lmforge.atomic import atomic_write_text
from lmforge.config import LmforgeError

METRICS_FILE = "metrics.jsonl"


class MetricsError(LmforgeError, RuntimeError):
    """A ``metrics.jsonl`` line in the middle of the file is not JSON (not a torn last line)."""


def append_metrics(out_dir: str | Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line to ``OUT/metrics.jsonl`` (flushed and fsynced)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, default=str) + "\n"
    with open(out / METRICS_FILE, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_metrics(out_dir: str | Path, *, lenient: bool = False) -> list[dict[str, Any]]:
    """The records of ``OUT/metrics.jsonl`` (``[]`` when there is none).

    A torn last line (a crash while appending) is skipped. A bad line elsewhere raises
    :class:`MetricsError`, unless ``lenient`` (readers of a run that may be writing, such as the report),
    which skips every line that is not a JSON object."""
    path = Path(out_dir) / METRICS_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as err:
        if lenient:
            return []
        raise MetricsError(f"cannot read {path}: {err}") from None
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if lenient or i == len(lines) - 1:
                continue
            raise MetricsError(f"{path}: line {i + 1} is not valid JSON") from None
        if isinstance(rec, dict):
            records.append(rec)
        elif not lenient:
            raise MetricsError(f"{path}: line {i + 1} is not a JSON object")
    return records


def truncate_metrics(out_dir: str | Path, step: int, *, write: bool = True) -> list[dict[str, Any]]:
    """On resume, drop the records a killed run wrote after its last checkpoint (``step``; they are
    redone) and return the kept ones; ``write=False`` only reads them (data-parallel ranks other than 0)."""
    path = Path(out_dir) / METRICS_FILE
    if not path.exists():
        return []
    kept = [r for r in read_metrics(out_dir, lenient=True) if r.get("step", 0) <= step]
    if write:
        atomic_write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in kept))
    return kept
