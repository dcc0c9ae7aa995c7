"""``lmforge tune --task T``: a task model from records, within one time budget, resumable step by step.

Steps (each recorded in ``DIR/pipeline.json`` when done, so a killed run continues where it stopped; the
records' train/val/test split, deterministic in ``--seed``, is recorded there too), one module each:

1. ``pretrain`` (:mod:`~lmforge.search.task_pretrain`; skipped with ``--init``): a language model on the
   task's own text, per tokenizer candidate of the plan (:mod:`~lmforge.search.task_plan`).
2. ``search`` (:mod:`~lmforge.search.task_search`): fine-tuning hyperparameters by validation completion
   loss, the best few re-ranked by the task metric on validation records. For translation, classification
   and semantic parsing this includes whether each prompt shows its nearest training record
   (:mod:`lmforge.data.retrieval`), decided by the task metric; the index is saved with the model
   (``DIR/best/retrieval.json``) so that ``lmforge eval`` builds the same prompts.
3. ``final`` (same module): the winner's settings fine-tuned again with the rest of the fine-tuning share;
   ``DIR/best`` is the better of that and the winner's trial.
4. ``decode`` (:mod:`~lmforge.search.task_decode`): decoding settings (copy mechanism, repeats, length,
   beams) searched on validation records with the task metric, written to ``DIR/best/generation_config.json``.
5. ``evaluate`` (:mod:`~lmforge.search.task_summary`): the held-out test records beside trivial baselines:
   ``DIR/summary.json``, ``DIR/leaderboard.csv``, ``DIR/test_report.json``, and the caller's report.

Every record is validated before anything is written (:func:`~lmforge.search.task_plan.validate_and_plan`):
a bad input leaves no ``DIR`` behind. The budget is wall-clock time, shared out by
:class:`~lmforge.search.task_run.TaskRun`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmforge.atomic import atomic_write_json
from lmforge.runs import run_lock
from lmforge.search.budget import Budget, parse_budget
from lmforge.search.study import quiet_optuna
from lmforge.search.task_decode import step_decode
from lmforge.search.task_plan import (
    STATE_FILE,
    TASK_STEPS,
    TaskPipelineError,
    TaskTuneOptions,
    read_task_state,
    validate_and_plan,
)
from lmforge.search.task_pretrain import step_pretrain
from lmforge.search.task_run import TaskRun
from lmforge.search.task_search import step_final, step_search
from lmforge.search.task_summary import SUMMARY_FILE, step_evaluate

STEP_FUNCTIONS: dict[str, Callable[[TaskRun], Any]] = {
    "pretrain": step_pretrain,
    "search": step_search,
    "final": step_final,
    "decode": step_decode,
}


def run_task_pipeline(opts: TaskTuneOptions, finish: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """Run (or continue) the task pipeline in ``opts.out``; return the summary (also ``DIR/summary.json``).
    ``finish(run_dir)`` (the HTML report) runs in the evaluation step, on the budget's clock."""
    quiet_optuna()
    log = _logger(opts.verbose)
    run_dir = Path(opts.out).expanduser().resolve()
    state = read_task_state(run_dir)
    if state is None:
        if (run_dir / STATE_FILE).is_file():
            raise TaskPipelineError(f"{run_dir} holds a plain lmforge tune run (no --task): use another --out")
        state = validate_and_plan(opts, log)  # before DIR exists: a bad input leaves nothing behind
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / STATE_FILE, state)
    else:
        if opts.task != state["task"]:
            raise TaskPipelineError(f"--task {opts.task}: {run_dir} holds a --task {state['task']} run")
        done = [s for s in TASK_STEPS if state["steps"][s]["status"] in ("done", "skipped")]
        log(f"resuming {run_dir} (steps done: {', '.join(done) or 'none'})")
        if opts.budget and parse_budget(opts.budget).to_dict() != state["budget"]:
            new = parse_budget(opts.budget)
            if new.kind != "time":
                raise TaskPipelineError(f"--budget {opts.budget}: tune --task takes a time budget")
            log(f"budget changed from {Budget.from_dict(state['budget'])} to {new}")
            state["budget"] = new.to_dict()
    with run_lock(run_dir, "tune"):
        return _run(TaskRun(state, run_dir, opts, log), finish)


def _run(run: TaskRun, finish: Callable[[Path], None] | None) -> dict[str, Any]:
    shares = run.state["shares"]
    run.log(
        f"budget {Budget.from_dict(run.state['budget'])}: "
        + ", ".join(f"{s} {shares[s]:.0%}" for s in TASK_STEPS if shares[s] > 0)
    )
    try:
        with run.ledger_clock():
            for step in TASK_STEPS:
                if run.state["steps"][step]["status"] in ("done", "skipped"):
                    continue
                run.enter(step)
                if step == "evaluate":
                    summary = step_evaluate(run)
                    if finish is not None:
                        finish(run.run_dir)
                    key = summary["primary_metric"]
                    run.set_step("evaluate", status="done", **{key: summary["test"][key]})
                else:
                    STEP_FUNCTIONS[step](run)
                run.tick(save=True)
    finally:
        run.tick(save=True)
    return json.loads((run.run_dir / SUMMARY_FILE).read_text(encoding="utf-8"))


def _logger(verbose: bool) -> Callable[[str], None]:
    def log(msg: str) -> None:
        if verbose:
            print(msg, file=sys.stderr, flush=True)

    return log


__all__ = ["TaskPipelineError", "TaskTuneOptions", "read_task_state", "run_task_pipeline"]
