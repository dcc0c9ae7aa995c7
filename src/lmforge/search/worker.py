"""Workers: processes that take trials from a study until its budget, trial count or grid is used up.

A worker needs only the storage and the study name: the study carries the search context (base config,
space, fidelity, budget) in a user attribute written by ``lmforge tune``. ``lmforge tune --n-jobs N`` starts N
of them as processes (``python -m lmforge.search.worker``); more can join from other machines that share the
storage and can read the data and the run directory (``lmforge worker``).

Workers share the study safely: ``--n-trials N`` admits exactly the first N new trials by trial number (a
trial asked past the cap in a race is marked ``discarded`` and never trained), where a trial that failed for
good (every attempt FAIL, no retry left) does not count: the cap is N finished (COMPLETE or PRUNED) trials, and
the search gives up after N such failures; every worker watches the others' heartbeats and fails and re-enqueues the trial of a worker that died (:class:`StaleWatch`); and a
worker leaves only when no trial is running any more, so the retry of a lost trial always finds a taker.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from lmforge.config import LmforgeError
from lmforge.search.budget import budget_spent, tokens_used
from lmforge.search.context import SearchContext, SearchData, load_context, prepare_search_data
from lmforge.search.disk import enforce_disk_cap
from lmforge.search.objective import run_trial
from lmforge.search.study import (
    StaleWatch,
    frozen,
    load,
    make_pruner,
    make_sampler,
    open_storage,
    original_number,
    sampler_seed,
    trials_run,
)
from lmforge.train.threads import set_threads

__all__ = ["load_context", "open_study", "failed_for_good", "over_cap", "run_worker", "search_done", "spawn"]

POLL_S = 2.0
"""Seconds between looks at the study while waiting for other workers' trials to end."""


def open_study(study_name: str, storage: str | BaseStorage, worker_id: int = 0) -> tuple[optuna.Study, SearchContext]:
    """The study with this worker's sampler and pruner, and its search context. A study that already ran
    trials (a resumed run) seeds the sampler anew (:func:`~lmforge.search.study.sampler_seed`)."""
    st = open_storage(storage) if isinstance(storage, str) else storage
    existing = load(st, study_name)
    ctx = load_context(existing)
    space = ctx.search_space
    sampler = make_sampler(
        ctx.sampler,
        seed=sampler_seed(ctx.seed, worker_id, trials_run(existing)),
        n_objectives=len(ctx.objectives),
        parallel=ctx.parallel,
        conditional=space.conditional,
    )
    fid = ctx.fid
    pruner = make_pruner(ctx.pruner, min_tokens=fid.min_tokens, max_tokens=fid.max_tokens, eta=fid.eta)
    return load(st, study_name, sampler, pruner), ctx


def search_done(study: optuna.Study, ctx: SearchContext) -> str | None:
    """Why no further trial should start (None: go on). Waiting trials (grid points, retries) always run
    unless the budget is spent (:func:`~lmforge.search.budget.budget_spent`)."""
    trials = study.get_trials(deepcopy=False)
    spent = budget_spent(ctx, tokens_used(trials) if ctx.search_tokens is not None else 0)
    if spent is not None:
        return spent
    waiting = any(t.state == TrialState.WAITING for t in trials)
    if ctx.sampler == "grid" and not waiting:
        return "grid exhausted"
    if ctx.n_trials is not None and not waiting:
        failed = failed_for_good(trials)
        started = {original_number(t) for t in trials if not t.user_attrs.get("discarded")} - failed
        if len(started) >= ctx.n_trials:
            return f"{ctx.n_trials} trials run"
        if len(failed) >= ctx.n_trials:
            return f"{len(failed)} trials failed (the cap of {ctx.n_trials} counts finished trials only)"
    return None


def failed_for_good(trials: list[FrozenTrial]) -> set[int]:
    """Original numbers (:func:`~lmforge.search.study.original_number`) of the trials whose every attempt
    failed and that have no retry waiting or running: they do not count toward ``--n-trials``. Discarded
    asks (past the cap) are not trials at all."""
    chains: dict[int, list[TrialState]] = {}
    for t in trials:
        if not t.user_attrs.get("discarded"):
            chains.setdefault(original_number(t), []).append(t.state)
    return {n for n, states in chains.items() if all(s == TrialState.FAIL for s in states)}


def over_cap(study: optuna.Study, trial: optuna.Trial | FrozenTrial, n_trials: int | None) -> bool:
    """Whether ``trial`` (just asked, not a retry or an enqueued point) lies past the ``n_trials`` cap: at
    least ``n_trials`` new trials that count have smaller numbers (a trial failed for good does not count,
    :func:`failed_for_good`). Trial numbers are assigned atomically by the storage, so racing workers agree
    on which trials are admitted: the first ``n_trials`` that count."""
    if n_trials is None:
        return False
    trials = study.get_trials(deepcopy=False)
    failed = failed_for_good(trials)
    earlier = 0
    for t in trials:
        if t.number >= trial.number or t.user_attrs.get("discarded") or "failed_trial" in t.system_attrs:
            continue
        if t.number not in failed:
            earlier += 1
    return earlier >= n_trials


