"""One trial: space -> config -> train (reporting to the pruner) -> objective values; failures recorded.

A trial trains in its own run directory ``DIR/trials/NNNN`` (the number of the first trial of a retry
chain) up to the longest fidelity, reporting the validation loss at ``step = trained tokens`` after every
evaluation. The pruner decides after each report: a pruned trial stops there, a surviving one simply goes on
in the same process, so promotion to a higher rung never retrains anything. A retry of an interrupted trial
resumes from the trial's last checkpoint (``train.resume auto``) and first re-reports the evaluations it
kept, so the pruner sees the same curve.

Outcome -> Optuna state: finished -> COMPLETE; pruned, or stopped because the search budget ran out ->
PRUNED (``stopped`` says why); diverged (NaN), out of memory, over its time share, invalid config ->
FAIL with ``fail_reason``; SIGTERM / Ctrl-C -> FAIL and enqueued again (``interrupted``).
"""

from __future__ import annotations

import json
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import BaseTrial, TrialState

from lmforge.config import ConfigError, RunConfig
from lmforge.data import PreparedData
from lmforge.runs import META_FILE, list_checkpoints, read_metrics
from lmforge.search.budget import Fidelity, budget_spent, tokens_used
from lmforge.search.context import SearchContext, SearchData, fixed_val_batches, trial_config, trial_dir
from lmforge.search.evaluation import measure_latency
from lmforge.search.failure import failure_reason
from lmforge.search.freeze_thaw import maybe_thaw
from lmforge.search.sizing import count_params
from lmforge.search.space import SearchSpace
from lmforge.search.speed_guard import SpeedGuard, overran
from lmforge.search.study import fail_and_retry, heartbeat, process_identity
from lmforge.train.callbacks import LiveCurves
from lmforge.train.loop import Callback, LoopState, train

OBJECTIVES = ("val_loss", "params", "latency")
EVAL_COST_SHARE = 0.03
"""A trial's evaluation scores at most about this share of the tokens its training processes between two
evaluations (a forward pass costs about a third of a training step per token): see :func:`trial_eval_blocks`."""
MIN_EVAL_BLOCKS = 16
"""The fewest validation blocks a trial scores (one batch). Measured on the demo corpus (two 2-layer models
trained 150 steps, 1,024 evenly spread blocks of 64 tokens): the standard deviation, over the grid offsets,
of the difference between the two models' losses on the same n blocks is 0.014 nats at 16 blocks, 0.010 at
32 and 0.007 at 64, against a 0.069 difference between the models; trials are compared on the same blocks."""


# ------------------------------------------------------------------------------------- reporting
class TrialStop(Exception):
    """Internal: a trial ended in a state other than COMPLETE."""

    def __init__(self, state: str, reason: str):
        super().__init__(reason)
        self.state = state  # "pruned" | "fail"
        self.reason = reason


class _Reporter(Callback):
    """Reports every evaluation to the trial; stops training when the pruner says so or the search budget
    is spent. ``offset``: tokens this trial trained before this run (earlier folds); ``used_before``: tokens
    the search had trained when the trial started (its own tokens are added to it for the budget rule)."""

    def __init__(
        self,
        trial: BaseTrial,
        ctx: SearchContext,
        prune: bool,
        used_before: int,
        hook: Callable[[], None] | None,
        offset: int = 0,
    ) -> None:
        self.trial = trial
        self.ctx = ctx
        self.prune = prune
        self.used_before = used_before
        self.hook = hook
        self.offset = offset
        self.start_tokens = 0
        self.tokens = 0
        self.pruned = False
        self.budget_stop = False
        self._reported: set[int] = set()

    def on_train_start(self, state: LoopState) -> None:
        self.start_tokens = self.tokens = state.tokens
        if state.step > 0:  # resumed: re-report the evaluations the checkpoint kept
            for rec in read_metrics(state.out_dir):
                if rec.get("val_loss") is not None and rec.get("step", 0) <= state.step:
                    self._report(rec)
            self.trial.set_user_attr("resumed_from_tokens", int(state.tokens))

    @property
    def trained(self) -> int:
        return int(self.offset + self.tokens - self.start_tokens)

    def _report(self, rec: dict[str, Any]) -> None:
        step = int(rec["tokens"])
        if self.prune and step not in self._reported and math.isfinite(rec["val_loss"]):
            self.trial.report(float(rec["val_loss"]), step=step)
            self._reported.add(step)

    def on_eval(self, state: LoopState, record: dict[str, Any]) -> bool:
        self.tokens = state.tokens
        self._report(record)
        self.trial.set_user_attr("tokens", int(state.tokens))
        self.trial.set_user_attr("val_loss", float(record["val_loss"]))
        self.trial.set_user_attr("tokens_trained", self.trained)
        stop = False
        # the last evaluation ends the trial anyway: pruning there would only discard a finished trial
        last = state.tokens >= self.ctx.fid.max_tokens
        if self.prune and not last and self.trial.should_prune():
            self.pruned = stop = True
        elif budget_spent(self.ctx, self.used_before + self.trained) is not None:
            self.budget_stop = stop = True
        if self.hook is not None:
            self.hook()
        return stop


