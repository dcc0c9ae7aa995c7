"""``lmforge tune``: the multi-step optimization pipeline, resumable step by step.

Steps (each recorded in ``DIR/pipeline.json`` when done, so a killed run continues where it stopped):

1. ``search``: architecture and hyperparameters together, multi-fidelity (trials in ``DIR/trials/NNNN``, the
   study in ``DIR/study.journal`` or ``--storage``), by the strategy the options choose
   (:mod:`lmforge.search.strategies`);
2. ``final``: the best configuration continues from its own last checkpoint (``DIR/final``) with the budget
   left, to convergence (early stopping); ``DIR/best`` gets the best validation checkpoint
   (:mod:`lmforge.search.final`);
3. ``decode``: decoding-settings tuning, for task data only (skipped for a plain corpus);
4. ``evaluate``: the held-out test half of the validation documents, ``DIR/leaderboard.csv`` and
   ``DIR/summary.json`` (:mod:`lmforge.search.evaluation`, :mod:`lmforge.search.summary`). The HTML report
   is built by the caller (``lmforge tune``) from these files: :mod:`lmforge.report`.

The budget (time or tokens) covers all steps; :mod:`lmforge.search.budget` splits it. The time ledger
(``spent_s`` in ``pipeline.json``) starts with the command (``TuneOptions.started``: its start-up counts) and
is saved every ``LEDGER_SAVE_S`` seconds while a step runs, so a run killed with SIGKILL loses at most that
much: the resumed run's allowances count the rest. ``run_pipeline(opts, finish=...)`` runs the caller's last
output (the HTML report) inside the evaluation step, on the budget's clock. Data: the prepared
validation split is halved by documents: one half scores the trials and the final training, the other is
only read by the final evaluation. This module holds the step sequence, the resume and the run lock; the
first run's planning is :mod:`lmforge.search.new_run`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from lmforge.atomic import atomic_write_json
from lmforge.runs import run_lock
from lmforge.search.budget import STEPS, Budget, Ledger, format_amount, format_count, tokens_used
from lmforge.search.context import CONTEXT_ATTR, SearchContext, SearchData, load_context, prepare_search_data
from lmforge.search.evaluation import EVAL_BLOCKS, evaluate_best
from lmforge.search.final import (
    FINAL_PATIENCE,
    FINAL_STEP_CAP,
    choose_final,
    fit_plan_to_time_left,
    install_dir,
    plan_final,
    train_final,
)
from lmforge.search.leaderboard import LiveTable
from lmforge.search.new_run import STATE_VERSION, start_run
from lmforge.search.options import BACKENDS, DEFAULT_BUDGET, STRATEGIES, TuneOptions
from lmforge.search.plan import RUNG_MIN_STEPS
from lmforge.search.strategies import SearchJob, strategy_for
from lmforge.search.study import (
    SearchError,
    create_or_load,
    dashboard_command,
    open_storage,
    quiet_optuna,
    recover_interrupted,
    storage_url,
)
from lmforge.search.summary import SUMMARY_FILE, build_summary, select_best, summary_text, write_outputs
from lmforge.search.ticker import LEDGER_SAVE_S, ticking
from lmforge.search.worker import search_done

__all__ = [
    "BACKENDS",
    "DEFAULT_BUDGET",
    "EVAL_BLOCKS",
    "FINAL_PATIENCE",
    "FINAL_STEP_CAP",
    "RUNG_MIN_STEPS",
    "STATE_FILE",
    "STRATEGIES",
    "NoFinishedTrial",
    "TuneOptions",
    "build_summary",
    "read_state",
    "run_pipeline",
    "select_best",
]

STATE_FILE = "pipeline.json"
RESUME_KEYS = (
    "data",
    "space",
    "sampler",
    "pruner",
    "cv",
    "max_params",
    "seed",
    "config",
    "objectives",
    "backend",
    "strategy",
)
"""Options a run keeps from its first command line (given anew on a resume, they are ignored with a note)."""
"""Seconds between saves of the time ledger while a step runs (a SIGKILL loses at most this much of it)."""


class NoFinishedTrial(SearchError):
    """The search produced no trial to continue. ``DIR/leaderboard.csv`` and ``DIR/summary.json`` were
    written first, so the report can show why."""


def read_state(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise SearchError(f"{path} is corrupted ({err}); move it away to start the run over") from None


# ------------------------------------------------------------------------------------ pipeline
def run_pipeline(opts: TuneOptions, finish: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """Run (or continue) the pipeline in ``opts.out``; return the summary (also in ``DIR/summary.json``).
    ``finish(run_dir)`` runs in the evaluation step once the outputs are written (the CLI builds the HTML
    report there), so its time is charged to the budget like every step's."""
    quiet_optuna()
    run_dir = Path(opts.out).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir, "tune"):  # one lmforge tune per run directory
        return _Pipeline(opts, run_dir, finish).run()


