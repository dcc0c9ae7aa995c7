"""``lmforge tune --backend ray``: the search step as a Ray Tune experiment.

- Search algorithm: Optuna through :class:`ray.tune.search.optuna.OptunaSearch`, on the run's own study (the
  same storage as the embedded backend), so the leaderboard, the final training and the report read the
  trials exactly as they read embedded ones. Only the driver writes to the study: trials report to Ray, and
  the searcher (:class:`LmforgeOptunaSearch`) records each report as the trial's Optuna report and attributes.
- Scheduler: ``--pruner`` picks it, with trained tokens as the time attribute: ``asha``/``sha`` ->
  ``ASHAScheduler``, ``hyperband`` -> ``HyperBandScheduler``, ``median`` -> ``MedianStoppingRule``,
  ``none`` -> FIFO. Rungs are the same token fidelity the embedded backend uses.
- Trials (:func:`ray_trial`) train in ``DIR/trials/NNNN`` (NNNN: the Optuna trial number) with the one
  training loop. A callback ends the loop at every evaluation, right after which the loop writes its
  checkpoint; the trial then calls ``tune.report(metrics, checkpoint=that checkpoint)`` and continues from
  it. So every report carries the exact state it scores: a trial that the scheduler pauses and promotes
  (HyperBand), or that Ray restores on another node, continues bit for bit instead of retraining.
- Restore: the experiment lives in ``DIR/ray/search``; when the driver dies, ``lmforge tune --out DIR
  --backend ray --resume`` (or the same command again) calls ``Tuner.restore``: finished trials stay,
  unfinished ones continue from their last checkpoints. ``DIR`` must be on a filesystem every node sees
  (Ray requires shared storage for the checkpoints of a multi-node experiment).

Ray is imported here only: ``pip install 'lmforge[ray]'``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.exceptions import UpdateFinishedTrialError
from optuna.samplers import BaseSampler
from optuna.storages import BaseStorage
from optuna.trial import BaseTrial, TrialState

from lmforge.config import ConfigError
from lmforge.runs import META_FILE, checkpoint_dir, list_checkpoints, read_metrics
from lmforge.search.budget import Fidelity, budget_spent, tokens_used
from lmforge.search.context import SearchContext, SearchData, fixed_val_batches, trial_config
from lmforge.search.disk import enforce_disk_cap
from lmforge.search.failure import failure_reason
from lmforge.search.sizing import count_params
from lmforge.search.space import parse_space
from lmforge.search.speed_guard import SpeedGuard, overran
from lmforge.search.study import MAX_RETRY, SearchError, make_sampler, open_storage, trial_storage
from lmforge.train.loop import Callback, LoopState, train

try:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler, MedianStoppingRule
    from ray.tune.search.optuna import OptunaSearch
except ImportError:  # one line for the user instead of a traceback
    raise SearchError("--backend ray needs Ray: pip install 'lmforge[ray]' (or pip install 'ray[tune]')") from None

EXPERIMENT = "search"
"""The Ray experiment's name: it lives in ``DIR/ray/search``."""
CONFIG_KEY = "lmforge"
"""Key of a Ray trial's config holding its Optuna trial number and sampled values."""
PRUNER_SCHEDULERS = {
    "asha": "ASHA",
    "sha": "ASHA",
    "successive_halving": "ASHA",
    "hyperband": "HyperBand",
    "median": "median stopping",
    "none": "FIFO",
}


@dataclass
class RayOptions:
    """How to run the Ray experiment (``lmforge tune --address --trial-resources --n-jobs --resume``)."""

    address: str | None = None
    trial_resources: str | None = None
    max_concurrent: int | None = None
    resume: bool = False
    verbose: bool = True


def parse_resources(text: str | None) -> dict[str, float]:
    """``"cpu=1,gpu=0.5"`` -> ``{"cpu": 1.0, "gpu": 0.5}`` (other names are custom Ray resources); default
    one CPU per trial."""
    if not text:
        return {"cpu": 1.0}
    out: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.strip().partition("=")
        try:
            amount = float(value)
        except ValueError:
            amount = -1.0
        if not sep or not name.strip() or amount < 0 or not math.isfinite(amount):
            raise SearchError(f"--trial-resources {text!r}: use NAME=AMOUNT pairs, e.g. cpu=1,gpu=0.5")
        out[name.strip().lower()] = amount
    out.setdefault("cpu", 1.0)
    return out


