"""Trivial baselines of the tasks (layer 4, no model): what a task model must beat, scored by the same metric
on the same records.

========================  ===============================================================================
baseline                  prediction
========================  ===============================================================================
``lead-k``                the first ``k`` words of the document (summarization); ``k`` is chosen on the
                          training and validation records (the best metric among :data:`LEAD_KS`)
``copy-source``           the input unchanged: the document, source sentence, text, or last user message
``majority-label``        the most frequent training label (classification; first in sorted order on a tie)
``most-frequent-output``  the most frequent training target (the most frequent parse for semantic parsing)
========================  ===============================================================================
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lmforge.data.tasks import Task, get_task
from lmforge.evaluate import metrics as M

LEAD_KS = (5, 10, 15, 20, 30, 40, 60, 80)
"""Word counts tried by ``lead-k``."""
PRIMARY_METRIC = {
    "rouge": "rougeL",
    "bleu_chrf": "chrf",
    "classification": "accuracy",
    "exact_match": "exact_match",
    "rouge_exact": "rougeL",
}
"""The number each metric set is ranked by (higher is better)."""


@dataclass
class Baseline:
    name: str
    predictions: list[str]
    metrics: dict[str, float]
    detail: dict[str, Any]


def _source(task: Task, record: dict[str, Any]) -> str:
    if task.name == "chat":
        users = [m["content"] for m in record["messages"] if m["role"] == "user"]
        return users[-1] if users else ""
    return str(record[task.roles[0]])


def lead(text: str, k: int) -> str:
    """The first ``k`` whitespace-separated words of ``text``."""
    return " ".join(text.split()[:k])


def choose_lead_k(task: Task, records: Sequence[dict[str, Any]]) -> int:
    """The ``k`` of :data:`LEAD_KS` with the best primary metric on ``records`` (the smallest on a tie)."""
    refs = [task.reference(r).strip() for r in records]
    key = PRIMARY_METRIC[task.metric]
    best_k, best = LEAD_KS[0], -1.0
    for k in LEAD_KS:
        agg, _ = M.score(task.metric, [lead(_source(task, r), k) for r in records], refs)
        if agg[key] > best:
            best_k, best = k, agg[key]
    return best_k


def baselines(
    task: Task | str,
    fit_records: Sequence[dict[str, Any]],
    eval_records: Sequence[dict[str, Any]],
    *,
    labels: Sequence[str] | None = None,
) -> list[Baseline]:
    """Every baseline that applies to ``task``, fitted (majority, lead-k's ``k``) on ``fit_records`` and
    scored on ``eval_records``."""
    task = get_task(task) if isinstance(task, str) else task
    refs = [task.reference(r).strip() for r in eval_records]
    kwargs: dict[str, Any] = {"labels": list(labels)} if task.name == "classification" and labels else {}
    out: list[Baseline] = []

    def add(name: str, predict: Callable[[dict[str, Any]], str], detail: dict[str, Any]) -> None:
        preds = [predict(r) for r in eval_records]
        agg, _ = M.score(task.metric, preds, refs, **kwargs)
        out.append(Baseline(name, preds, agg, detail))

    counts = Counter(task.reference(r).strip() for r in fit_records)
    top = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]
    if task.name == "classification":
        add("majority-label", lambda r: top, {"label": top, "count": counts[top]})
        return out
    if task.name == "summarization":
        k = choose_lead_k(task, fit_records)
        add("lead-k", lambda r: lead(_source(task, r), k), {"k": k})
    add("copy-source", lambda r: _source(task, r).strip(), {})
    add("most-frequent-output", lambda r: top, {"output": top[:200], "count": counts[top]})
    return out