# ------------------------------------------------------------------------------------------ trial
def run_trial(
    study: optuna.Study,
    trial: optuna.Trial,
    ctx: SearchContext,
    data: SearchData,
    *,
    hook: Callable[[], None] | None = None,
    verbose: bool = False,
) -> str:
    """Run ``trial`` (from ``study.ask()``) to its end and tell the study; return the final state name
    (``complete``, ``pruned``, ``fail``). KeyboardInterrupt and SIGTERM re-enqueue it and propagate."""
    space = ctx.search_space
    fid = ctx.fid
    for k, v in process_identity().items():
        trial.set_user_attr(k, v)
    out = trial_dir(ctx, study, trial)
    trial.set_user_attr("run_dir", str(out.relative_to(ctx.run_dir)))
    t0 = time.time()
    with heartbeat(study, trial):
        try:
            values = objective_values(study, trial, ctx, data, space, fid, out, hook, verbose)
        except TrialStop as stop:
            trial.set_user_attr("duration_s", round(time.time() - t0, 2))
            if stop.state == "pruned":
                if stop.reason:
                    trial.set_user_attr("stopped", stop.reason)
                study.tell(trial, state=TrialState.PRUNED)
                _thaw(study, ctx)
                return "pruned"
            trial.set_user_attr("fail_reason", stop.reason)
            study.tell(trial, state=TrialState.FAIL)
            return "fail"
        except KeyboardInterrupt:
            fail_and_retry(study, trial, "interrupted (Ctrl-C or SIGTERM); enqueued again")
            raise
        except _Interrupted:
            fail_and_retry(study, trial, "interrupted (SIGTERM); enqueued again")
            raise KeyboardInterrupt from None
        except Exception as err:  # the study goes on: record why this trial failed
            out.mkdir(parents=True, exist_ok=True)
            (out / "error.txt").write_text(traceback.format_exc(), encoding="utf-8")
            trial.set_user_attr("fail_reason", failure_reason(err))
            trial.set_user_attr("duration_s", round(time.time() - t0, 2))
            study.tell(trial, state=TrialState.FAIL)
            return "fail"
    trial.set_user_attr("duration_s", round(time.time() - t0, 2))
    study.tell(trial, values if ctx.multi_objective else values[0])
    _thaw(study, ctx)
    return "complete"


def _thaw(study: optuna.Study, ctx: SearchContext) -> None:
    """Freeze-thaw (:mod:`lmforge.search.freeze_thaw`): after a trial, a stopped one may be enqueued again."""
    if ctx.pruner in ("asha", "curve") and not ctx.multi_objective and ctx.cv < 2 and ctx.sampler != "grid":
        maybe_thaw(study, Path(ctx.run_dir), ctx.fid.max_tokens)


class _Interrupted(Exception):
    pass