class _Pipeline:
    def __init__(self, opts: TuneOptions, run_dir: Path, finish: Callable[[Path], None] | None = None) -> None:
        self.opts = opts
        self.run_dir = run_dir
        self.finish = finish
        self.state: dict[str, Any] = {}
        self.data: SearchData | None = None
        # the clock starts with the command when it says when that was: its start-up is spent budget too
        self._t = time.monotonic() if opts.started is None else min(opts.started, time.monotonic())
        self._saved = 0.0
        self._step = "search"
        # the ledger thread and the steps both change and save the state
        self._lock = threading.RLock()

    # -- output -----------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.opts.verbose:
            print(msg, file=sys.stderr, flush=True)

    # -- state ------------------------------------------------------------------------------------
    def save(self, force: bool = True) -> None:
        with self._lock:
            if force or time.monotonic() - self._saved > LEDGER_SAVE_S:
                atomic_write_json(self.run_dir / STATE_FILE, self.state)
                self._saved = time.monotonic()

    @property
    def budget(self) -> Budget:
        return Budget.from_dict(self.state["budget"])

    @property
    def stored(self) -> TuneOptions:
        """The options the run stored (the first command line's, with the updates a resume records)."""
        return TuneOptions.from_dict(self.state["options"])

    def ledger(self) -> Ledger:
        key = "spent_s" if self.budget.kind == "time" else "spent_tokens"
        return Ledger(self.budget, spent=self.state[key], split=self.state.get("shares"))

    def tick(self, step: str | None = None, save: bool = False) -> None:
        """Charge the wall-clock time since the last tick to the current step."""
        with self._lock:
            now = time.monotonic()
            self.state["spent_s"][step or self._step] += now - self._t
            self._t = now
            self.save(force=save)

    def set_step(self, step: str, **fields: Any) -> None:
        with self._lock:
            self.state["steps"][step].update(fields)
            self.save()

    def ledger_clock(self) -> contextlib.AbstractContextManager[None]:
        """While the steps run: tick and save the ledger every ``LEDGER_SAVE_S`` seconds from a thread, so
        time spent inside a long trial, evaluation or final training survives a SIGKILL."""

        def warn(err: OSError) -> None:  # a full or read-only disk: the steps' own saves report it
            self.log(f"warning: cannot save {self.run_dir / STATE_FILE}: {err}")

        return ticking(lambda: self.tick(save=True), warn, name="lmforge-ledger")

    # -- entry --------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        existing = read_state(self.run_dir)
        if existing is None and self.opts.resume:
            raise SearchError(f"--resume: {self.run_dir} holds no lmforge tune run to resume")
        if existing is None:
            self.state, self.data = start_run(self.opts, self.run_dir, self.log)
            self.save()
        else:
            self._resume(existing)
        led = self.ledger()
        self.log(led.describe())
        for note in self.state.get("notes", []):
            self.log(f"note: {note}")
        self.log(
            f"study: {self.state['study_name']} in {self.state['storage']} "
            f"(watch it: {dashboard_command(self.state['storage'])})"
        )
        try:
            with self.ledger_clock():
                for step in STEPS:
                    if self.state["steps"][step]["status"] in ("done", "skipped"):
                        continue
                    with self._lock:  # time not charged yet (the start-up of a resumed run) goes to this step
                        self._step = step
                    getattr(self, f"_step_{step}")()
                    self.tick(step, save=True)
        finally:
            self.tick(save=True)
        return json.loads((self.run_dir / SUMMARY_FILE).read_text(encoding="utf-8"))

    def _resume(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise SearchError(
                f"{self.run_dir / STATE_FILE} has version {state.get('version')}, expected {STATE_VERSION}"
            )
        self.state = state
        o = self.opts
        stored = state["options"]
        given = {k: v for k, v in o.given().items() if k in RESUME_KEYS}
        differ = [k for k, v in given.items() if v != stored.get(k)]
        self.log(
            f"resuming {self.run_dir} (steps done: "
            f"{', '.join(s for s in STEPS if state['steps'][s]['status'] == 'done') or 'none'})"
        )
        if differ:
            self.log(f"note: the run keeps its stored settings; ignoring the new {', '.join('--' + d for d in differ)}")
        new = o.total_budget
        if new is not None and new != self.budget:
            if new.kind != self.budget.kind:
                raise SearchError(f"--budget {o.budget}: this run's budget is {self.budget.kind}-based")
            self.log(f"budget changed from {self.budget} to {new}")
            state["budget"] = new.to_dict()
        if o.n_trials is not None:
            state["options"]["n_trials"] = o.n_trials

    # -- the study and the data every step reads --------------------------------------------------
    def _study(self) -> tuple[optuna.Study, SearchContext]:
        study = create_or_load(
            open_storage(self.state["storage"]), self.state["study_name"], len(self.stored.objectives)
        )
        return study, load_context(study)

    def _search_data(self, ctx: SearchContext) -> SearchData:
        if self.data is None:
            self.data = prepare_search_data(ctx.base_config, ctx.cv, ctx.seed)
        return self.data

    # -- step 1: search ---------------------------------------------------------------------------
    def _step_search(self) -> None:
        self.tick("search")
        study, ctx = self._study()
        stored = self.stored
        led = self.ledger()
        if self.budget.kind == "time":
            ctx.deadline_unix = time.time() + led.allowance("search")
        else:
            ctx.search_tokens = int(self.budget.amount * led.shares["search"])
        ctx.n_trials = stored.n_trials
        ctx.parallel = ctx.parallel or self.opts.n_jobs > 1
        study.set_user_attr(CONTEXT_ATTR, ctx.to_dict())
        if stored.backend != "ray":  # Ray restores its own trials: their Optuna trials stay RUNNING for it
            exclusive = self.state["storage"] == storage_url(None, self.run_dir)
            recovered = recover_interrupted(study, exclusive=exclusive)
            if recovered:
                self.log(f"trial(s) {recovered} were interrupted by the last run: failed, enqueued again")
        self.set_step("search", status="running")

        table = LiveTable(
            study,
            ctx.objectives,
            ctx.fid,
            lambda: self._header(study),
            interval=self.opts.progress_interval,
            enabled=self.opts.verbose,
        )

        def hook() -> None:
            if self.budget.kind == "tokens":
                used = tokens_used(study.get_trials(deepcopy=False))
                with self._lock:
                    self.state["spent_tokens"]["search"] = used
            self.tick("search")
            table.maybe_print()

        job = SearchJob(
            study=study,
            ctx=ctx,
            data=self._search_data(ctx),
            study_name=self.state["study_name"],
            storage=self.state["storage"],
            run_dir=self.run_dir,
            stored=stored,
            given=self.opts,
            hook=hook,
            log=self.log,
        )
        strategy_reason = strategy_for(stored.backend, stored.strategy)(job)
        hook()
        table.maybe_print(force=True)
        why = search_done(study, ctx) or strategy_reason or "no trial left to run"
        self.log(f"search finished: {why}")
        self.set_step("search", status="done", reason=why)

    def _header(self, study: optuna.Study) -> str:
        led = self.ledger()
        used = tokens_used(study.get_trials(deepcopy=False))
        left = format_amount(led.allowance("search"), self.budget.kind)
        return (
            f"[search] {left} of the search budget left; {format_count(used)} tokens trained; "
            f"total budget left {format_amount(led.remaining(), self.budget.kind)}"
        )

    # -- step 2: final training -------------------------------------------------------------------
    def _step_final(self) -> None:
        study, ctx = self._study()
        allowance = self.ledger().allowance("final")
        plan = self.state["steps"]["final"].get("plan")
        ref_tps = self.state["plan"].get("reference_tokens_per_s", 1e4)
        if plan is None:  # predicted final losses, re-scored on the whole validation split (search/final.py)
            best, choice, sizing = choose_final(
                study, ctx, self._search_data(ctx), allowance=allowance, budget_kind=self.budget.kind, ref_tps=ref_tps
            )
        else:
            best = next((t for t in study.get_trials(deepcopy=False) if t.number == plan["trial"]), None)
            choice, sizing = [], {}
        best = best or select_best(study, ctx)
        self.tick("final")  # the re-scoring's time is spent: the training gets what is left
        allowance = self.ledger().allowance("final")
        if best is None:
            write_outputs(self.run_dir, self.state, study, ctx)
            raise NoFinishedTrial(
                "no trial produced a validation loss; see leaderboard.csv (fail reasons) and "
                "give a larger --budget or a different space"
            )
        trial_dir = self.run_dir / best.user_attrs["run_dir"]
        src = trial_dir / "fold-0" if ctx.cv >= 2 else trial_dir
        final_dir = self.run_dir / "final"
        if plan is None:
            plan = plan_final(
                src,
                best.number,
                cv=ctx.cv,
                allowance=allowance,
                budget_kind=self.budget.kind,
                reference_tokens_per_s=ref_tps,
                choice=choice,
                sizing=sizing,
            )
            self.set_step("final", plan=plan, status="running")
            if sizing.get("fitted"):
                self.log(
                    f"sizing from the trials: about {format_count(sizing['optimal_params'])} parameters predicted "
                    f"best for the final's allowance; chosen trial {format_count(sizing['chosen_params'])}"
                )
        else:  # resumed: the first run's time counts, so its clock may only get shorter
            fitted = fit_plan_to_time_left(plan, final_dir, allowance)
            if fitted != plan:
                self.log(f"final training: clock cut to {fitted['max_time']:.0f}s: the budget left is {allowance:.0f}s")
                plan = fitted
                self.set_step("final", plan=plan)
        self.log(
            f"final training: trial {plan['trial']} "
            + (f"continues from {plan['from']}" if plan["from"] else "trains from scratch")
            + f" up to step {plan['max_steps']} ({format_amount(allowance, self.budget.kind)} of budget)"
        )
        if plan["max_steps"] > plan["start_step"]:
            result = train_final(plan, src, final_dir, ctx, self._search_data(ctx), self.opts.verbose)
            trained = result.tokens - plan["start_tokens"] if plan["from"] else result.tokens
            with self._lock:
                self.state["spent_tokens"]["final"] = float(trained)
            self.set_step(
                "final", stop_reason=result.stop_reason, tokens=int(trained), best_val_loss=result.best_val_loss
            )
        chosen = final_dir / "best" if (final_dir / "best" / "COMPLETE").is_file() else src / "best"
        if not (chosen / "COMPLETE").is_file():
            raise SearchError(f"no best checkpoint in {chosen}: the trial's checkpoints were deleted")
        install_dir(chosen, self.run_dir / "best")
        self.set_step("final", status="done", best_from=str(chosen.relative_to(self.run_dir)))

    # -- step 3: decoding settings (task data only) ---------------------------------------------
    def _step_decode(self) -> None:
        self.set_step("decode", status="skipped", reason="no task data: decoding settings apply to tasks")

    # -- step 4: evaluation and outputs -----------------------------------------------------------
    def _step_evaluate(self) -> None:
        study, ctx = self._study()
        result = evaluate_best(self.run_dir / "best", self._search_data(ctx))
        # the outputs are written with the step marked done, and only then is the state saved: a kill in
        # between repeats this step
        with self._lock:
            self.state["steps"]["evaluate"].update(result)
            self.tick("evaluate")
            done = copy.deepcopy(self.state)
        done["steps"]["evaluate"]["status"] = "done"
        write_outputs(self.run_dir, done, study, ctx)
        if self.finish is not None:  # the caller's last output (the HTML report), on the budget's clock
            self.finish(self.run_dir)
        self.set_step("evaluate", status="done")
        s = json.loads((self.run_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
        self.log(summary_text(s))
