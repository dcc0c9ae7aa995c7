"""``lmforge tune``: the multi-step optimization pipeline, resumable step by step.

Steps (each recorded in ``DIR/pipeline.json`` when done, so a killed run continues where it stopped):

1. ``search``: architecture and hyperparameters together, multi-fidelity (trials in ``DIR/trials/NNNN``, the
   study in ``DIR/study.journal`` or ``--storage``);
2. ``final``: the best configuration continues from its own last checkpoint (``DIR/final``) with the budget
   left, to convergence (early stopping); ``DIR/best`` gets the best validation checkpoint;
3. ``decode``: decoding-settings tuning, for task data only (skipped for a plain corpus);
4. ``evaluate``: the held-out test half of the validation documents, ``DIR/leaderboard.csv``,
   ``DIR/summary.json`` and, where ``lmforge.search.report`` is installed, the HTML report.

The budget (time or tokens) covers all steps; :mod:`lmforge.search.budget` splits it. Data: the prepared
validation split is halved by documents: one half scores the trials and the final training, the other is
only read by the final evaluation.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmforge.atomic import atomic_write_json
from lmforge.config import DECAYING_SCHEDULES, ConfigError, apply_overrides, build_config, load_yaml
from lmforge.search.budget import (
    STEPS,
    Budget,
    Ledger,
    format_amount,
    format_count,
    parse_budget,
    parse_bytes,
    parse_count,
    plan_fidelity,
)
from lmforge.search.leaderboard import LiveTable, rows, write_csv
from lmforge.search.objective import (
    CONTEXT_ATTR,
    OBJECTIVES,
    SearchContext,
    SearchData,
    fixed_val_batches,
    measure_latency,
    prepare_search_data,
    tokens_used,
)
from lmforge.search.space import load_space, parse_space
from lmforge.search.study import (
    PRUNERS,
    SAMPLERS,
    SearchError,
    create_or_load,
    dashboard_command,
    open_storage,
    quiet_optuna,
    recover_interrupted,
    storage_url,
)

STATE_FILE = "pipeline.json"
_STATE_VERSION = 1
FINAL_PATIENCE = 6
"""Evaluations without improvement before the final training stops."""
RUNG_MIN_STEPS = 16
"""Optimizer steps of the shortest rung (unless --trial-tokens sets the trial length)."""
FINAL_STEP_CAP = 3
"""A time-budgeted final training may run up to this many times the steps estimated from the trial's speed
(the clock, and its learning-rate decay, end it)."""
EVAL_BLOCKS = 512
"""Most blocks scored per split by the final evaluation."""


@dataclass
class TuneOptions:
    """The options of ``lmforge tune`` (see ``lmforge tune --help``)."""

    out: str
    data: str | None = None
    budget: str | None = None
    space: str | None = None
    sampler: str | None = None
    pruner: str | None = None
    objectives: list[str] = field(default_factory=lambda: ["val_loss"])
    max_params: str | int | None = None
    cv: int = 0
    n_jobs: int = 1
    storage: str | None = None
    study_name: str | None = None
    disk_cap: str | int | None = "2GB"
    seed: int = 0
    n_trials: int | None = None
    trial_tokens: str | int | None = None
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    verbose: bool = True
    progress_interval: float = 15.0
    backend: str = "embedded"
    """``embedded`` (worker processes on one study) or ``ray`` (Ray Tune trials; see ``ray_backend``)."""
    address: str | None = None
    """Ray cluster: ``auto``, ``HOST:PORT`` or ``ray://HOST:PORT`` (default: a local Ray instance)."""
    trial_resources: str | None = None
    """Ray resources per trial, e.g. ``cpu=1,gpu=0.5``."""
    resume: bool = False
    """Continue the run in ``out`` (it must exist), the Ray experiment included."""
    strategy: str = "optuna"
    """``optuna`` (the sampler proposes every trial) or ``evolution`` (regularized evolution: children are
    mutated copies of trained parents that continue from the parent's weights; see ``search.evolution``)."""
    population: int = 8
    sample: int = 3


DEFAULT_BUDGET = "10m"
BACKENDS = ("embedded", "ray")
STRATEGIES = ("optuna", "evolution")
_DEFAULTS = TuneOptions(out="")


