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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.config import ConfigError, LmforgeError, RunConfig, build_config
from lmforge.search import splits
from lmforge.search.budget import Fidelity
from lmforge.search.space import SearchSpace, apply_values, parse_space, repair_config
from lmforge.search.study import Heartbeat, fail_and_retry, frozen, original_number, process_identity
from lmforge.train.loop import Callback

OBJECTIVES = ("val_loss", "params", "latency")
CONTEXT_ATTR = "lmforge"
"""Study user attribute holding the :class:`SearchContext` (so a worker needs only storage + study name)."""
EVAL_BLOCKS = 64
"""Validation blocks per evaluation of a trial (a fixed set: every trial is scored on the same text)."""
LATENCY_TOKENS = 32


@dataclass
class SearchContext:
    """Everything a worker needs to run trials of a study, stored in the study itself."""

    run_dir: str
    base_config: dict[str, Any]
    space: dict[str, Any]
    fidelity: dict[str, int]
    objectives: list[str] = field(default_factory=lambda: ["val_loss"])
    sampler: str = "tpe"
    pruner: str = "asha"
    seed: int = 0
    parallel: bool = False
    """Several workers share the study (TPE then uses the constant liar)."""
    max_params: int | None = None
    param_cap: int | None = None
    """Soft size cap from the budget: trials above 1.5x are stopped before training."""
    cv: int = 0
    time_share_s: float | None = None
    deadline_unix: float | None = None
    search_tokens: int | None = None
    n_trials: int | None = None
    disk_cap: int | None = None
    keep_best: int = 3
    eval_blocks: int = EVAL_BLOCKS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchContext:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    @property
    def fid(self) -> Fidelity:
        return Fidelity.from_dict(self.fidelity)

    @property
    def search_space(self) -> SearchSpace:
        return parse_space(self.space, source="search space")

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1


# -------------------------------------------------------------------------------------------- data
@dataclass
class SearchData:
    """The token streams trials use: training, the search's validation half, the held-out test half,
    and (with ``--cv``) the folds of training + validation documents."""

    prepared: Any
    """The :class:`lmforge.data.PreparedData` with ``val`` replaced by the search's half."""
    test: np.ndarray
    folds: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)

    @property
    def tokenizer(self) -> Any:
        return self.prepared.tokenizer


def prepare_search_data(base: dict[str, Any], cv: int = 0, seed: int = 0) -> SearchData:
    from lmforge.data import prepare_data

    prepared = prepare_data(build_config(base))
    eot = getattr(prepared.tokenizer, "eot_id", None)
    val, test = splits.holdout_split(prepared.val, eot, seed)
    prepared = replace(prepared, val=val)
    folds = splits.kfold(np.concatenate([np.asarray(prepared.train), val]), eot, cv, seed) if cv >= 2 else []
    return SearchData(prepared=prepared, test=test, folds=folds)


