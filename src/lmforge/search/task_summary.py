"""Step 5 of ``lmforge tune --task``, ``evaluate``: the held-out test records (never read by the steps
before), the task metric beside trivial baselines (:mod:`lmforge.evaluate.baselines`) on the same records,
written as ``DIR/test_report.json``, ``DIR/summary.json`` and ``DIR/leaderboard.csv``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.atomic import atomic_write_json, atomic_write_text
from lmforge.data.retrieval import attach
from lmforge.evaluate.baselines import baselines
from lmforge.evaluate.runner import evaluate_task
from lmforge.predict.generation_config import load_generation_defaults, with_defaults
from lmforge.predict.loading import load_pretrained
from lmforge.runs import load_retrieval
from lmforge.search import decode_search as D
from lmforge.search.task_plan import KIND, TASK_STEPS
from lmforge.search.task_run import TaskRun

SUMMARY_FILE = "summary.json"
LEADERBOARD_FILE = "leaderboard.csv"
EXAMPLES_IN_SUMMARY = 5


def step_evaluate(run: TaskRun) -> dict[str, Any]:
    """Evaluate ``DIR/best`` on the test records; write and return the summary."""
    best = run.run_dir / "best"
    model, tok, _ = load_pretrained(best)
    test = run.records("test")
    labels = run.state["labels"]
    gen = None if run.task.name == "classification" else with_defaults(load_generation_defaults(best), {})
    # the prompts of `lmforge eval DIR`: the retrieval index saved with the model, as the final step saved it
    prompts = attach(load_retrieval(best), test)
    report = evaluate_task(model, tok, run.task, prompts, labels=labels, config=gen)
    report.info.update(model=str(best), data=run.state["plan"]["data"], split="test")
    report.save(run.run_dir / "test_report.json")
    base = baselines(run.task, run.records("train") + run.records("val"), test, labels=labels)
    key = D.primary(run.task)
    rows = [{"system": "model", **{k: v for k, v in report.metrics.items() if k != "examples"}}]
    rows += [{"system": b.name, **b.metrics} for b in base]
    examples = [
        {
            "prompt": ex["prompt"][-500:],
            "reference": ex["reference"],
            "prediction": ex["prediction"],
            **{b.name: b.predictions[ex["index"]] for b in base},
        }
        for ex in report.examples[:EXAMPLES_IN_SUMMARY]
    ]
    with run.lock:
        run.tick()
        spent = dict(run.state["spent_s"])
    steps = run.state["steps"]
    summary = {
        "kind": KIND,
        "task": run.task.name,
        "metric": run.task.metric,
        "primary_metric": key,
        "records": {s: len(run.state["split"][s]) for s in ("train", "val", "test")},
        "split_seed": run.state["split"]["seed"],
        "test": report.metrics,
        "baselines": {b.name: {**b.metrics, **b.detail} for b in base},
        "beats_baselines": all(report.metrics[key] > b.metrics[key] for b in base),
        "decode": steps["decode"].get("settings"),
        "retrieval": {"k": run.retrieval_k(), "searched": run.uses_retrieval},
        "best": str(best),
        "start": run.start_model(),
        "pretrain": {k: v for k, v in steps["pretrain"].items() if k != "status"},
        "search": {k: steps["search"].get(k) for k in ("trials", "complete", "winner", "winner_params", "rerank")},
        "final": {k: v for k, v in steps["final"].items() if k != "status"},
        "steps": {s: steps[s]["status"] for s in TASK_STEPS} | {"evaluate": "done"},
        "budget_s": run.budget_s,
        "spent_s": {k: round(v, 1) for k, v in spent.items()},
        "examples": examples,
        "leaderboard": str(run.run_dir / LEADERBOARD_FILE),
    }
    write_leaderboard(run.run_dir / LEADERBOARD_FILE, rows)
    atomic_write_json(run.run_dir / SUMMARY_FILE, summary)
    run.log(
        f"test {key}: model {report.metrics[key]:.2f}; " + ", ".join(f"{b.name} {b.metrics[key]:.2f}" for b in base)
    )
    return summary


def write_leaderboard(path: Path, rows: list[dict[str, Any]]) -> None:
    """``rows`` (dicts) as CSV, columns in order of first appearance."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    lines = [",".join(cols)]
    for r in rows:
        lines.append(",".join(_csv(r.get(c)) for c in cols))
    atomic_write_text(path, "\n".join(lines) + "\n")


def _csv(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    text = str(v)
    return '"' + text.replace('"', '""') + '"' if ("," in text or '"' in text) else text