def check_options(*, sampler: str, pruner: str, cv: int, objectives: list[str]) -> None:
    """Refuse, before anything runs, what the Ray backend does not do."""
    if len(objectives) > 1:
        raise SearchError(
            "--backend ray searches one objective (val_loss); use the embedded backend for a Pareto front"
        )
    if cv >= 2:
        raise SearchError("--backend ray does not run --cv folds; use the embedded backend")
    if sampler == "grid":
        raise SearchError("--backend ray does not run --sampler grid; use the embedded backend or another sampler")
    if pruner not in PRUNER_SCHEDULERS:
        raise SearchError(f"--pruner {pruner!r}: no Ray scheduler for it; known: {', '.join(PRUNER_SCHEDULERS)}")


# ---------------------------------------------------------------------------------- driver state
@dataclass
class _Live:
    """What the driver's stopper, callback and searcher need at run time. They are pickled with the
    experiment (and restored from it), so they hold only a key into ``_LIVE``, not these objects."""

    study: optuna.Study
    ctx: SearchContext
    hook: Callable[[], None] | None = None
    stop_reason: str | None = None
    checked: float = 0.0


_LIVE: dict[str, _Live] = {}


class DefineByRun:
    """The Optuna define-by-run space for ``OptunaSearch``: samples the lmforge space and passes the trial
    number and the values (by config path) on in the Ray config. A class, so that it pickles."""

    def __init__(self, space_spec: dict[str, Any]) -> None:
        self.space_spec = space_spec

    def __call__(self, trial: BaseTrial) -> dict[str, Any]:
        values = parse_space(self.space_spec, source="search space").suggest(trial)
        return {CONFIG_KEY: {"number": int(trial.number), "values": values}}


class LmforgeOptunaSearch(OptunaSearch):
    """``OptunaSearch`` on the run's study that records trials as the embedded backend does: reports at
    ``step = trained tokens``, the trial's attributes (``run_dir``, ``params``, ``tokens``...), COMPLETE only
    for trials trained to the full length (value: the best validation loss), PRUNED for those the scheduler
    or the budget stopped, FAIL with ``fail_reason``."""

    _ATTRS = ("run_dir", "params", "family", "node", "adjusted", "tokens", "tokens_trained", "val_loss")

    def __init__(
        self,
        *,
        key: str,
        space_spec: dict[str, Any],
        sampler: BaseSampler,
        storage: BaseStorage,
        study_name: str,
        max_tokens: int,
        scheduler: str,
    ) -> None:
        super().__init__(
            space=DefineByRun(space_spec),
            metric="val_loss",
            mode="min",
            sampler=sampler,
            study_name=study_name,
            storage=storage,
        )
        self.key = key
        self.max_tokens = int(max_tokens)
        self.scheduler_name = scheduler
        self._written: dict[str, dict[str, Any]] = {}

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        ot = self._ot_trials.get(trial_id)
        if ot is None or trial_id in self._completed_trials:
            return
        tokens = int(result.get("tokens") or 0)
        loss = result.get("val_loss")
        written = self._written.setdefault(trial_id, {})
        attrs = {k: result[k] for k in self._ATTRS if result.get(k) not in (None, "")}
        attrs["ray_trial_id"] = trial_id
        if result.get("time_total_s") is not None:
            attrs["duration_s"] = round(float(result["time_total_s"]), 2)
        try:
            if tokens > written.get("_reported", 0) and loss is not None and math.isfinite(loss):
                ot.report(float(loss), step=tokens)
                written["_reported"] = tokens
            for k, v in attrs.items():
                if written.get(k) != v:
                    ot.set_user_attr(k, v)
                    written[k] = v
        except UpdateFinishedTrialError:  # finished before the driver died and was restored
            self._completed_trials.add(trial_id)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        ot = self._ot_trials.get(trial_id)
        if ot is None or trial_id in self._completed_trials:
            return
        r = result or {}
        if r:
            self.on_trial_result(trial_id, r)
        tokens = int(r.get("tokens") or 0)
        best = r.get("best_val_loss")
        value = None
        live = _LIVE.get(self.key)
        note: tuple[str, str] | None = None
        if error or r.get("fail_reason"):
            state = TrialState.FAIL
            note = ("fail_reason", r.get("fail_reason") or "the Ray trial failed (see error.txt in DIR/ray/search)")
        elif r.get("stopped"):
            state, note = TrialState.PRUNED, ("stopped", r["stopped"])
        elif tokens >= self.max_tokens and best is not None and math.isfinite(best):
            state, value = TrialState.COMPLETE, float(best)
        else:
            state = TrialState.PRUNED
            if live is not None and live.stop_reason:
                note = ("stopped", f"search budget exhausted at {tokens:,} tokens")
            elif tokens:
                note = ("stopped", f"stopped by the {self.scheduler_name} scheduler at {tokens:,} tokens")
        try:
            if note is not None:
                ot.set_user_attr(*note)
            assert self._ot_study is not None  # set up by OptunaSearch before any trial completes
            self._ot_study.tell(ot, value, state=state)
        except Exception:  # told before the driver died and was restored: the study already has it
            pass
        self._completed_trials.add(trial_id)
        self._written.pop(trial_id, None)


