"""The report of a task run (``lmforge tune --task``): test metrics beside the baselines, the steps' choices
(pretraining, fine-tuning search and re-ranking, decoding settings) and example predictions, as one HTML file."""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any

from lmforge.atomic import atomic_write_text
from lmforge.report.run import read_json

REPORT_FILE = "report.html"
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1150px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f4f4f4}tr.model td{background:#fff3d6}.note{color:#777;font-style:italic}
td.text{max-width:380px;white-space:pre-wrap;word-break:break-word}
"""


def is_task_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a task run (its ``pipeline.json`` or ``summary.json`` says ``kind: task``)."""
    return any((read_json(run_dir / f) or {}).get("kind") == "task" for f in ("summary.json", "pipeline.json"))


def _esc(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return html.escape(f"{v:.4g}")
    return html.escape(str(v))


def _table(rows: list[dict[str, Any]], cls: dict[int, str] | None = None, text_cols: tuple[str, ...] = ()) -> str:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    out = ["<table><tr>" + "".join(f"<th>{_esc(c)}</th>" for c in cols) + "</tr>"]
    for i, r in enumerate(rows):
        attr = f" class='{cls[i]}'" if cls and i in cls else ""
        out.append(
            f"<tr{attr}>"
            + "".join(f"<td{' class=text' if c in text_cols else ''}>{_esc(r.get(c))}</td>" for c in cols)
            + "</tr>"
        )
    return "".join(out) + "</table>"


def task_section(summary: dict[str, Any]) -> str:
    """The task part of a report: test metrics beside the baselines, then example predictions."""
    key = summary.get("primary_metric")
    rows = [{"system": "model", **{k: v for k, v in (summary.get("test") or {}).items()}}]
    rows += [{"system": name, **m} for name, m in (summary.get("baselines") or {}).items()]
    parts = [
        f"<h2>Test records ({(summary.get('records') or {}).get('test')}, never read by the search)</h2>",
        f"<p>ranked by <b>{_esc(key)}</b>; the model "
        + ("beats every baseline" if summary.get("beats_baselines") else "does <b>not</b> beat every baseline")
        + "</p>",
        _table(rows, {0: "model"}),
        "<h2>Example predictions</h2>",
        _table(summary.get("examples") or [], text_cols=tuple((summary.get("examples") or [{}])[0].keys())),
    ]
    return "\n".join(parts)


def build_task_report(run_dir: str | Path) -> Path:
    """Write ``DIR/report.html`` for the task run in ``run_dir`` and return its path."""
    root = Path(run_dir).expanduser().resolve()
    summary = read_json(root / "summary.json")
    state = read_json(root / "pipeline.json") or {}
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>lmforge task report: {_esc(root.name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>lmforge task report: {_esc(root.name)} ({_esc(state.get('task'))})</h1>",
        f"<p class='note'>generated {time.strftime('%Y-%m-%d %H:%M:%S')}; rebuild with "
        f"<code>lmforge report {_esc(root)}</code></p>",
        "<h2>Steps</h2>",
    ]
    steps = state.get("steps") or {}
    spent = state.get("spent_s") or {}
    parts.append(
        _table(
            [
                {"step": s, "status": (v or {}).get("status"), "spent_s": spent.get(s),
                 "detail": ", ".join(f"{k}={_brief(x)}" for k, x in (v or {}).items()
                                     if k not in ("status", "tried", "rerank", "candidates"))}
                for s, v in steps.items()
            ],
            text_cols=("detail",),
        )
    )
    split = state.get("split") or {}
    parts.append(
        f"<p>records: {len(split.get('train') or [])} train / {len(split.get('val') or [])} validation / "
        f"{len(split.get('test') or [])} test (split seed {_esc(split.get('seed'))}); "
        f"data {_esc((state.get('plan') or {}).get('data'))}</p>"
    )
    pretrained = ((steps.get("pretrain") or {}).get("candidates")) or {}
    if pretrained:
        parts.append("<h2>Pretrained starts (one per tokenizer candidate)</h2>")
        parts.append(_table([{"tokenizer": n, **{k: _brief(x) for k, x in v.items()}} for n, v in pretrained.items()]))
    rerank = (steps.get("search") or {}).get("rerank") or {}
    if rerank:
        parts.append("<h2>Fine-tuning search: re-ranked by the task metric on validation records</h2>")
        parts.append(_table([{"trial": n, **v} for n, v in rerank.items()]))
    tried = (steps.get("decode") or {}).get("tried") or {}
    if tried:
        parts.append("<h2>Decoding settings tried (validation)</h2>")
        parts.append(_table([{**v["settings"], "score": v["score"]} for v in tried.values()]))
    if summary is not None and summary.get("kind") == "task":
        parts.append(task_section(summary))
    else:
        parts.append("<p class='note'>no test evaluation yet (the run has not reached its last step)</p>")
    parts.append("</body></html>\n")
    out = root / REPORT_FILE
    atomic_write_text(out, "\n".join(parts))
    return out


def _brief(v: Any) -> str:
    text = f"{v:.4g}" if isinstance(v, float) else str(v)
    return text if len(text) <= 120 else text[:117] + "..."
