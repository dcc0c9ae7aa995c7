"""The search step's strategies, one signature, chosen from a table keyed by (backend, strategy):

- ``("embedded", "optuna")``: workers on the study, in this process (``--n-jobs 1``) or as worker processes;
- ``("embedded", "evolution")``: regularized evolution of trained networks (:mod:`lmforge.search.evolution`);
- ``("ray", "optuna")``: a Ray Tune experiment (:mod:`lmforge.search.ray_backend`, an optional extra).

Each runs trials until the one budget rule (:func:`lmforge.search.budget.budget_spent`), the trial count
or the grid says stop, and returns why it ended when it knows better than the study does (else None).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna

from lmforge.search.context import SearchContext, SearchData
from lmforge.search.evolution import run_evolution
from lmforge.search.options import TuneOptions
from lmforge.search.worker import run_worker, spawn

WORKER_STOP_GRACE_S = 60
"""Seconds past the deadline before worker processes are stopped, and that they get to stop."""


@dataclass
class SearchJob:
    """What a strategy gets: the study and its context, the data, the run's stored options (``stored``)
    and this command line's (``given``: a resumed run may name a new cluster or more jobs), and the
    pipeline's progress hook and log."""

    study: optuna.Study
    ctx: SearchContext
    data: SearchData
    study_name: str
    storage: str
    run_dir: Path
    stored: TuneOptions
    given: TuneOptions
    hook: Callable[[], None]
    log: Callable[[str], None]


Strategy = Callable[[SearchJob], "str | None"]


def run_workers(job: SearchJob) -> str | None:
    """Optuna's samplers propose every trial: one worker in this process, or ``--n-jobs`` processes."""
    if job.given.n_jobs == 1:
        run_worker(job.study_name, job.storage, data=job.data, hook=job.hook)
    else:
        _run_processes(job)
    return None


def run_evolution_search(job: SearchJob) -> str | None:
    run_evolution(
        job.study_name,
        job.storage,
        data=job.data,
        hook=job.hook,
        population=job.stored.population,
        sample=job.stored.sample,
        log=job.log,
    )
    return None


def run_ray(job: SearchJob) -> str | None:
    from lmforge.search.ray_backend import RayOptions, run_ray_search  # optional extra: Ray

    ray_opts = RayOptions(  # a resumed run keeps its cluster and trial size unless given anew
        address=job.given.address or job.stored.address,
        trial_resources=job.given.trial_resources or job.stored.trial_resources,
        max_concurrent=job.given.n_jobs if job.given.n_jobs > 1 else None,
        resume=job.given.resume,
        verbose=job.given.verbose,
    )
    return run_ray_search(job.study, job.ctx, job.data, job.storage, ray_opts, hook=job.hook, log=job.log)


STRATEGY_TABLE: dict[tuple[str, str], Strategy] = {
    ("embedded", "optuna"): run_workers,
    ("embedded", "evolution"): run_evolution_search,
    ("ray", "optuna"): run_ray,
}


def strategy_for(backend: str, strategy: str) -> Strategy:
    return STRATEGY_TABLE[(backend, strategy)]


# ------------------------------------------------------------------------------ worker processes
def _run_processes(job: SearchJob) -> None:
    logs = job.run_dir / "logs"
    logs.mkdir(exist_ok=True)
    n = job.given.n_jobs
    threads = max(1, (os.cpu_count() or 1) // n)
    procs = [spawn(job.study_name, job.storage, i, threads, str(logs / f"worker-{i}.log")) for i in range(n)]
    job.log(f"{n} worker processes started (logs in {logs})")
    deadline = job.ctx.deadline_unix
    try:
        while any(p.poll() is None for p in procs):
            job.hook()
            time.sleep(1.0)
            if deadline is not None and time.time() > deadline + WORKER_STOP_GRACE_S:
                _stop(procs)
    except KeyboardInterrupt:
        _stop(procs)
        raise
    bad = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode not in (0, None)]
    if bad:
        job.log(f"worker(s) ended with errors {bad}: see {logs}")


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM: each worker's training saves a checkpoint and its trial is enqueued again."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.time() + WORKER_STOP_GRACE_S
    for p in procs:
        with contextlib.suppress(Exception):
            p.wait(timeout=max(0.1, deadline - time.time()))
        if p.poll() is None:
            p.kill()
