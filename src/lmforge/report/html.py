"""The report page: overview, figures, leaderboard and sample as one self-contained HTML file (the figures
are PNG files next to it, in ``figures/``)."""

from __future__ import annotations

import html
import time
from collections import Counter
from typing import Any

from lmforge.report.figures import FIGURES_DIR
from lmforge.report.overhead import Overhead
from lmforge.report.run import ReportRun

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1150px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.82em}td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}
th{background:#f4f4f4;position:sticky;top:0}tr.best td{background:#fff3d6}tr.pareto td{font-weight:600}
.note{color:#777;font-style:italic}img{max-width:100%;border:1px solid #eee;margin:.5em 0}
pre{background:#f8f8f8;padding:1em;white-space:pre-wrap;border:1px solid #eee}
.kv td{text-align:left}.scroll{overflow:auto;max-height:640px}
"""


def _esc(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return html.escape(f"{v:.6g}")
    return html.escape(str(v))


def _overview(run: ReportRun) -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = [("run directory", run.run_dir)]
    if run.study is not None:
        storage = (run.state or {}).get("storage") or str(run.run_dir / "study.journal")
        items.append(("study", f"{run.study.study_name} in {storage}"))
        counts = Counter(t.state.name.lower() for t in run.trials)
        items.append(("trials", ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none yet"))
        items.append(("objectives", ", ".join(run.objectives)))
    if run.ctx is not None:
        items.append(("sampler / pruner", f"{run.ctx.sampler} / {run.ctx.pruner}"))
    if run.steps:
        items.append(("pipeline steps", ", ".join(f"{k}: {v}" for k, v in run.steps.items())))
    if run.state is not None:
        if (run.state.get("options") or {}).get("strategy"):
            items.append(("strategy", run.state["options"]["strategy"]))
    best = run.best()
    if best is not None:
        items.append(
            (
                "best trial",
                f"{best.number}: {run.objectives[0]} = {best.values[0]:.5g}"
                + (
                    f", {best.user_attrs['params']:,} parameters"
                    if isinstance(best.user_attrs.get("params"), int)
                    else ""
                ),
            )
        )
        items.append(("best parameters", ", ".join(f"{k}={_fmt_param(v)}" for k, v in best.params.items())))
    ev = (run.summary or {}).get("best") or {}
    for key in ("test_loss", "test_ppl", "val_loss", "latency_ms_per_token"):
        if isinstance(ev.get(key), (int, float)):
            items.append((f"final model {key}", f"{ev[key]:.5g}"))
    return items


def _fmt_param(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def render_html(
    run: ReportRun,
    figures: list[tuple[str, str | None, str | None]],
    columns: list[str],
    table: list[dict[str, Any]],
    sample: tuple[str | None, str],
    overhead: Overhead | None = None,
) -> str:
    best = run.best()
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>lmforge report: {_esc(run.run_dir.name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>lmforge search report: {_esc(run.run_dir.name)}</h1>",
        f"<p class='note'>generated {time.strftime('%Y-%m-%d %H:%M:%S')}; rebuild with "
        f"<code>lmforge report {_esc(run.run_dir)}</code></p>",
        "<h2>Overview</h2><table class='kv'>",
    ]
    parts += [f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in _overview(run)]
    parts.append("</table>")
    parts += [f"<p class='note'>{_esc(n)}</p>" for n in run.notes]
    parts.append("<h2>Figures</h2>")
    for title, file, note in figures:
        parts.append(f"<h3>{_esc(title)}</h3>")
        if file:
            parts.append(f"<img src='{FIGURES_DIR}/{_esc(file)}' alt='{_esc(title)}'>")
        if note:
            parts.append(f"<p class='note'>{_esc(note)}</p>")
    parts.append(f"<h2>Leaderboard ({len(table)} trials)</h2>")
    if table:
        parts.append("<div class='scroll'><table><tr>" + "".join(f"<th>{_esc(c)}</th>" for c in columns) + "</tr>")
        for r in table:
            cls = []
            if best is not None and str(r.get("trial")) == str(best.number):
                cls.append("best")
            if r.get("pareto") in (True, "True"):
                cls.append("pareto")
            attr = f" class='{' '.join(cls)}'" if cls else ""
            parts.append(f"<tr{attr}>" + "".join(f"<td>{_esc(r.get(c))}</td>" for c in columns) + "</tr>")
        parts.append("</table></div>")
    else:
        parts.append("<p class='note'>no trials yet</p>")
    parts += _overhead_section(overhead)
    text, where = sample
    parts.append("<h2>Sample from the best model</h2>")
    parts.append(f"<p class='note'>{_esc(where)}</p>")
    if text is not None:
        parts.append(f"<pre>{_esc(text)}</pre>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _overhead_section(ov: Overhead | None) -> list[str]:
    """"Where the time went": the trials' wall time by phase, as the trials recorded it."""
    parts = ["<h2>Where the time went</h2>"]
    if ov is None:
        return parts + ["<p class='note'>no trial recorded its phase timings</p>"]
    total = sum(s for _, s in ov.rows) or 1.0
    parts.append("<table class='overhead'><tr><th>phase</th><th>seconds</th><th>share</th></tr>")
    parts += [f"<tr><td style='text-align:left'>{_esc(name)}</td><td>{s:.2f}</td><td>{100 * s / total:.1f}%</td></tr>"
              for name, s in ov.rows]
    parts.append("</table>")
    parts.append(f"<p>optimizer steps: {100 * ov.train_share:.1f}% of the wall time of {ov.trials} trials "
                 f"({ov.trial_s:.1f} s)</p>")
    return parts