def objective_values(
    study: optuna.Study,
    trial: BaseTrial,
    ctx: SearchContext,
    data: SearchData,
    space: SearchSpace,
    fid: Fidelity,
    out: Path,
    hook: Callable[[], None] | None,
    verbose: bool,
) -> list[float]:
    """The objective proper: sample the trial's values, train them (reporting to the pruner), and return
    the objective values. Raises :class:`TrialStop` for every outcome other than finished. ``trial`` is
    any Optuna trial interface (a ``FixedTrial`` replays given values)."""
    values = space.suggest(trial)
    try:
        cfg, notes = trial_config(ctx.base_config, values, fid, ctx.time_share_s)
    except ConfigError as err:
        raise TrialStop("fail", f"invalid configuration: {err}") from None
    if notes:
        trial.set_user_attr("adjusted", "; ".join(notes))
    n_params, _ = count_params(cfg, data.tokenizer.vocab_size)
    trial.set_user_attr("params", n_params)
    trial.set_user_attr("family", cfg.model.family)
    if ctx.max_params is not None and n_params > ctx.max_params:
        raise TrialStop("pruned", f"{n_params:,} parameters exceed --max-params {ctx.max_params:,}; not trained")
    if ctx.param_cap is not None and n_params > 1.5 * ctx.param_cap:
        raise TrialStop(
            "pruned", f"{n_params:,} parameters: too large for the budget (cap about {ctx.param_cap:,}); not trained"
        )

    used_before = tokens_used(study.get_trials(deepcopy=False)) if ctx.search_tokens is not None else 0
    if budget_spent(ctx, used_before) is not None:
        raise TrialStop("pruned", "search budget exhausted before the trial started")

    if ctx.cv >= 2:
        loss = _cross_validate(trial, ctx, cfg, data, out, hook, verbose, used_before)
        best_dir = out / "fold-0" / "best"
    else:
        loss, _ = _train_once(
            trial,
            ctx,
            cfg,
            data.prepared,
            data.prepared.val,
            out,
            fid,
            hook,
            verbose,
            prune=not ctx.multi_objective,
            used_before=used_before,
        )
        best_dir = out / "best"
    trial.set_user_attr("val_loss", loss)
    result = []
    for obj in ctx.objectives:
        if obj == "val_loss":
            result.append(loss)
        elif obj == "params":
            result.append(float(n_params))
        elif obj == "latency":
            ms = measure_latency(best_dir)
            trial.set_user_attr("latency_ms", ms)
            result.append(ms)
    return result


def _train_once(
    trial: BaseTrial,
    ctx: SearchContext,
    cfg: RunConfig,
    prepared: PreparedData,
    val: np.ndarray,
    out: Path,
    fid: Fidelity,
    hook: Callable[[], None] | None,
    verbose: bool,
    *,
    prune: bool,
    used_before: int,
    offset: int = 0,
) -> tuple[float, int]:
    """Train one run directory; (best validation loss, tokens trained so far by the trial)."""
    # the loop's own clock stops a trial at the search deadline between evaluations; it counts the time of
    # earlier attempts of this run directory, so the checkpoint's clock is added
    if ctx.deadline_unix is not None:
        left = ctx.deadline_unix - time.time()
        if left <= 0:
            raise TrialStop("pruned", "search budget exhausted before the trial started")
        cap = left + _elapsed_at_checkpoint(out)
        if cfg.train.max_time is None or cap < cfg.train.max_time:
            cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_time": cap})})
    reporter = _Reporter(trial, ctx, prune, used_before, hook, offset)
    # a trial whose speed cannot finish it within its share stops after a few steps (not at the share)
    live: list[Callback] = [guard := SpeedGuard(None if offset or ctx.cv >= 2 else ctx.time_share_s, fid.max_tokens)]
    if ctx.report_to:  # --report-to: the trial's curve to TensorBoard / MLflow as it trains
        name = out.relative_to(ctx.run_dir).as_posix().replace("/", "-")
        live.append(LiveCurves(ctx.report_to, Path(ctx.run_dir) / "tensorboard", name, dict(trial.params)))
    tc = cfg.train
    result = train(
        cfg,
        out,
        data=prepared,
        callbacks=[reporter, *live],
        verbose=verbose,
        val_batches=fixed_val_batches(val, cfg, trial_eval_blocks(fid, ctx.eval_blocks, cfg.data.block_size)),
        # checkpoints where the trial can be resumed (its rungs, and where it stops), best/ where it ends
        checkpoint_steps=rung_steps(fid, tc.eval_interval, tc.batch_size * cfg.data.block_size * tc.grad_accum,
                                    tc.max_steps or fid.max_steps),  # fmt: skip
    )
    reporter.tokens = result.tokens
    # the trial's wall time by phase (summed over folds), for the report's overhead table
    phases = dict(trial.user_attrs.get("phases") or {})
    trial.set_user_attr("phases", {k: round(phases.get(k, 0.0) + v, 4) for k, v in result.phases.items()})
    trial.set_user_attr("tokens", int(result.tokens))
    trial.set_user_attr("tokens_trained", reporter.trained)
    if result.stop_reason == "sigterm":
        raise _Interrupted()
    if reporter.pruned:
        raise TrialStop("pruned", "")
    if guard.too_slow:
        raise TrialStop("fail", guard.too_slow)
    past_deadline = ctx.deadline_unix is not None and time.time() >= ctx.deadline_unix - 1.0
    if reporter.budget_stop or (result.stop_reason == "max_time" and past_deadline):
        raise TrialStop("pruned", f"search budget exhausted at {result.tokens:,} tokens")
    if result.stop_reason == "max_time" and result.tokens < fid.max_tokens:
        raise TrialStop("fail", overran(cfg.train.max_time, result.tokens, fid.max_tokens))
    if not math.isfinite(result.best_val_loss):
        raise TrialStop("fail", "no finite validation loss")
    return float(result.best_val_loss), reporter.trained