class BudgetStopper(tune.Stopper):
    """Stops the experiment at the search deadline (time budgets) or when the trials trained the search's
    token budget; per trial it stops nothing (the scheduler does)."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return False

    def stop_all(self) -> bool:
        live = _LIVE.get(self.key)
        if live is None:
            return False
        if live.stop_reason:
            return True
        now = time.time()
        if now - live.checked < 1.0:  # Tune asks on every step of its loop; the study is read once a second
            return False
        live.checked = now
        ctx = live.ctx
        used = tokens_used(live.study.get_trials(deepcopy=False)) if ctx.search_tokens is not None else 0
        live.stop_reason = budget_spent(ctx, used)
        return live.stop_reason is not None


class DriverCallback(tune.Callback):
    """Progress on the driver: the pipeline's hook after every result, the disk cap after every trial."""

    def __init__(self, key: str) -> None:
        self.key = key

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        live = _LIVE.get(self.key)
        if live is not None and live.hook is not None:
            live.hook()

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        live = _LIVE.get(self.key)
        if live is None:
            return
        enforce_disk_cap(live.study, Path(live.ctx.run_dir), live.ctx.disk_cap, live.ctx.keep_best)
        if live.hook is not None:
            live.hook()


def make_scheduler(pruner: str, fid: Fidelity) -> Any:
    """The Ray scheduler for ``--pruner``, on trained tokens."""
    common: dict[str, Any] = {"time_attr": "tokens", "metric": "val_loss", "mode": "min"}
    if pruner in ("asha", "sha", "successive_halving"):
        return ASHAScheduler(
            **common,
            max_t=fid.max_tokens,
            grace_period=fid.min_tokens,
            reduction_factor=fid.eta,
            stop_last_trials=False,
        )
    if pruner == "hyperband":
        return HyperBandScheduler(**common, max_t=fid.max_tokens, reduction_factor=fid.eta, stop_last_trials=False)
    if pruner == "median":
        return MedianStoppingRule(**common, grace_period=fid.min_tokens, min_samples_required=3)
    return FIFOScheduler()


# ------------------------------------------------------------------------------------------ trials
class EndAtEval(Callback):
    """Ends the loop at each evaluation; the loop then saves the checkpoint of that very step."""

    def __init__(self) -> None:
        self.record: dict[str, Any] | None = None

    def on_eval(self, state: LoopState, record: dict[str, Any]) -> bool:
        self.record = dict(record)
        return True


