"""Optuna studies: storages, samplers and pruners by name, and recovery of trials a crash left RUNNING.

Storage (``--storage``): none -> a journal file ``DIR/study.journal`` (append-only, file-locked: safe for several
local worker processes, survives a kill at any moment); ``sqlite:///...``, ``postgresql://...``,
``mysql://...`` -> :class:`optuna.storages.RDBStorage` with heartbeats; ``redis://HOST:PORT/DB`` -> a journal
in Redis (``?prefix=NAME`` keeps one project's keys apart); any other value -> a journal file at that path
(on a shared filesystem, several machines can use it).

Heartbeats: a running trial's worker beats every ``LMFORGE_HEARTBEAT_S`` seconds (default 30): RDB storages
record Optuna's native heartbeat, journals a trial system attribute. A trial whose beat has not changed for
``LMFORGE_GRACE_S`` seconds (default 120) is failed by any other worker (:func:`fail_stale`) and its
configuration enqueued again; a journal's staleness is judged by how long the *observer* has seen the beat
unchanged, so the machines' clocks need not agree. A late beat is not a lost worker: a trial whose process
is alive on the observer's host (``host``, ``pid``, ``pid_start``) is never failed, however late its beat (a
worker starved of CPU by a loaded machine is slow, not dead).

A trial records the host and process running it (user attributes ``host``, ``pid``, ``pid_start``). When
a run resumes, a RUNNING trial whose process no longer exists on this host was interrupted: it is marked
FAIL (``fail_reason``) and enqueued again with the same parameters and run directory, so the retry resumes
from the trial's last checkpoint.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np
import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.storages.journal import JournalFileBackend, JournalRedisBackend
from optuna.trial import FrozenTrial, TrialState

from lmforge.config import LmforgeError
from lmforge.search.curves import FINAL_HORIZON
from lmforge.search.pruning import CurvePruner

SAMPLERS = ("tpe", "random", "grid", "cmaes", "gp", "nsga2")
PRUNERS = ("asha", "curve", "sha", "successive_halving", "hyperband", "median", "none")
MAX_RETRY = 2
"""Retries of an interrupted trial (a trial that keeps killing its worker is not retried forever)."""
HEARTBEAT_S = 30
GRACE_S = 120
HEARTBEAT_ATTR = "lmforge_heartbeat"
"""Journal storages: the trial system attribute a running trial's worker rewrites every heartbeat."""


class SearchError(LmforgeError):
    """A search that cannot start or go on (bad option, missing backend, nothing finished)."""


def quiet_optuna() -> None:
    """Optuna's per-trial INFO lines and experimental-feature warnings would drown the progress table."""

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message=".*RetryFailedTrialCallback.*")


# ---------------------------------------------------------------------------------------- storage
def storage_url(storage: str | None, run_dir: str | Path) -> str:
    """The storage location as given, or the default journal file of the run directory."""
    return storage if storage else str(Path(run_dir).resolve() / "study.journal")


def heartbeat_settings() -> tuple[int, int]:
    """(heartbeat interval, grace period) in seconds: ``LMFORGE_HEARTBEAT_S`` and ``LMFORGE_GRACE_S`` override
    the defaults (the grace period defaults to four intervals when only the interval is set)."""
    values: list[int | None] = []
    for var, default in (("LMFORGE_HEARTBEAT_S", HEARTBEAT_S), ("LMFORGE_GRACE_S", None)):
        raw = os.environ.get(var)
        if raw is None or raw.strip() == "":
            values.append(default)
            continue
        try:
            v = int(raw)
        except ValueError:
            v = 0
        if v < 1:
            raise SearchError(f"{var}={raw!r}: must be a whole number of seconds >= 1")
        values.append(v)
    interval, grace = values
    assert interval is not None  # the interval always has a default
    if grace is None:
        grace = GRACE_S if interval == HEARTBEAT_S else 4 * interval
    if grace <= interval:
        raise SearchError(f"LMFORGE_GRACE_S={grace} must exceed the heartbeat interval ({interval}s)")
    return interval, grace


def redis_url_and_prefix(url: str) -> tuple[str, str]:
    """``redis://host:port/db?prefix=NAME`` -> (the URL without ``prefix``, ``NAME``); redis-py rejects the
    unknown query argument, Optuna's journal takes the prefix separately."""

    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = "".join(v for k, v in query if k == "prefix")
    rest = urlencode([(k, v) for k, v in query if k != "prefix"])
    return urlunsplit(parts._replace(query=rest)), prefix