def fixed_val_batches(tokens: np.ndarray, cfg: RunConfig, n_blocks: int) -> list[Any]:
    """Evaluation batches independent of the trial's batch size: the same blocks for every trial."""
    from lmforge.data import eval_batches

    batch = 16
    return eval_batches(tokens, cfg.data.block_size, batch, max(1, n_blocks // batch))


# ----------------------------------------------------------------------------------- trial config
def trial_config(
    base: dict[str, Any], values: dict[str, Any], fid: Fidelity, time_share_s: float | None
) -> tuple[RunConfig, list[str]]:
    """The validated config of a trial: the base, the sampled values, and the search's training plan
    (length from the fidelity, evaluation at every rung, one checkpoint kept, resumable). The time share
    is the smaller of ``time_share_s`` and a ``train.max_time`` the user set."""
    raw = apply_values(base, values)
    notes = repair_config(raw)
    cfg = build_config(raw)  # block size and batch size may be searched: the steps follow from them
    tps = cfg.train.batch_size * cfg.data.block_size * cfg.train.grad_accum
    max_steps = max(1, math.ceil(fid.max_tokens / tps))
    train = raw.setdefault("train", {})
    train.update(
        max_steps=max_steps,
        max_tokens=None,
        max_epochs=None,
        max_time=min((c for c in (time_share_s, cfg.train.max_time) if c), default=None),
        patience=None,
        eval_interval=max(1, fid.min_tokens // tps),
        checkpoint_interval=None,
        keep_last=1,
        resume="auto",
        progress=False,
    )
    sched = raw.setdefault("schedule", {})
    sched["total_steps"] = None
    if "warmup_steps" not in (base.get("schedule") or {}) and "schedule.warmup_steps" not in values:
        sched["warmup_steps"] = min(200, max_steps // 20)  # a short warm-up keeps high learning rates stable
    elif int(sched.get("warmup_steps") or 0) >= max_steps:
        sched["warmup_steps"] = max_steps // 10
    return build_config(raw), notes


# ------------------------------------------------------------------------------------- reporting
class TrialStop(Exception):
    """Internal: a trial ended in a state other than COMPLETE."""

    def __init__(self, state: str, reason: str):
        super().__init__(reason)
        self.state = state  # "pruned" | "fail"
        self.reason = reason


class _Reporter(Callback):
    """Reports every evaluation to the trial; stops training when the pruner says so or the search budget
    is spent. ``offset``: tokens this trial trained before this run (earlier folds)."""

    def __init__(
        self,
        trial: Any,
        ctx: SearchContext,
        prune: bool,
        tokens_left: float | None,
        hook: Callable[[], None] | None,
        offset: int = 0,
    ) -> None:
        self.trial = trial
        self.ctx = ctx
        self.prune = prune
        self.tokens_left = tokens_left
        self.hook = hook
        self.offset = offset
        self.start_tokens = 0
        self.tokens = 0
        self.pruned = False
        self.budget_stop = False
        self._reported: set[int] = set()

    def on_train_start(self, state: Any) -> None:
        from lmforge.runs import read_metrics

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

    def on_eval(self, state: Any, record: dict[str, Any]) -> bool:
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
        elif self.ctx.deadline_unix is not None and time.time() >= self.ctx.deadline_unix:
            self.budget_stop = stop = True
        elif self.tokens_left is not None and self.trained >= self.tokens_left:
            self.budget_stop = stop = True
        if self.hook is not None:
            self.hook()
        return stop


# ------------------------------------------------------------------------------------------ trial
def trial_dir(ctx: SearchContext, study: Any, trial: Any) -> Path:
    return Path(ctx.run_dir) / "trials" / f"{original_number(frozen(study, trial)):04d}"


def tokens_used(trials: list[Any]) -> int:
    return sum(int(t.user_attrs.get("tokens_trained", 0)) for t in trials)


def run_trial(
    study: Any,
    trial: Any,
    ctx: SearchContext,
    data: SearchData,
    *,
    hook: Callable[[], None] | None = None,
    verbose: bool = False,
) -> str:
    """Run ``trial`` (from ``study.ask()``) to its end and tell the study; return the final state name
    (``complete``, ``pruned``, ``fail``). KeyboardInterrupt and SIGTERM re-enqueue it and propagate."""
    from optuna.trial import TrialState

    space = ctx.search_space
    fid = ctx.fid
    for k, v in process_identity().items():
        trial.set_user_attr(k, v)
    out = trial_dir(ctx, study, trial)
    trial.set_user_attr("run_dir", str(out.relative_to(ctx.run_dir)))
    t0 = time.time()
    storage = study._storage  # noqa: SLF001 (heartbeats go to the storage the trial lives in)
    with Heartbeat(storage, trial._trial_id):  # noqa: SLF001
        try:
            values = _run(study, trial, ctx, data, space, fid, out, hook, verbose)
        except TrialStop as stop:
            trial.set_user_attr("duration_s", round(time.time() - t0, 2))
            if stop.state == "pruned":
                if stop.reason:
                    trial.set_user_attr("stopped", stop.reason)
                study.tell(trial, state=TrialState.PRUNED)
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
            trial.set_user_attr("fail_reason", _reason(err))
            trial.set_user_attr("duration_s", round(time.time() - t0, 2))
            study.tell(trial, state=TrialState.FAIL)
            return "fail"
    trial.set_user_attr("duration_s", round(time.time() - t0, 2))
    study.tell(trial, values if ctx.multi_objective else values[0])
    return "complete"


class _Interrupted(Exception):
    pass


def _reason(err: BaseException) -> str:
    import torch

    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower():
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return f"out of memory: {text[:300]}"
    if isinstance(err, LmforgeError):
        return text[:500]
    return f"{type(err).__name__}: {text[:400]}"


def _run(
    study: Any,
    trial: Any,
    ctx: SearchContext,
    data: SearchData,
    space: SearchSpace,
    fid: Fidelity,
    out: Path,
    hook: Callable[[], None] | None,
    verbose: bool,
) -> list[float]:
    from lmforge.search.sizing import count_params

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

    tokens_left = None
    if ctx.search_tokens is not None:
        tokens_left = ctx.search_tokens - tokens_used(study.get_trials(deepcopy=False))
        if tokens_left <= 0:
            raise TrialStop("pruned", "search budget exhausted before the trial started")
    if ctx.deadline_unix is not None and time.time() >= ctx.deadline_unix:
        raise TrialStop("pruned", "search budget exhausted before the trial started")

    if ctx.cv >= 2:
        loss = _cross_validate(trial, ctx, cfg, data, out, hook, verbose, tokens_left)
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
            tokens_left=tokens_left,
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
    trial: Any,
    ctx: SearchContext,
    cfg: RunConfig,
    prepared: Any,
    val: np.ndarray,
    out: Path,
    fid: Fidelity,
    hook: Callable[[], None] | None,
    verbose: bool,
    *,
    prune: bool,
    tokens_left: float | None,
    offset: int = 0,
) -> tuple[float, int]:
    """Train one run directory; (best validation loss, tokens trained so far by the trial)."""
    from lmforge.train.loop import train

    # the loop's own clock stops a trial at the search deadline between evaluations; it counts the time of
    # earlier attempts of this run directory, so the checkpoint's clock is added
    if ctx.deadline_unix is not None:
        left = ctx.deadline_unix - time.time()
        if left <= 0:
            raise TrialStop("pruned", "search budget exhausted before the trial started")
        cap = left + _elapsed_at_checkpoint(out)
        if cfg.train.max_time is None or cap < cfg.train.max_time:
            cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_time": cap})})
    reporter = _Reporter(trial, ctx, prune, tokens_left, hook, offset)
    result = train(
        cfg,
        out,
        data=prepared,
        callbacks=[reporter],
        verbose=verbose,
        val_batches=fixed_val_batches(val, cfg, ctx.eval_blocks),
    )
    reporter.tokens = result.tokens
    trial.set_user_attr("tokens", int(result.tokens))
    trial.set_user_attr("tokens_trained", reporter.trained)
    if result.stop_reason == "sigterm":
        raise _Interrupted()
    if reporter.pruned:
        raise TrialStop("pruned", "")
    past_deadline = ctx.deadline_unix is not None and time.time() >= ctx.deadline_unix - 1.0
    if reporter.budget_stop or (result.stop_reason == "max_time" and past_deadline):
        raise TrialStop("pruned", f"search budget exhausted at {result.tokens:,} tokens")
    if result.stop_reason == "max_time" and result.tokens < fid.max_tokens:
        raise TrialStop(
            "fail",
            f"exceeded its time share of {cfg.train.max_time:.0f}s at {result.tokens:,} of {fid.max_tokens:,} tokens",
        )
    if not math.isfinite(result.best_val_loss):
        raise TrialStop("fail", "no finite validation loss")
    return float(result.best_val_loss), reporter.trained


def _cross_validate(
    trial: Any,
    ctx: SearchContext,
    cfg: RunConfig,
    data: SearchData,
    out: Path,
    hook: Callable[[], None] | None,
    verbose: bool,
    tokens_left: float | None,
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
            tokens_left=tokens_left,
            offset=trained,
        )
        losses.append(loss)
        trial.set_user_attr("fold_losses", losses)
    (out / "cv.json").write_text(json.dumps({"fold_losses": losses, "mean": float(np.mean(losses))}) + "\n")
    return float(np.mean(losses))


def _elapsed_at_checkpoint(run_dir: Path) -> float:
    """Training seconds recorded by the newest checkpoint of ``run_dir`` (0 without one)."""
    from lmforge.runs import META_FILE, list_checkpoints

    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        return 0.0
    try:
        return float(json.loads((ckpts[-1] / META_FILE).read_text(encoding="utf-8")).get("elapsed_s") or 0.0)
    except (OSError, ValueError):
        return 0.0


# --------------------------------------------------------------------------------------- latency
def measure_latency(model_dir: Path, new_tokens: int = LATENCY_TOKENS) -> float:
    """Milliseconds per token of a greedy decode of ``new_tokens`` tokens (after a short warm-up), on the
    device the model was trained on (``train.device``)."""
    import torch

    from lmforge.predict import GenerationConfig, generate
    from lmforge.runs import load_model
    from lmforge.train.loop import resolve_device

    model, tokenizer, cfg = load_model(model_dir)
    device = resolve_device(cfg.train.device)
    model.to(device)
    prompt = [[tokenizer.eot_id if tokenizer.eot_id is not None else 0]]
    if getattr(model, "max_seq_len", None):
        new_tokens = max(1, min(new_tokens, model.max_seq_len - 1))
    gen = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=[])
    with torch.inference_mode():
        generate(model, prompt, GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=[]))
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = generate(model, prompt, gen)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
    n = max(1, len(out.sequences[0][0]))
    return 1000.0 * elapsed / n
