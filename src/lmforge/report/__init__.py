"""lmforge.report (layer 6): the HTML report of a search run, ``DIR/report.html`` with PNG figures in
``DIR/figures/``, built from what the run left (so also of a run still going or killed).

- ``run``: reading the run (``pipeline.json``, ``summary.json``, the study);
- ``curves``: the trials' learning curves from their ``metrics.jsonl``;
- ``importance``: parameter importances (fANOVA or the correlation ratio);
- ``figures``: the figures (matplotlib, imported when drawing);
- ``table``, ``sample``, ``html``: the leaderboard, a text sample of the best model, the page;
- ``build``: :func:`build_report`, called by ``lmforge tune`` after its pipeline and by ``lmforge report``.
"""

from lmforge.report.build import REPORT_FILE, build_report
from lmforge.report.figures import FIGURES_DIR
from lmforge.report.importance import param_importances
from lmforge.report.run import ReportError

__all__ = ["FIGURES_DIR", "REPORT_FILE", "ReportError", "build_report", "param_importances"]