# ------------------------------------------------------------------------------------ run lock
@contextlib.contextmanager
def _run_lock(run_dir: Path) -> Iterator[None]:
    """One ``lmforge tune`` per run directory (the lock dies with the process)."""
    import fcntl

    f = open(run_dir / ".tune.lock", "a+")  # noqa: SIM115
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise SearchError(f"{run_dir} is in use by another lmforge tune process") from None
    try:
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def read_state(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise SearchError(f"{path} is corrupted ({err}); move it away to start the run over") from None


# ------------------------------------------------------------------------------------ pipeline
def run_pipeline(opts: TuneOptions) -> dict[str, Any]:
    """Run (or continue) the pipeline in ``opts.out``; return the summary (also in ``DIR/summary.json``)."""
    quiet_optuna()
    run_dir = Path(opts.out).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    with _run_lock(run_dir):
        return _Pipeline(opts, run_dir).run()


class _Pipeline:
    def __init__(self, opts: TuneOptions, run_dir: Path) -> None:
        self.opts = opts
        self.run_dir = run_dir
        self.state: dict[str, Any] = {}
        self.data: SearchData | None = None
        self._t = time.monotonic()
        self._saved = 0.0
        self._step = "search"

    # -- output -----------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.opts.verbose:
            print(msg, file=sys.stderr, flush=True)

    # -- state ------------------------------------------------------------------------------------
    def save(self, force: bool = True) -> None:
        if force or time.time() - self._saved > 5:
            atomic_write_json(self.run_dir / STATE_FILE, self.state)
            self._saved = time.time()

    @property
    def budget(self) -> Budget:
        return Budget.from_dict(self.state["budget"])

    def ledger(self) -> Ledger:
        key = "spent_s" if self.budget.kind == "time" else "spent_tokens"
        return Ledger(self.budget, spent=self.state[key])

    def tick(self, step: str | None = None, save: bool = False) -> None:
        """Charge the wall-clock time since the last tick to the current step."""
        now = time.monotonic()
        self.state["spent_s"][step or self._step] += now - self._t
        self._t = now
        self.save(force=save)

    def set_step(self, step: str, **fields: Any) -> None:
        self.state["steps"][step].update(fields)
        self.save()

    # -- entry --------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        existing = read_state(self.run_dir)
        if existing is None and self.opts.resume:
            raise SearchError(f"--resume: {self.run_dir} holds no lmforge tune run to resume")
        if existing is None:
            self._init()
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
            for step in STEPS:
                if self.state["steps"][step]["status"] in ("done", "skipped"):
                    continue
                self._step = step
                getattr(self, f"_step_{step}")()
                self.tick(step, save=True)
        finally:
            self.tick(save=True)
        return json.loads((self.run_dir / "summary.json").read_text(encoding="utf-8"))

    # -- first run: resolve everything the study depends on -------------------------------------
    def _init(self) -> None:
        o = self.opts
        budget = parse_budget(o.budget or DEFAULT_BUDGET)
        base = load_yaml(o.config) if o.config else {}
        extra = (["--data.path", o.data] if o.data else []) + list(o.overrides)
        base = apply_overrides(base, extra)
        base_cfg = build_config(base)
        if not base_cfg.data.path:
            raise ConfigError("no data: pass --data PATH|demo|hf:NAME")
        if o.backend not in BACKENDS:
            raise SearchError(f"--backend {o.backend!r}: unknown; known: {', '.join(BACKENDS)}")
        if o.strategy not in STRATEGIES:
            raise SearchError(f"--strategy {o.strategy!r}: unknown; known: {', '.join(STRATEGIES)}")
        if o.strategy == "evolution" and (o.backend == "ray" or o.cv >= 2 or o.sampler == "grid"):
            raise SearchError("--strategy evolution runs one trial at a time on the embedded backend, "
                              "without --cv or --sampler grid")
        if Path(base_cfg.data.path).exists():  # workers on other machines and Ray trials run in other folders
            base.setdefault("data", {})["path"] = str(Path(base_cfg.data.path).resolve())
        objectives = _objectives(o.objectives)
        multi = len(objectives) > 1
        sampler = o.sampler or ("nsga2" if multi else "tpe")
        if sampler not in SAMPLERS:
            raise SearchError(f"--sampler {sampler!r}: unknown; known: {', '.join(SAMPLERS)}")
        pruner = o.pruner or ("none" if multi or o.cv >= 2 else "asha")
        if pruner not in PRUNERS:
            raise SearchError(f"--pruner {pruner!r}: unknown; known: {', '.join(PRUNERS)}")
        notes = []
        if o.strategy == "evolution" and pruner != "none":
            notes.append("evolution: no pruner (selection happens in the tournaments)")
            pruner = "none"
        if multi and pruner != "none":
            notes.append(f"--pruner {pruner} ignored: Optuna prunes single-objective studies only")
            pruner = "none"
        if o.cv >= 2 and pruner != "none":
            notes.append(f"--pruner {pruner} ignored with --cv: the score is the mean over folds")
            pruner = "none"
        if o.cv == 1 or o.cv < 0:
            raise SearchError(f"--cv {o.cv}: use 0 (no cross-validation) or k >= 2 folds")
        if o.n_jobs < 1:
            raise SearchError(f"--n-jobs {o.n_jobs}: must be at least 1")
        if o.backend == "ray":  # refused before any data is read (also: Ray is installed)
            from lmforge.search.ray_backend import check_options, parse_resources

            check_options(sampler=sampler, pruner=pruner, cv=o.cv, objectives=objectives)
            parse_resources(o.trial_resources)
        max_params = parse_count(o.max_params) if o.max_params is not None else None
        disk_cap = parse_bytes(o.disk_cap) if o.disk_cap is not None else None
        trial_tokens = parse_count(o.trial_tokens, "--trial-tokens") if o.trial_tokens is not None else None
        space = load_space(o.space).restrict(_override_paths(o.overrides))

        self.log(f"preparing data {base_cfg.data.path!r} ...")
        data = prepare_search_data(base, o.cv, o.seed)
        self.data = data
        vocab = data.tokenizer.vocab_size
        n_train = len(data.prepared.train)
        self.log(
            f"data: {format_count(n_train)} training tokens, {format_count(len(data.prepared.val))} "
            f"validation, {format_count(len(data.test))} test (vocabulary {vocab})"
        )

        # -- how much the search can train, and how large a model the budget can take
        led = Ledger(budget)
        tps = base_cfg.train.batch_size * base_cfg.data.block_size * base_cfg.train.grad_accum
        plan: dict[str, Any] = {"tokens_per_step": tps}
        from lmforge.search import sizing

        if budget.kind == "time":
            flops, ref_tok_s = sizing.measure_throughput(base, data.prepared.train, vocab)
            search_s = budget.amount * led.shares["search"]
            final_s = budget.amount * led.shares["final"]
            cap = sizing.size_cap_for_time(flops, final_s + search_s / 8, n_train)
            typical = max(1.0, 6.0 * cap / 3)  # FLOPs per token of a typical (third-of-the-cap) model
            # small models are bound by per-step overhead (the reference's speed), larger ones by FLOPs
            tok_s = min(flops / typical, ref_tok_s)
            search_tokens_est = 0.6 * tok_s * search_s * o.n_jobs**0.5
            final_model_tokens = tok_s * (final_s + search_s / 8)
            plan.update(flops_per_s=flops, reference_tokens_per_s=ref_tok_s, search_tokens_estimate=search_tokens_est)
        else:
            search_tokens_est = budget.amount * led.shares["search"]
            final_tokens = budget.amount * led.shares["final"]
            cap = sizing.size_cap_for_tokens(final_tokens + search_tokens_est / 8, n_train)
            final_model_tokens = final_tokens + search_tokens_est / 8
        # the first rung needs enough optimizer steps to rank trials by more than their initialization; a
        # trial length set by the user (--trial-tokens) gets as many rungs as fit it
        fid = plan_fidelity(
            search_tokens_est, tps, max_tokens=trial_tokens, min_steps=4 if trial_tokens else RUNG_MIN_STEPS
        )
        plan.update(param_cap=cap, fidelity=fid.to_dict())

        # -- the space: the user's as given, or the default one narrowed to the budget
        param_cap = None
        if o.space is None:
            space, cap_notes = sizing.cap_space(space, base, vocab, cap)
            space, reg_notes = sizing.fix_regularization(space, final_model_tokens / max(1, n_train))
            notes += cap_notes + reg_notes
            param_cap = cap
        space = parse_space(space.to_spec(), source=o.space or "default space")
        if sampler == "grid":
            grid = space.grid()
            notes.append(f"grid search over {len(grid)} configurations")

        name = o.study_name or self.run_dir.name
        url = storage_url(o.storage, self.run_dir)
        ctx = SearchContext(
            run_dir=str(self.run_dir),
            base_config=base,
            space=space.to_spec(),
            fidelity=fid.to_dict(),
            objectives=objectives,
            sampler=sampler,
            pruner=pruner,
            seed=o.seed,
            # several workers (other machines may join a shared storage): TPE then uses the constant liar
            parallel=o.n_jobs > 1 or o.storage is not None or o.backend == "ray",
            max_params=max_params,
            param_cap=param_cap,
            cv=o.cv,
            time_share_s=(budget.amount * led.shares["search"] / 3 if budget.kind == "time" else None),
            search_tokens=int(budget.amount * led.shares["search"]) if budget.kind == "tokens" else None,
            n_trials=o.n_trials,
            disk_cap=disk_cap,
        )
        study = create_or_load(open_storage(url), name, len(objectives))
        if study.user_attrs.get(CONTEXT_ATTR) and study.get_trials(deepcopy=False):
            raise SearchError(
                f"study {name!r} in {url} already holds trials of another run; use another --study-name or --out"
            )
        study.set_user_attr(CONTEXT_ATTR, ctx.to_dict())
        if sampler == "grid":
            for params in space.grid():
                study.enqueue_trial(params, skip_if_exists=True)
        elif o.strategy == "optuna" and space.starts:  # Ray's OptunaSearch asks the same study: it sees them too
            starts = space.start_params()
            for params in starts:  # tried first; the sampler fills in what a start point leaves out
                study.enqueue_trial(params, skip_if_exists=True)
            notes.append(f"{len(starts)} start point(s) of the space tried first")
        self.state = {
            "version": _STATE_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "options": asdict(o),
            "study_name": name,
            "storage": url,
            "budget": budget.to_dict(),
            "spent_s": {s: 0.0 for s in STEPS},
            "spent_tokens": {s: 0.0 for s in STEPS},
            "plan": plan,
            "notes": notes,
            "steps": {s: {"status": "pending"} for s in STEPS},
        }
        self.log("search space:\n  " + space.describe().replace("\n", "\n  "))
        self.log(
            f"trials: up to {format_count(fid.max_tokens)} tokens each, rungs from "
            f"{format_count(fid.min_tokens)} (x{fid.eta}); {pruner} pruning, {sampler} sampler"
            + (f"; models up to about {format_count(cap)} parameters" if param_cap else "")
        )
        self.save()

    def _resume(self, state: dict[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise SearchError(
                f"{self.run_dir / STATE_FILE} has version {state.get('version')}, expected {_STATE_VERSION}"
            )
        self.state = state
        o = self.opts
        stored = state["options"]
        keys = ("data", "space", "sampler", "pruner", "cv", "max_params", "seed", "config", "objectives", "backend",
                "strategy")
        given = {k: getattr(o, k) for k in keys if getattr(o, k) != getattr(_DEFAULTS, k)}
        differ = [k for k, v in given.items() if v != stored.get(k)]
        self.log(
            f"resuming {self.run_dir} (steps done: "
            f"{', '.join(s for s in STEPS if state['steps'][s]['status'] == 'done') or 'none'})"
        )
        if differ:
            self.log(f"note: the run keeps its stored settings; ignoring the new {', '.join('--' + d for d in differ)}")
        if o.budget and parse_budget(o.budget) != self.budget:
            new = parse_budget(o.budget)
            if new.kind != self.budget.kind:
                raise SearchError(f"--budget {o.budget}: this run's budget is {self.budget.kind}-based")
            self.log(f"budget changed from {self.budget} to {new}")
            state["budget"] = new.to_dict()
        if o.n_trials is not None:
            state["options"]["n_trials"] = o.n_trials

    # -- step 1: search ---------------------------------------------------------------------------
    def _study(self) -> tuple[Any, SearchContext]:
        from lmforge.search.worker import load_context

        study = create_or_load(
            open_storage(self.state["storage"]),
            self.state["study_name"],
            len(self.state["options"]["objectives"] or ["val_loss"]),
        )
        return study, load_context(study)

    def _search_data(self, ctx: SearchContext) -> SearchData:
        if self.data is None:
            self.data = prepare_search_data(ctx.base_config, ctx.cv, ctx.seed)
        return self.data

    def _step_search(self) -> None:
        self.tick("search")
        study, ctx = self._study()
        led = self.ledger()
        if self.budget.kind == "time":
            ctx.deadline_unix = time.time() + led.allowance("search")
        else:
            ctx.search_tokens = int(self.budget.amount * led.shares["search"])
        ctx.n_trials = self.state["options"].get("n_trials")
        ctx.parallel = ctx.parallel or self.opts.n_jobs > 1
        study.set_user_attr(CONTEXT_ATTR, ctx.to_dict())
        ray = self.state["options"].get("backend", "embedded") == "ray"
        if not ray:  # Ray restores its own trials: their Optuna trials stay RUNNING for it
            exclusive = self.state["storage"] == storage_url(None, self.run_dir)
            recovered = recover_interrupted(study, exclusive=exclusive)
            if recovered:
                self.log(f"trial(s) {recovered} were interrupted by the last run: failed, enqueued again")
        self.set_step("search", status="running")

        table = LiveTable(
            study,
            ctx.objectives,
            ctx.fid,
            lambda: self._header(study, ctx),
            interval=self.opts.progress_interval,
            enabled=self.opts.verbose,
        )

        def hook() -> None:
            if self.budget.kind == "tokens":
                self.state["spent_tokens"]["search"] = tokens_used(study.get_trials(deepcopy=False))
            self.tick("search")
            table.maybe_print()

        ray_reason = None
        if ray:
            from lmforge.search.ray_backend import RayOptions, run_ray_search

            stored = self.state["options"]  # a resumed run keeps its cluster and trial size unless given anew
            ray_opts = RayOptions(
                address=self.opts.address or stored.get("address"),
                trial_resources=self.opts.trial_resources or stored.get("trial_resources"),
                max_concurrent=self.opts.n_jobs if self.opts.n_jobs > 1 else None,
                resume=self.opts.resume,
                verbose=self.opts.verbose,
            )
            ray_reason = run_ray_search(
                study, ctx, self._search_data(ctx), self.state["storage"], ray_opts, hook=hook, log=self.log
            )
        elif self.state["options"].get("strategy", "optuna") == "evolution":
            from lmforge.search.evolution import run_evolution

            o = self.state["options"]
            run_evolution(self.state["study_name"], self.state["storage"], data=self._search_data(ctx), hook=hook,
                          population=o.get("population", 8), sample=o.get("sample", 3), log=self.log)
        elif self.opts.n_jobs == 1:
            from lmforge.search.worker import run_worker

            run_worker(self.state["study_name"], self.state["storage"], data=self._search_data(ctx), hook=hook)
        else:
            self._run_processes(study, ctx, hook)
        hook()
        table.maybe_print(force=True)
        from lmforge.search.worker import search_done

        why = search_done(study, ctx) or ray_reason or "no trial left to run"
        self.log(f"search finished: {why}")
        self.set_step("search", status="done", reason=why)

    def _run_processes(self, study: Any, ctx: SearchContext, hook: Any) -> None:
        from lmforge.search.worker import spawn

        logs = self.run_dir / "logs"
        logs.mkdir(exist_ok=True)
        n = self.opts.n_jobs
        threads = max(1, (os.cpu_count() or 1) // n)
        procs = [
            spawn(self.state["study_name"], self.state["storage"], i, threads, str(logs / f"worker-{i}.log"))
            for i in range(n)
        ]
        self.log(f"{n} worker processes started (logs in {logs})")
        try:
            while any(p.poll() is None for p in procs):
                hook()
                time.sleep(1.0)
                if ctx.deadline_unix is not None and time.time() > ctx.deadline_unix + 60:
                    self._stop(procs)
        except KeyboardInterrupt:
            self._stop(procs)
            raise
        bad = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode not in (0, None)]
        if bad:
            self.log(f"worker(s) ended with errors {bad}: see {logs}")

    @staticmethod
    def _stop(procs: list[Any]) -> None:
        """SIGTERM: each worker's training saves a checkpoint and its trial is enqueued again."""
        for p in procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.time() + 60
        for p in procs:
            with contextlib.suppress(Exception):
                p.wait(timeout=max(0.1, deadline - time.time()))
            if p.poll() is None:
                p.kill()

    def _header(self, study: Any, ctx: SearchContext) -> str:
        led = self.ledger()
        used = tokens_used(study.get_trials(deepcopy=False))
        left = format_amount(led.allowance("search"), self.budget.kind)
        return (
            f"[search] {left} of the search budget left; {format_count(used)} tokens trained; "
            f"total budget left {format_amount(led.remaining(), self.budget.kind)}"
        )

    # -- step 2: final training -------------------------------------------------------------------
    def _step_final(self) -> None:
        from lmforge.runs import list_checkpoints, load_checkpoint
        from lmforge.train.loop import train

        study, ctx = self._study()
        best = select_best(study, ctx)
        if best is None:
            self._write_outputs(study, ctx)
            raise SearchError(
                "no trial produced a validation loss; see leaderboard.csv (fail reasons) and "
                "give a larger --budget or a different space"
            )
        trial_dir = self.run_dir / best.user_attrs["run_dir"]
        src = trial_dir / "fold-0" if ctx.cv >= 2 else trial_dir
        final_dir = self.run_dir / "final"
        led = self.ledger()
        allowance = led.allowance("final")
        plan = self.state["steps"]["final"].get("plan")
        if plan is None:
            cfg_raw = load_yaml(src / "config.yaml")
            ckpts = [] if ctx.cv >= 2 else list_checkpoints(src)
            start = load_checkpoint(ckpts[-1], load_trainer_state=False).meta if ckpts else {}
            step0, tokens0, elapsed0 = (
                int(start.get("step", 0)),
                int(start.get("tokens", 0)),
                float(start.get("elapsed_s", 0.0)),
            )
            tc = cfg_raw["train"]
            tps = int(tc["batch_size"]) * int(cfg_raw["data"]["block_size"]) * int(tc.get("grad_accum", 1))
            # the loop's clock leaves out checkpoint writing: keep a small margin for it
            train_s = max(0.0, allowance - (0.5 + 0.03 * allowance))
            if self.budget.kind == "tokens":
                extra = int(allowance // tps)
            else:
                rate = (
                    tokens0 / elapsed0
                    if tokens0 and elapsed0 > 0
                    else self.state["plan"].get("reference_tokens_per_s", 1e4)
                )
                extra = int(train_s * rate // tps)  # an estimate: the clock stops the final training
            if not ckpts:  # from scratch (cross-validation folds trained on part of the data)
                extra += int(tc["max_steps"])
            timed = self.budget.kind == "time"
            decaying = (cfg_raw.get("schedule") or {}).get("name") in DECAYING_SCHEDULES
            plan = {
                "trial": best.number,
                "from": str(ckpts[-1]) if ckpts else None,
                "start_step": step0,
                "start_tokens": tokens0,
                # a time budget: the learning rate decays over the time left (schedule.horizon time), the
                # steps only cap it, at several times the estimate
                "max_steps": step0 + max(0, FINAL_STEP_CAP * extra if timed else extra),
                "max_time": elapsed0 + train_s if timed else None,
                "horizon": "time" if timed and decaying else "steps",  # constant / plateau have no horizon
                # about 20 evaluations for early stopping, but not more often than the trials evaluated
                "eval_interval": max(1, int(tc["eval_interval"]), extra // 20),
                "checkpoint_interval": max(1, extra // 5),
            }
            self.set_step("final", plan=plan, status="running")
        self.log(
            f"final training: trial {plan['trial']} "
            + (f"continues from {plan['from']}" if plan["from"] else "trains from scratch")
            + f" up to step {plan['max_steps']} ({format_amount(allowance, self.budget.kind)} of budget)"
        )
        if plan["max_steps"] > plan["start_step"]:
            cfg_raw = load_yaml(src / "config.yaml")
            resume = "auto" if _has_checkpoints(final_dir) or not plan["from"] else plan["from"]
            cfg_raw["train"].update(
                resume=resume,
                max_steps=plan["max_steps"],
                max_tokens=None,
                max_epochs=None,
                max_time=plan["max_time"],
                patience=FINAL_PATIENCE,
                eval_interval=plan["eval_interval"],
                checkpoint_interval=plan["checkpoint_interval"],
                keep_last=2,
                progress=self.opts.verbose,
            )
            cfg_raw.setdefault("schedule", {})["horizon"] = plan.get("horizon", "steps")
            cfg = build_config(cfg_raw)
            data = self._search_data(ctx)
            result = train(
                cfg,
                final_dir,
                data=data.prepared,
                verbose=self.opts.verbose,
                val_batches=fixed_val_batches(data.prepared.val, cfg, ctx.eval_blocks),
            )
            trained = result.tokens - plan["start_tokens"] if plan["from"] else result.tokens
            self.state["spent_tokens"]["final"] = float(trained)
            self.set_step(
                "final", stop_reason=result.stop_reason, tokens=int(trained), best_val_loss=result.best_val_loss
            )
        chosen = final_dir / "best" if (final_dir / "best" / "COMPLETE").is_file() else src / "best"
        if not (chosen / "COMPLETE").is_file():
            raise SearchError(f"no best checkpoint in {chosen}: the trial's checkpoints were deleted")
        _install_dir(chosen, self.run_dir / "best")
        self.set_step("final", status="done", best_from=str(chosen.relative_to(self.run_dir)))

    # -- step 3: decoding settings (task data only) ---------------------------------------------
    def _step_decode(self) -> None:
        self.set_step("decode", status="skipped", reason="no task data: decoding settings apply to tasks")

    # -- step 4: evaluation and outputs -----------------------------------------------------------
    def _step_evaluate(self) -> None:
        import torch

        from lmforge.data import eval_batches
        from lmforge.runs import load_model
        from lmforge.train.loop import evaluate_loss, resolve_device

        study, ctx = self._study()
        data = self._search_data(ctx)
        best_dir = self.run_dir / "best"
        model, _, cfg = load_model(best_dir)
        device = resolve_device(cfg.train.device)
        model.to(device)
        result: dict[str, Any] = {}
        for name, tokens in (("val", data.prepared.val), ("test", data.test)):
            # up to EVAL_BLOCKS blocks, evenly spread: all of a small split, an estimate of a large one
            batches = eval_batches(tokens, cfg.data.block_size, 16, EVAL_BLOCKS // 16)
            if batches:
                loss, n_tokens = evaluate_loss(model, batches, device)
                result[f"{name}_loss"] = loss
                result[f"{name}_ppl"] = math.exp(min(loss, 50.0))
                result[f"{name}_bits_per_token"] = loss / math.log(2)
                result[f"{name}_tokens_scored"] = n_tokens
        result["params"] = int(model.num_params())
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        result["latency_ms_per_token"] = measure_latency(best_dir)
        # the outputs are written with the step marked done, and only then is the state saved: a kill in
        # between repeats this step
        self.state["steps"]["evaluate"].update(result, status="done")
        self.tick("evaluate")
        self._write_outputs(study, ctx)
        self.save()
        s = json.loads((self.run_dir / "summary.json").read_text(encoding="utf-8"))
        self.log(_summary_text(s))

    def _write_outputs(self, study: Any, ctx: SearchContext) -> None:
        table = rows(study, ctx.objectives, ctx.fid)
        write_csv([r for r in table], self.run_dir / "leaderboard.csv")
        summary = build_summary(self.run_dir, self.state, study, ctx, table)
        atomic_write_json(self.run_dir / "summary.json", summary)
        if importlib.util.find_spec("lmforge.search.report") is not None:
            from lmforge.search import report  # type: ignore[attr-defined]

            try:
                path = report.build_report(self.run_dir)
                self.log(f"report: {path}")
            except Exception as err:  # the report is an extra: its failure must not lose the run's results
                self.log(f"warning: the HTML report failed: {type(err).__name__}: {err}")


# ------------------------------------------------------------------------------------- helpers
def _objectives(names: list[str]) -> list[str]:
    out = [n.strip() for n in names if n.strip()]
    bad = [n for n in out if n not in OBJECTIVES]
    if bad:
        raise SearchError(f"--objectives: unknown {bad}; known: {', '.join(OBJECTIVES)}")
    if not out or out[0] != "val_loss" or len(set(out)) != len(out):
        raise SearchError(f"--objectives {','.join(out)}: val_loss must come first, each objective once")
    return out


def _override_paths(overrides: list[str]) -> set[str]:
    return {tok[2:].split("=", 1)[0] for tok in overrides if tok.startswith("--")}


def _has_checkpoints(run: Path) -> bool:
    from lmforge.runs import list_checkpoints

    return bool(list_checkpoints(run))


def _install_dir(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` so that ``dst`` is always either the old or the new complete copy."""
    tmp = dst.with_name(f".tmp-{dst.name}-{uuid.uuid4().hex[:8]}")
    shutil.copytree(src, tmp)
    if dst.exists():
        old = dst.with_name(f".old-{dst.name}-{uuid.uuid4().hex[:8]}")
        os.rename(dst, old)
        os.rename(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dst)


def select_best(study: Any, ctx: SearchContext) -> Any:
    """The finished trial with the lowest validation loss (within ``--max-params``); failing that, the
    pruned trial with the lowest last report whose checkpoints remain. None when there is neither."""
    from optuna.trial import TrialState

    from lmforge.search.disk import MARKER

    def ok(t: Any) -> bool:
        rel = t.user_attrs.get("run_dir")
        if not rel or (Path(ctx.run_dir) / rel / MARKER).exists():
            return False
        return ctx.max_params is None or int(t.user_attrs.get("params") or 0) <= ctx.max_params

    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.values and math.isfinite(t.values[0]) and ok(t)]
    if done:
        return min(done, key=lambda t: t.values[0])
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values and ok(t)]
    if pruned:
        return min(pruned, key=lambda t: min(t.intermediate_values.values()))
    return None


def build_summary(
    run_dir: Path, state: dict[str, Any], study: Any, ctx: SearchContext, table: list[dict[str, Any]]
) -> dict[str, Any]:
    from optuna.trial import TrialState

    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("discarded")]
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    search_tokens = tokens_used(trials)
    finished_tokens = sum(int(t.user_attrs.get("tokens", 0)) for t in complete)
    final = state["steps"]["final"]
    best_trial = None
    if final.get("plan"):
        n = final["plan"]["trial"]
        bt = next((t for t in trials if t.number == n), None)
        if bt is not None:
            space = ctx.search_space
            searched = {d.path for d in space.dists}
            best_trial = {
                "trial": n,
                # an evolution child's mutated values may lie outside the space: it records them itself
                "values": {k: v for k, v in (bt.user_attrs.get("values") or space.values_from_params(bt.params)).items()
                           if k in searched},
                "search_val_loss": bt.values[0] if bt.values else bt.user_attrs.get("val_loss"),
                "params": bt.user_attrs.get("params"),
            }
    evaluation = {k: v for k, v in state["steps"]["evaluate"].items() if k != "status"}
    pareto = [t.number for t in study.best_trials] if len(ctx.objectives) > 1 and complete else []
    budget = Budget.from_dict(state["budget"])
    return {
        "run_dir": str(run_dir),
        "study": {
            "name": state["study_name"],
            "storage": state["storage"],
            "dashboard": dashboard_command(state["storage"]),
        },
        "budget": {
            "total": str(budget),
            **budget.to_dict(),
            "shares": Ledger(budget).shares,
            "spent_s": {k: round(v, 2) for k, v in state["spent_s"].items()},
            "spent_tokens": state["spent_tokens"],
        },
        "objectives": ctx.objectives,
        "sampler": ctx.sampler,
        "pruner": ctx.pruner,
        "cv": ctx.cv,
        "fidelity": ctx.fidelity,
        "trials": {"total": len(trials), **counts},
        "tokens": {
            "search_total": search_tokens,
            "finished_trials": finished_tokens,
            "finished_share": round(finished_tokens / search_tokens, 4) if search_tokens else None,
            "final_training": final.get("tokens", 0),
        },
        "best": {**(best_trial or {}), **evaluation, "checkpoint": str(run_dir / "best")},
        "pareto_front": pareto,
        "steps": {k: v.get("status") for k, v in state["steps"].items()},
        "leaderboard": str(run_dir / "leaderboard.csv"),
        "notes": state.get("notes", []),
    }


def _summary_text(s: dict[str, Any]) -> str:
    b = s["best"]
    t = s["trials"]
    tok = s["tokens"]
    lines = [
        "",
        f"== lmforge tune: {s['run_dir']}",
        f"trials: {t['total']} ({t.get('complete', 0)} finished, {t.get('pruned', 0)} pruned, "
        f"{t.get('fail', 0)} failed)",
        f"tokens: {format_count(tok['search_total'])} trained in the search, {format_count(tok['finished_trials'])} "
        f"of them in finished trials; {format_count(tok['final_training'])} in the final training",
    ]
    if b.get("values"):
        lines.append(
            "best configuration (trial {}): {}".format(
                b.get("trial"), ", ".join(f"{k}={v}" for k, v in b["values"].items())
            )
        )
    if "test_loss" in b:
        lines.append(
            f"test loss {b['test_loss']:.4f} (perplexity {b['test_ppl']:.2f}); validation loss "
            f"{b.get('val_loss', float('nan')):.4f}; {format_count(b.get('params') or 0)} parameters; "
            f"{b.get('latency_ms_per_token', float('nan')):.2f} ms/token greedy"
        )
    if s["pareto_front"]:
        lines.append(f"Pareto front: trials {s['pareto_front']}")
    lines += [
        f"best model: {b['checkpoint']}",
        f"leaderboard: {s['leaderboard']}",
        f"dashboard: {s['study']['dashboard']}",
    ]
    return "\n".join(lines)