def _adopt_checkpoint(src: Path, out: Path) -> None:
    """Make the Ray checkpoint ``src`` (an lmforge checkpoint directory) the trial's newest checkpoint,
    unless the trial directory already holds it or a newer one (a shared filesystem)."""
    step = int(json.loads((src / META_FILE).read_text(encoding="utf-8"))["step"])
    have = list_checkpoints(out) if out.exists() else []
    if have and int(json.loads((have[-1] / META_FILE).read_text(encoding="utf-8"))["step"]) >= step:
        return
    dst = checkpoint_dir(out, step)
    tmp = dst.with_name(f".adopt-{dst.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    os.rename(tmp, dst)


def ray_trial(config: dict[str, Any], ctx: dict[str, Any], data: SearchData, threads: int = 1) -> None:
    """One Ray Tune trial (a function trainable): train the sampled configuration in ``DIR/trials/NNNN``,
    one evaluation interval per call of the training loop, and report each evaluation with its checkpoint."""
    sctx = SearchContext.from_dict(ctx)
    fid = sctx.fid
    number = int(config[CONFIG_KEY]["number"])
    values = config[CONFIG_KEY]["values"]
    if threads > 0:
        torch.set_num_threads(threads)
    rel = f"trials/{number:04d}"
    out = Path(sctx.run_dir) / rel
    info: dict[str, Any] = {"number": number, "run_dir": rel, "node": socket.gethostname()}

    def report(metrics: dict[str, Any], ckpt: Path | None = None) -> None:
        checkpoint = tune.Checkpoint.from_directory(str(ckpt)) if ckpt is not None else None
        tune.report({**info, **metrics}, checkpoint=checkpoint)

    def end(tokens: int, **why: str) -> None:
        report({"tokens": tokens, "tokens_trained": tokens, "val_loss": math.inf, "done": True, **why})

    try:
        cfg, notes = trial_config(sctx.base_config, values, fid, sctx.time_share_s)
    except ConfigError as err:
        return end(0, fail_reason=f"invalid configuration: {err}")
    n_params, _ = count_params(cfg, data.tokenizer.vocab_size)
    info.update(params=n_params, family=cfg.model.family, adjusted="; ".join(notes))
    if sctx.max_params is not None and n_params > sctx.max_params:
        return end(0, stopped=f"{n_params:,} parameters exceed --max-params {sctx.max_params:,}; not trained")
    if sctx.param_cap is not None and n_params > 1.5 * sctx.param_cap:
        return end(0, stopped=f"{n_params:,} parameters: too large for the budget (cap about {sctx.param_cap:,})")

    restored = tune.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            _adopt_checkpoint(Path(d), out)
    chunk = EndAtEval()
    guard = SpeedGuard(sctx.time_share_s, fid.max_tokens)
    val_batches = fixed_val_batches(data.prepared.val, cfg, sctx.eval_blocks)
    while True:
        chunk.record = None
        try:
            result = train(cfg, out, data=data.prepared, callbacks=[chunk, guard], verbose=False,
                           val_batches=val_batches)  # fmt: skip
        except Exception as err:  # the trial fails with its reason; the experiment goes on
            out.mkdir(parents=True, exist_ok=True)
            (out / "error.txt").write_text(traceback.format_exc(), encoding="utf-8")
            done = read_metrics(out) if out.exists() else []
            return end(int(done[-1]["tokens"]) if done else 0, fail_reason=failure_reason(err))
        rec = chunk.record
        if rec is None:  # nothing was left to train (restored after its last report): report where it ended
            done = read_metrics(out)
            if not done:
                return end(int(result.tokens), fail_reason="no evaluation")
            rec = done[-1]
        final = result.stop_reason != "callback" or guard.too_slow is not None
        metrics: dict[str, Any] = {
            "tokens": int(rec["tokens"]),
            "tokens_trained": int(rec["tokens"]),
            "step": int(rec["step"]),
            "val_loss": float(rec["val_loss"]),
            "best_val_loss": float(result.best_val_loss),
            "done": final,
        }
        if guard.too_slow is not None:
            metrics["fail_reason"] = guard.too_slow
        elif final and result.stop_reason == "max_time" and result.tokens < fid.max_tokens:
            metrics["fail_reason"] = overran(cfg.train.max_time, result.tokens, fid.max_tokens)
        elif final and not math.isfinite(result.best_val_loss):
            metrics["fail_reason"] = "no finite validation loss"
        ckpts = list_checkpoints(out)
        report(metrics, ckpts[-1] if ckpts else None)
        if final:
            return


# ------------------------------------------------------------------------------------------ driver
def trial_dirname(trial: Any) -> str:
    """Ray's folder of a trial (under ``DIR/ray/search``): its id, not its whole configuration."""
    return f"trial_{trial.trial_id}"


def _init_ray(address: str | None, log: Callable[[str], None]) -> bool:
    """Connect to (or start) Ray unless this process already did; True when this call connected."""
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as err:
        where = address or "a local Ray instance"
        raise SearchError(f"--address {where}: cannot connect to Ray: {str(err).strip().splitlines()[0]}") from None
    res = ray.cluster_resources()
    log(f"ray: {ray.get_runtime_context().gcs_address}, {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs")
    return True


def _close_orphans(study: optuna.Study, run_dir: Path) -> None:
    """After the experiment: Optuna trials still RUNNING belong to no Ray trial any more (suggested by a
    driver that died before the experiment's snapshot recorded them, or cut off by the stop): pruned when
    they reported, else discarded, with whatever a first training chunk left in their folder."""
    storage = trial_storage(study)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        tid = t._trial_id  # noqa: SLF001
        try:
            if t.intermediate_values:
                tokens = int(t.user_attrs.get("tokens", 0))
                storage.set_trial_user_attr(tid, "stopped", f"search ended at {tokens:,} tokens")
                storage.set_trial_state_values(tid, TrialState.PRUNED)
                continue
            storage.set_trial_user_attr(tid, "discarded", True)
            storage.set_trial_state_values(tid, TrialState.FAIL)
        except Exception:  # finished meanwhile
            continue
        shutil.rmtree(run_dir / "trials" / f"{t.number:04d}", ignore_errors=True)


def run_ray_search(
    study: optuna.Study,
    ctx: SearchContext,
    data: SearchData,
    storage_url: str,
    opts: RayOptions,
    *,
    hook: Callable[[], None] | None = None,
    log: Callable[[str], None] = print,
) -> str:
    """Run (or restore) the search step as a Ray Tune experiment in ``ctx.run_dir/ray``; return why it
    ended."""
    check_options(sampler=ctx.sampler, pruner=ctx.pruner, cv=ctx.cv, objectives=ctx.objectives)
    resources = parse_resources(opts.trial_resources)
    # one checkpoint kept per trial makes Tune snapshot the experiment at every report: small files, no warning
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    connected = _init_ray(opts.address, log)

    root = Path(ctx.run_dir) / "ray"
    path = root / EXPERIMENT
    key = str(path)
    _LIVE[key] = _Live(study=study, ctx=ctx, hook=hook)
    threads = max(1, int(resources.get("cpu", 1)))
    trainable = tune.with_resources(
        tune.with_parameters(ray_trial, ctx=ctx.to_dict(), data=data, threads=threads), resources
    )
    try:
        if tune.Tuner.can_restore(str(path)):
            log(f"restoring the Ray experiment {path}: finished trials stay, unfinished ones continue")
            tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, resume_errored=False)
        else:
            if opts.resume:
                log(f"note: no Ray experiment to restore in {path}; starting one")
            searcher = LmforgeOptunaSearch(
                key=key,
                space_spec=ctx.space,
                sampler=make_sampler(
                    ctx.sampler, seed=ctx.seed, parallel=True, conditional=ctx.search_space.conditional
                ),
                storage=open_storage(storage_url),
                study_name=study.study_name,
                max_tokens=ctx.fid.max_tokens,
                scheduler=PRUNER_SCHEDULERS[ctx.pruner],
            )
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    search_alg=searcher,
                    scheduler=make_scheduler(ctx.pruner, ctx.fid),
                    num_samples=ctx.n_trials if ctx.n_trials is not None else -1,
                    max_concurrent_trials=opts.max_concurrent,
                    trial_dirname_creator=trial_dirname,
                ),
                run_config=tune.RunConfig(
                    name=EXPERIMENT,
                    storage_path=str(root),
                    stop=BudgetStopper(key),
                    callbacks=[DriverCallback(key)],
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                    failure_config=tune.FailureConfig(max_failures=MAX_RETRY),
                    verbose=0,
                ),
            )
        log(f"ray experiment {path} ({ctx.n_trials or 'unlimited'} trials, {resources} per trial)")
        grid = tuner.fit()
    finally:
        live = _LIVE.pop(key)
        if connected:  # the final training runs here, without Ray: free its workers (and a local instance)
            ray.shutdown()
    if grid.errors:
        log(f"{len(grid.errors)} Ray trial(s) ended with errors: see {path}")
    _close_orphans(study, Path(ctx.run_dir))
    return live.stop_reason or f"{len(grid)} Ray trials run"
