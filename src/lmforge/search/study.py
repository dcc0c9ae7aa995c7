"""Optuna studies: storages, samplers and pruners by name, and recovery of trials a crash left RUNNING.

Storage (``--storage``): none -> a journal file ``DIR/study.journal`` (append-only, file-locked: safe for several
local worker processes, survives a kill at any moment); ``sqlite:///...``, ``postgresql://...``,
``mysql://...`` -> :class:`optuna.storages.RDBStorage` with heartbeats, so trials of a worker that died on
another machine are failed and retried; ``redis://...`` -> a journal in Redis; any other value -> a journal
file at that path.

A trial records the host and process running it (user attributes ``host``, ``pid``, ``pid_start``). When
a run resumes, a RUNNING trial whose process no longer exists on this host was interrupted: it is marked
FAIL (``fail_reason``) and enqueued again with the same parameters and run directory, so the retry resumes
from the trial's last checkpoint.
"""

from __future__ import annotations

import os
import socket
import threading
import warnings
from pathlib import Path
from typing import Any

from lmforge.config import LmforgeError

SAMPLERS = ("tpe", "random", "grid", "cmaes", "gp", "nsga2")
PRUNERS = ("asha", "sha", "successive_halving", "hyperband", "median", "none")
MAX_RETRY = 2
"""Retries of an interrupted trial (a trial that keeps killing its worker is not retried forever)."""
HEARTBEAT_S = 30
GRACE_S = 120


class SearchError(LmforgeError):
    """A search that cannot start or go on (bad option, missing backend, nothing finished)."""