def trial_eval_blocks(fid: Fidelity, most: int, block_size: int) -> int:
    """Fixed validation blocks a trial scores at each evaluation: ``most`` (the search's ``eval_blocks``),
    fewer when scoring them would cost more than :data:`EVAL_COST_SHARE` of the training between two
    evaluations (``fid.min_tokens`` tokens, forward and backward), never fewer than :data:`MIN_EVAL_BLOCKS`."""
    affordable = int(EVAL_COST_SHARE * 3 * fid.min_tokens / max(1, block_size))
    return max(min(MIN_EVAL_BLOCKS, most), min(most, affordable))


def rung_steps(fid: Fidelity, eval_interval: int, tokens_per_step: int, max_steps: int) -> set[int]:
    """The steps of the evaluations at which a trial reports each rung of ``fid`` (``min_tokens * eta**k``
    tokens): the first evaluation step (a multiple of ``eval_interval``) at or past the rung's tokens,
    capped at ``max_steps``."""
    steps: set[int] = set()
    per_eval = max(1, tokens_per_step * eval_interval)
    for k in range(fid.rungs + 1):
        tokens = fid.min_tokens * fid.eta**k
        if tokens > fid.max_tokens:
            break
        steps.add(min(max_steps, math.ceil(tokens / per_eval) * eval_interval))
    return steps


def _cross_validate(
    trial: BaseTrial,
    ctx: SearchContext,
    cfg: RunConfig,
    data: SearchData,
    out: Path,
    hook: Callable[[], None] | None,
    verbose: bool,
    used_before: int,
) -> float:
    """Mean of the folds' best validation losses (pruning is off: one fold is no rung of the mean)."""
    losses = []
    trained = 0
    for i, (train_tokens, val_tokens) in enumerate(data.folds):
        prepared = replace(data.prepared, train=train_tokens, val=val_tokens)
        loss, trained = _train_once(
            trial,
            ctx,
            cfg,
            prepared,
            val_tokens,
            out / f"fold-{i}",
            ctx.fid,
            hook,
            verbose,
            prune=False,
            used_before=used_before,
            offset=trained,
        )
        losses.append(loss)
        trial.set_user_attr("fold_losses", losses)
    (out / "cv.json").write_text(json.dumps({"fold_losses": losses, "mean": float(np.mean(losses))}) + "\n")
    return float(np.mean(losses))


def _elapsed_at_checkpoint(run_dir: Path) -> float:
    """Training seconds recorded by the newest checkpoint of ``run_dir`` (0 without one)."""
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        return 0.0
    try:
        return float(json.loads((ckpts[-1] / META_FILE).read_text(encoding="utf-8")).get("elapsed_s") or 0.0)
    except (OSError, ValueError):
        return 0.0