def _running(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def run_worker(
    study_name: str,
    storage: str | BaseStorage,
    *,
    worker_id: int = 0,
    data: SearchData | None = None,
    hook: Callable[[], None] | None = None,
    verbose: bool = False,
    max_trials: int | None = None,
    run_dir: str | None = None,
    wait: bool = True,
    poll_s: float = POLL_S,
) -> int:
    """Run trials of ``study_name`` until :func:`search_done`; return how many this worker ran.

    ``hook`` is called after every evaluation and every trial (progress display, bookkeeping), and while
    waiting. ``run_dir`` replaces the run directory the study names (the same shared directory mounted
    elsewhere). ``wait``: when the search is done but other workers' trials still run, stay (failing the
    stale ones and running their retries) until none runs. KeyboardInterrupt (and SIGTERM during
    training) re-enqueues the current trial and propagates."""
    # a worker process of its own: its start-up (process, imports, study) and data preparation are overhead
    # of the trials it runs; recorded on its first trial for the report's overhead table
    startup: dict[str, float] | None = {"process_s": round(process_age_s(), 3)} if data is None else None
    study, ctx = open_study(study_name, storage, worker_id)
    if run_dir is not None:
        ctx.run_dir = run_dir
    if data is None:
        t_data = time.monotonic()
        data = prepare_search_data(ctx.base_config, ctx.cv, ctx.seed)
        if startup is not None:
            startup["data_s"] = round(time.monotonic() - t_data, 3)
    watch = StaleWatch()

    def tick() -> None:
        watch.check(study)  # rate-limited to the heartbeat interval
        if hook is not None:
            hook()

    n = 0
    while max_trials is None or n < max_trials:
        tick()
        if search_done(study, ctx) is not None:
            if not wait or _running(study) == 0:
                break
            time.sleep(poll_s)  # other workers' trials may yet fail and be retried here
            continue
        trial = study.ask()
        attrs = frozen(study, trial).system_attrs
        queued = "fixed_params" in attrs or "failed_trial" in attrs
        if (ctx.sampler == "grid" and not queued) or (not queued and over_cap(study, trial, ctx.n_trials)):
            # another worker took the last grid point or the last admitted trial between the check and ask()
            trial.set_user_attr("discarded", True)
            study.tell(trial, state=TrialState.FAIL)
            continue
        if startup is not None:
            trial.set_user_attr("worker_startup", startup)
            startup = None
        try:
            run_trial(study, trial, ctx, data, hook=tick, verbose=verbose)
        except UpdateFinishedTrialError:
            # this worker's beats did not reach the storage for a grace period: another worker failed the
            # trial as lost and enqueued its retry, which continues it from its checkpoint
            print(f"trial {trial.number} was failed as stale by another worker; its retry takes over", file=sys.stderr)
        n += 1
        enforce_disk_cap(study, Path(ctx.run_dir), ctx.disk_cap, ctx.keep_best)
        if hook is not None:
            hook()
    return n


def process_age_s() -> float:
    """Seconds since this process started (Linux ``/proc``: start-up and imports included); 0.0 elsewhere."""
    try:
        stat = Path("/proc/self/stat").read_text()
        # the fields after the command name (which may hold spaces): the start time is field 22, in clock ticks
        start_ticks = int(stat[stat.rindex(")") + 2 :].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def _die_with_parent() -> None:
    """In a worker process (Linux): receive SIGKILL when the parent dies, so no orphan keeps training."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def spawn(study_name: str, storage: str, worker_id: int, threads: int, log_path: str) -> subprocess.Popen[bytes]:
    """Start ``python -m lmforge.search.worker`` in a new process (its output goes to ``log_path``)."""
    cmd = [
        sys.executable,
        "-m",
        "lmforge.search.worker",
        "--storage",
        storage,
        "--study",
        study_name,
        "--worker-id",
        str(worker_id),
        "--threads",
        str(threads),
    ]
    with open(log_path, "ab") as log:  # the child writes to its own copy of the descriptor
        return subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if os.name == "posix" else None,
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lmforge.search.worker", description=__doc__.splitlines()[0])
    p.add_argument("--storage", required=True)
    p.add_argument("--study", required=True)
    p.add_argument("--worker-id", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads > 0:
        set_threads(args.threads)  # threads per process = cores / processes, set once
    parent = os.getppid()

    def orphan_check() -> None:
        if os.getppid() != parent:  # the controller died (where PDEATHSIG is not available)
            raise KeyboardInterrupt

    try:
        n = run_worker(args.study, args.storage, worker_id=args.worker_id, hook=orphan_check)
    except LmforgeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(f"worker {args.worker_id}: {n} trial(s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