def quiet_optuna() -> None:
    """Optuna's per-trial INFO lines and experimental-feature warnings would drown the progress table."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message=".*RetryFailedTrialCallback.*")


# ---------------------------------------------------------------------------------------- storage
def storage_url(storage: str | None, run_dir: str | Path) -> str:
    """The storage location as given, or the default journal file of the run directory."""
    return storage if storage else str(Path(run_dir).resolve() / "study.journal")


def open_storage(url: str) -> Any:
    """An Optuna storage for ``url`` (see the module docstring)."""
    import optuna
    from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages.journal import JournalFileBackend, JournalRedisBackend

    quiet_optuna()
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    try:
        if scheme.startswith(("sqlite", "postgresql", "postgres", "mysql")):
            return RDBStorage(
                url,
                heartbeat_interval=HEARTBEAT_S,
                grace_period=GRACE_S,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
            )
        if scheme in ("redis", "rediss", "unix"):
            return JournalStorage(JournalRedisBackend(url))
        if scheme:
            raise SearchError(
                f"--storage {url!r}: unknown scheme {scheme!r}; use sqlite:///, postgresql://, "
                "mysql://, redis:// or a journal file path"
            )
        path = Path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = _flock_lock(str(path) + ".lock") if os.name == "posix" else None
        return JournalStorage(JournalFileBackend(str(path), lock_obj=lock))
    except ImportError as err:
        raise SearchError(
            f"--storage {url!r} needs a driver that is not installed: {err} (pip install 'lmforge[scale]')"
        ) from None
    except (optuna.exceptions.StorageInternalError, OSError, ValueError) as err:
        if isinstance(err, SearchError):
            raise
        raise SearchError(f"--storage {url!r}: cannot open: {err}") from None


def _flock_lock(path: str) -> Any:
    """A journal lock held with ``flock``: the kernel releases it when its process dies, so a run killed
    while appending never leaves a stale lock (Optuna's file locks then wait out a grace period)."""
    import fcntl

    class FlockLock:  # the interface of optuna's BaseJournalFileLock: acquire() -> True, release()
        def __init__(self) -> None:
            self._fds: list[int] = []

        def acquire(self) -> bool:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # one descriptor per holder: threads exclude too
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._fds.append(fd)
            return True

        def release(self) -> None:
            fd = self._fds.pop()
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    return FlockLock()


def dashboard_command(url: str) -> str:
    return f"optuna-dashboard {url}"


# --------------------------------------------------------------------------------------- samplers
def make_sampler(
    name: str,
    *,
    seed: int | None,
    n_objectives: int = 1,
    parallel: bool = False,
    conditional: bool = False,
    n_startup_trials: int = 8,
) -> Any:
    """A sampler by name. ``tpe`` is multivariate (grouped over conditional spaces) and uses the constant
    liar when trials run in parallel, so concurrent workers do not all sample the same point; ``grid``
    samples nothing itself: the grid's points are enqueued (see ``SearchSpace.grid``)."""
    import optuna.samplers as s

    quiet_optuna()
    if name == "tpe":
        return s.TPESampler(
            seed=seed, multivariate=True, group=conditional, constant_liar=parallel, n_startup_trials=n_startup_trials
        )
    if name in ("random", "grid"):
        return s.RandomSampler(seed=seed)
    if name == "cmaes":
        import importlib.util

        if importlib.util.find_spec("cmaes") is None:
            raise SearchError("--sampler cmaes needs the 'cmaes' package: pip install cmaes")
        if n_objectives > 1:
            raise SearchError("--sampler cmaes optimizes one objective; use nsga2 (or tpe) with several --objectives")
        independent = s.TPESampler(seed=seed, n_startup_trials=n_startup_trials)
        return s.CmaEsSampler(
            seed=seed,
            n_startup_trials=n_startup_trials,
            independent_sampler=independent,
            warn_independent_sampling=False,
        )
    if name == "gp":
        independent = s.RandomSampler(seed=seed)
        return s.GPSampler(
            seed=seed,
            n_startup_trials=n_startup_trials,
            independent_sampler=independent,
            warn_independent_sampling=False,
        )
    if name == "nsga2":
        return s.NSGAIISampler(seed=seed, population_size=max(4, min(50, 2 * n_startup_trials)))
    raise SearchError(f"--sampler {name!r}: unknown; known: {', '.join(SAMPLERS)}")


def make_pruner(name: str, *, min_tokens: int, max_tokens: int, eta: int) -> Any:
    """A pruner by name, with trained tokens as the fidelity (trials report at ``step = tokens``)."""
    import optuna.pruners as p

    if name == "none":
        return p.NopPruner()
    if name in ("asha", "sha", "successive_halving"):
        return p.SuccessiveHalvingPruner(min_resource=min_tokens, reduction_factor=eta)
    if name == "hyperband":
        return p.HyperbandPruner(
            min_resource=min_tokens, max_resource=max(max_tokens, min_tokens * eta), reduction_factor=eta
        )
    if name == "median":
        return p.MedianPruner(n_startup_trials=4, n_warmup_steps=min_tokens)
    raise SearchError(f"--pruner {name!r}: unknown; known: {', '.join(PRUNERS)}")


# ---------------------------------------------------------------------------------------- studies
def create_or_load(storage: Any, name: str, n_objectives: int, sampler: Any = None, pruner: Any = None) -> Any:
    import optuna

    try:
        study = optuna.create_study(
            storage=storage,
            study_name=name,
            sampler=sampler,
            pruner=pruner,
            directions=["minimize"] * n_objectives,
            load_if_exists=True,
        )
    except ValueError as err:
        raise SearchError(f"study {name!r}: {err}") from None
    if len(study.directions) != n_objectives:
        raise SearchError(
            f"study {name!r} exists with {len(study.directions)} objective(s), this run has "
            f"{n_objectives}; use another --study-name or --out"
        )
    return study


def load(storage: Any, name: str, sampler: Any = None, pruner: Any = None) -> Any:
    import optuna

    try:
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
        raise SearchError(f"no study named {name!r} in the storage") from None


# ------------------------------------------------------------------------------------ processes
def process_identity() -> dict[str, Any]:
    """Host, pid and start time of this process (the start time tells a reused pid apart)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _start_ticks(os.getpid())}


def _start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its closing parenthesis
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def process_alive(pid: int | None, start: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = _start_ticks(int(pid))
    return start is None or now is None or now == start


def recover_interrupted(study: Any, *, exclusive: bool = False) -> list[int]:
    """Fail and re-enqueue the RUNNING trials whose process (on this host) is gone; return their numbers.

    Trials of other hosts are left to the storage's heartbeat (RDB storages). ``exclusive``: no other
    worker can be running (the caller holds the run directory's lock and the storage is its own), so a
    trial that was asked but never labelled with its process is interrupted too."""
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    quiet_optuna()
    try:
        fail_stale_trials(study)  # RDB storages with heartbeats; a no-op for journals
    except (AttributeError, NotImplementedError, RuntimeError):
        pass
    host = socket.gethostname()
    storage = study._storage  # noqa: SLF001 (marking another process's trial needs the storage itself)
    recovered = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        ua = t.user_attrs
        if ua.get("host") is None and not exclusive:
            continue
        if ua.get("host") not in (None, host) or process_alive(ua.get("pid"), ua.get("pid_start")):
            continue
        tid = t._trial_id  # noqa: SLF001
        storage.set_trial_user_attr(tid, "fail_reason", "interrupted: its worker process ended (killed or crashed)")
        storage.set_trial_user_attr(tid, "interrupted", True)
        if not storage.set_trial_state_values(tid, TrialState.FAIL):
            continue
        enqueue_retry(study, storage.get_trial(tid))
        recovered.append(t.number)
    return recovered


def fail_and_retry(study: Any, trial: Any, reason: str) -> None:
    """Mark this process's own running ``trial`` FAIL as interrupted and enqueue its retry."""
    from optuna.trial import TrialState

    trial.set_user_attr("fail_reason", reason)
    trial.set_user_attr("interrupted", True)
    study.tell(trial, state=TrialState.FAIL)
    enqueue_retry(study, frozen(study, trial))


def enqueue_retry(study: Any, failed: Any) -> bool:
    """Enqueue ``failed`` again with its parameters and run directory (the retry resumes from the trial's
    checkpoint). The retry chain is recorded as Optuna's ``RetryHeartbeatStaleTrialCallback`` does
    (``failed_trial``, ``retry_history``); at most ``MAX_RETRY`` retries. False when the chain is exhausted."""
    import optuna
    from optuna.trial import TrialState

    history = [*failed.system_attrs.get("retry_history", []), failed.number]
    if len(history) > MAX_RETRY:
        return False
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.WAITING,
            params=failed.params,
            distributions=failed.distributions,
            user_attrs={k: v for k, v in failed.user_attrs.items() if k == "run_dir"},
            system_attrs={"failed_trial": history[0], "retry_history": history},
        )
    )
    return True


def frozen(study: Any, trial: Any) -> Any:
    """The stored state of a live ``optuna.Trial`` (its system attributes are not exposed otherwise)."""
    return study._storage.get_trial(trial._trial_id)  # noqa: SLF001


def original_number(trial: Any) -> int:
    """The number of the first trial of a retry chain (the trial itself when it is no retry); ``trial``
    is a FrozenTrial."""
    history = trial.system_attrs.get("retry_history") or []
    return int(history[0]) if history else int(trial.number)


class Heartbeat:
    """Records heartbeats of a running trial in storages that support them (RDB), in a daemon thread."""

    def __init__(self, storage: Any, trial_id: int) -> None:
        self._storage = storage
        self._trial_id = trial_id
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        get_interval = getattr(self._storage, "get_heartbeat_interval", None)
        if get_interval is not None and get_interval():
            interval = float(get_interval())
            self._storage.record_heartbeat(self._trial_id)

            def beat() -> None:
                while not self._stop.wait(interval):
                    try:
                        self._storage.record_heartbeat(self._trial_id)
                    except Exception:  # a database hiccup must not kill training; the next beat retries
                        pass

            self._thread = threading.Thread(target=beat, daemon=True, name="lmforge-heartbeat")
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