def open_storage(url: str) -> Any:
    """An Optuna storage for ``url`` (see the module docstring)."""

    quiet_optuna()
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    try:
        if scheme.startswith(("sqlite", "postgresql", "postgres", "mysql")):
            import sqlalchemy.exc

            interval, grace = heartbeat_settings()
            try:
                return RDBStorage(
                    _sqlalchemy_url(url),
                    heartbeat_interval=interval,
                    grace_period=grace,
                    heartbeat_stale_trial_callback=RetryStaleTrial(),
                )
            except sqlalchemy.exc.SQLAlchemyError as err:
                first = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
                raise SearchError(f"--storage {url!r}: cannot open: {first}") from None
        if scheme in ("redis", "rediss", "unix"):
            import redis

            bare, prefix = redis_url_and_prefix(url)
            try:
                redis.Redis.from_url(bare).ping()  # fail here, in one line, when the server is unreachable
            except redis.exceptions.RedisError as err:
                raise SearchError(f"--storage {url!r}: cannot reach the Redis server: {err}") from None
            return JournalStorage(JournalRedisBackend(bare, prefix=prefix))
        if scheme:
            raise SearchError(
                f"--storage {url!r}: unknown scheme {scheme!r}; use sqlite:///, postgresql://, "
                "mysql://, redis:// or a journal file path"
            )
        path = Path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock: Any = _flock_lock(str(path) + ".lock") if os.name == "posix" else None  # a BaseJournalFileLock
        return JournalStorage(JournalFileBackend(str(path), lock_obj=lock))
    except ImportError as err:
        raise SearchError(
            f"--storage {url!r} needs a driver that is not installed: {err} (pip install 'lmforge[scale]')"
        ) from None
    except (optuna.exceptions.StorageInternalError, OSError, ValueError) as err:
        if isinstance(err, SearchError):
            raise
        raise SearchError(f"--storage {url!r}: cannot open: {err}") from None


def _sqlalchemy_url(url: str) -> str:
    """``postgresql://`` (or ``postgres://``) with the PostgreSQL driver that is installed: SQLAlchemy 2.1
    defaults to psycopg 3, the ``scale`` extra installs psycopg2."""

    scheme, rest = url.split("://", 1)
    if scheme.lower() in ("postgresql", "postgres"):
        if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
            return f"postgresql+psycopg2://{rest}"
        return f"postgresql://{rest}"
    return url


class FlockLock:
    """A journal lock held with ``flock``: the kernel releases it when its process dies, so a run killed
    while appending never leaves a stale lock (Optuna's file locks then wait out a grace period). It has
    the interface of Optuna's ``BaseJournalFileLock`` (``acquire() -> True``, ``release()``) and pickles
    (Ray saves the searcher's storage with the experiment)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fds: list[int] = []

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}  # descriptors are per process

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self._fds = []

    def acquire(self) -> bool:
        import fcntl  # POSIX only: this lock is used where os.name == "posix"

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # one descriptor per holder: threads exclude too
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._fds.append(fd)
        return True

    def release(self) -> None:
        import fcntl

        fd = self._fds.pop()
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _flock_lock(path: str) -> FlockLock:
    return FlockLock(path)


def dashboard_command(url: str) -> str:
    return f"optuna-dashboard {url}"


# --------------------------------------------------------------------------------------- samplers
def trials_run(study: Any) -> int:
    """Trials the study has started so far (every state but WAITING: enqueued points have not run)."""
    return sum(1 for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING)


def sampler_seed(seed: int, worker_id: int, already_run: int) -> int:
    """The seed of a worker's sampler. A new study: ``seed + worker_id``. A study that already ran trials (a
    resumed run, a worker joining late): a seed mixed from all three, so the fresh sampler does not replay
    the proposals the first run's sampler made from the same seed (a killed ``tune`` resumed with the same
    seed re-proposed exactly its earlier configurations)."""
    if already_run == 0:
        return seed + worker_id
    mixed = np.random.SeedSequence([seed % 2**32, worker_id, already_run]).generate_state(1)[0]
    return int(mixed) % 2**31


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

    quiet_optuna()
    if name == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, group=conditional, constant_liar=parallel, n_startup_trials=n_startup_trials
        )
    if name in ("random", "grid"):
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        if importlib.util.find_spec("cmaes") is None:
            raise SearchError("--sampler cmaes needs the 'cmaes' package: pip install cmaes")
        if n_objectives > 1:
            raise SearchError("--sampler cmaes optimizes one objective; use nsga2 (or tpe) with several --objectives")
        independent = optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials)
        return optuna.samplers.CmaEsSampler(
            seed=seed,
            n_startup_trials=n_startup_trials,
            independent_sampler=independent,
            warn_independent_sampling=False,
        )
    if name == "gp":
        return optuna.samplers.GPSampler(
            seed=seed,
            n_startup_trials=n_startup_trials,
            independent_sampler=optuna.samplers.RandomSampler(seed=seed),
            warn_independent_sampling=False,
        )
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, 2 * n_startup_trials)))
    raise SearchError(f"--sampler {name!r}: unknown; known: {', '.join(SAMPLERS)}")


def make_pruner(name: str, *, min_tokens: int, max_tokens: int, eta: int) -> Any:
    """A pruner by name, with trained tokens as the fidelity (trials report at ``step = tokens``). ``asha``
    (the default; also ``curve``) is asynchronous successive halving on the losses the trials' learning
    curves predict at ``FINAL_HORIZON`` times the trial length (:class:`~lmforge.search.pruning.CurvePruner`);
    ``sha`` / ``successive_halving`` is Optuna's, on the losses reported at the rung."""
    if name == "none":
        return optuna.pruners.NopPruner()
    if name in ("asha", "curve"):
        return CurvePruner(min_tokens, max_tokens, eta, horizon=FINAL_HORIZON * max(max_tokens, min_tokens))
    if name in ("sha", "successive_halving"):
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_tokens, reduction_factor=eta)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=min_tokens, max_resource=max(max_tokens, min_tokens * eta), reduction_factor=eta
        )
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=min_tokens)
    raise SearchError(f"--pruner {name!r}: unknown; known: {', '.join(PRUNERS)}")


# ---------------------------------------------------------------------------------------- studies
def create_or_load(storage: Any, name: str, n_objectives: int, sampler: Any = None, pruner: Any = None) -> Any:
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
    """Whether process ``pid`` of this host runs (a zombie, killed but not yet reaped by its parent, does
    not), and is the one that started at ``start`` (clock ticks; None: not checked)."""
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if _state(int(pid)) in ("Z", "X"):
        return False
    now = _start_ticks(int(pid))
    return start is None or now is None or now == start


def _state(pid: int) -> str | None:
    """The process state letter of ``/proc/PID/stat`` (``R``, ``S``, ``Z``...); None where unreadable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[0]


def worker_alive(trial: Any) -> bool:
    """Whether the process running ``trial`` (a FrozenTrial) is known to be alive: it runs on this host and
    its pid (with the same start time) exists. A trial of another host is not known to be alive: its
    heartbeat decides."""
    ua = trial.user_attrs
    return ua.get("host") == socket.gethostname() and process_alive(ua.get("pid"), ua.get("pid_start"))


def recover_interrupted(study: Any, *, exclusive: bool = False) -> list[int]:
    """Fail and re-enqueue the RUNNING trials whose process (on this host) is gone; return their numbers.

    Trials of other hosts are left to the storage's heartbeat (RDB storages). ``exclusive``: no other
    worker can be running (the caller holds the run directory's lock and the storage is its own), so a
    trial that was asked but never labelled with its process is interrupted too."""

    quiet_optuna()
    fail_stale(study)  # RDB storages: stale heartbeats of any host (a journal needs a watch over time)
    host = socket.gethostname()
    storage = trial_storage(study)
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

    trial.set_user_attr("fail_reason", reason)
    trial.set_user_attr("interrupted", True)
    study.tell(trial, state=TrialState.FAIL)
    enqueue_retry(study, frozen(study, trial))


def enqueue_retry(study: Any, failed: Any) -> bool:
    """Enqueue ``failed`` again with its parameters and run directory (the retry resumes from the trial's
    checkpoint). The retry chain is recorded as Optuna's ``RetryHeartbeatStaleTrialCallback`` does
    (``failed_trial``, ``retry_history``); at most ``MAX_RETRY`` retries. False when the chain is exhausted."""

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


def trial_storage(study: optuna.Study) -> BaseStorage:
    """The storage a study's trials live in. Optuna does not expose it; this is the one place that reaches
    for it (heartbeats and marking another process's trial need the storage itself)."""
    return study._storage  # noqa: SLF001


def frozen(study: optuna.Study, trial: optuna.Trial) -> FrozenTrial:
    """The stored state of a live ``optuna.Trial`` (its system attributes are not exposed otherwise)."""
    return trial_storage(study).get_trial(trial._trial_id)  # noqa: SLF001


def heartbeat(study: optuna.Study, trial: optuna.Trial) -> Heartbeat:
    """A :class:`Heartbeat` for ``trial``, beating into the storage the trial lives in."""
    return Heartbeat(trial_storage(study), trial._trial_id)  # noqa: SLF001


def original_number(trial: Any) -> int:
    """The number of the first trial of a retry chain (the trial itself when it is no retry); ``trial``
    is a FrozenTrial."""
    history = trial.system_attrs.get("retry_history") or []
    return int(history[0]) if history else int(trial.number)


class RetryStaleTrial:
    """RDB storages' ``heartbeat_stale_trial_callback``: the stale trial's configuration is enqueued again
    with its run directory (:func:`enqueue_retry`), as Optuna's ``RetryHeartbeatStaleTrialCallback`` would
    but without copying the dead attempt's progress attributes."""

    def __call__(self, study: Any, trial: Any) -> None:
        enqueue_retry(study, trial)


class Heartbeat:
    """Beats for a running trial in a daemon thread: Optuna's heartbeat on RDB storages, the
    ``HEARTBEAT_ATTR`` system attribute on journal storages (file or Redis); nothing on others."""

    def __init__(self, storage: Any, trial_id: int) -> None:
        self._storage = storage
        self._trial_id = trial_id
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _beat_function(self) -> tuple[Callable[[], None], float] | None:
        get_interval = getattr(self._storage, "get_heartbeat_interval", None)
        if get_interval is not None and get_interval():
            return (lambda: self._storage.record_heartbeat(self._trial_id)), float(get_interval())
        if isinstance(self._storage, JournalStorage):
            interval, grace = heartbeat_settings()
            ident = process_identity()

            def beat() -> None:
                value = {"beat": time.time(), "interval": interval, "grace": grace, **ident}
                self._storage.set_trial_system_attr(self._trial_id, HEARTBEAT_ATTR, value)

            return beat, float(interval)
        return None

    def __enter__(self) -> Heartbeat:
        found = self._beat_function()
        if found is not None:
            beat, interval = found
            beat()

            def loop() -> None:
                while not self._stop.wait(interval):
                    try:
                        beat()
                    except Exception:  # a storage hiccup must not kill training; the next beat retries
                        pass

            self._thread = threading.Thread(target=loop, daemon=True, name="lmforge-heartbeat")
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class StaleWatch:
    """Finds the RUNNING trials whose worker stopped beating.

    RDB storages answer themselves (the database's clock). For journals the watch remembers, per trial, the
    last beat it saw and when (its own monotonic clock): a trial is stale once its beat stayed unchanged for
    the grace period the trial's worker declared (``LMFORGE_GRACE_S`` for a trial that never beat). A new
    watch therefore needs one grace period of observation before it fails anything."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._seen: dict[int, tuple[Any, float]] = {}
        self._last_check = -float("inf")

    def stale(self, study: Any) -> list[Any]:
        """The RUNNING trials whose beat is overdue and whose process is not known to be alive."""
        return [t for t in self._overdue(study) if not worker_alive(t)]

    def _overdue(self, study: Any) -> list[Any]:
        storage = trial_storage(study)
        if is_heartbeat_enabled(storage):
            # optuna's own stale-trial query (the heartbeat storages have it; BaseStorage does not declare it)
            ids = storage._get_stale_trial_ids(study._study_id)  # type: ignore[attr-defined]  # noqa: SLF001
            return [storage.get_trial(i) for i in ids]
        now = self._clock()
        _, default_grace = heartbeat_settings()
        seen: dict[int, tuple[Any, float]] = {}
        out = []
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            hb = t.system_attrs.get(HEARTBEAT_ATTR) or {}
            key = hb.get("beat")
            prev = self._seen.get(t._trial_id)  # noqa: SLF001
            since = prev[1] if prev is not None and prev[0] == key else now
            seen[t._trial_id] = (key, since)  # noqa: SLF001
            if now - since > float(hb.get("grace") or default_grace):
                out.append(t)
        self._seen = seen
        return out

    def check(self, study: Any, *, every: float | None = None) -> list[int]:
        """:func:`fail_stale` with this watch, at most once per ``every`` seconds (default: the heartbeat
        interval); the numbers of the trials failed."""
        now = self._clock()
        if every is None:
            every = float(heartbeat_settings()[0])
        if now - self._last_check < every:
            return []
        self._last_check = now
        return fail_stale(study, self)


def fail_stale(study: Any, watch: StaleWatch | None = None) -> list[int]:
    """Fail the RUNNING trials whose heartbeat is stale and enqueue their configurations again; return
    their numbers. Several workers may race here: the storage lets exactly one of them finish a trial
    (the others get ``UpdateFinishedTrialError``), and only that one enqueues the retry."""

    storage = trial_storage(study)
    failed = []
    for t in (watch or StaleWatch()).stale(study):
        tid = t._trial_id  # noqa: SLF001
        hb = t.system_attrs.get(HEARTBEAT_ATTR) or {}
        who = f" (host {t.user_attrs.get('host')}, pid {t.user_attrs.get('pid')})" if t.user_attrs.get("host") else ""
        grace = hb.get("grace") or getattr(storage, "grace_period", None) or heartbeat_settings()[1]
        try:
            storage.set_trial_user_attr(tid, "fail_reason", f"worker lost{who}: no heartbeat for {grace}s")
            storage.set_trial_user_attr(tid, "interrupted", True)
            if not storage.set_trial_state_values(tid, TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:  # finished meanwhile, or another worker failed it first
            continue
        enqueue_retry(study, storage.get_trial(tid))
        failed.append(t.number)
    return failed
