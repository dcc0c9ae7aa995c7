"""The options of ``lmforge tune``: one typed class, validated and parsed once, at construction.

The same class reads the options a run stored in ``DIR/pipeline.json`` (:meth:`TuneOptions.from_dict`), so
a resumed run and a fresh one see the same defaults, written once here. The stored form keeps the options
as the user gave them (``budget`` as text); the parsed values (:attr:`TuneOptions.total_budget`...) are
derived from them and never stored.
"""

from __future__ import annotations

from dataclasses import Field, dataclass, field, fields
from typing import Any

from lmforge.search.budget import Budget, parse_budget, parse_bytes, parse_count
from lmforge.search.evolution import DEFAULT_POPULATION, DEFAULT_TOURNAMENT
from lmforge.search.objective import OBJECTIVES
from lmforge.search.study import PRUNERS, SAMPLERS, SearchError
from lmforge.train.callbacks import REPORT_TARGETS

DEFAULT_BUDGET = "10m"
BACKENDS = ("embedded", "ray")
STRATEGIES = ("optuna", "evolution")


@dataclass
class TuneOptions:
    """The options of ``lmforge tune`` (see ``lmforge tune --help``)."""

    out: str
    data: str | None = None
    budget: str | None = None
    """As given (``10m``, ``5Mtok``); parsed once into :attr:`total_budget`."""
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
    report_to: list[str] = field(default_factory=list)
    """Live trial curves: ``tensorboard`` (event files in ``DIR/tensorboard``) and/or ``mlflow``
    (``DIR/mlruns``), when installed (``--report-to tensorboard,mlflow``)."""
    population: int = DEFAULT_POPULATION
    """Evolution: members kept."""
    sample: int = DEFAULT_TOURNAMENT
    """Evolution: tournament size (``--tournament``; the stored key stays ``sample``)."""
    started: float | None = field(default=None, compare=False, metadata={"stored": False})
    """``time.monotonic()`` when the command started (None: when the pipeline starts). The budget's clock
    starts there, so the start-up of every run, a resumed one too, is charged to the budget. Not stored."""

    # parsed from the fields above at construction; not stored
    total_budget: Budget | None = field(init=False, repr=False, compare=False)
    """The budget given (None: keep the stored one, or :data:`DEFAULT_BUDGET` for a new run)."""
    max_params_count: int | None = field(init=False, repr=False, compare=False)
    disk_cap_bytes: int | None = field(init=False, repr=False, compare=False)
    trial_tokens_count: int | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.total_budget = parse_budget(self.budget) if self.budget else None
        self.objectives = [n.strip() for n in self.objectives if n.strip()]
        bad = [n for n in self.objectives if n not in OBJECTIVES]
        if bad:
            raise SearchError(f"--objectives: unknown {bad}; known: {', '.join(OBJECTIVES)}")
        o = self.objectives
        if not o or o[0] != "val_loss" or len(set(o)) != len(o):
            raise SearchError(f"--objectives {','.join(o)}: val_loss must come first, each objective once")
        if self.backend not in BACKENDS:
            raise SearchError(f"--backend {self.backend!r}: unknown; known: {', '.join(BACKENDS)}")
        if self.strategy not in STRATEGIES:
            raise SearchError(f"--strategy {self.strategy!r}: unknown; known: {', '.join(STRATEGIES)}")
        if self.strategy == "evolution" and (self.backend == "ray" or self.cv >= 2 or self.sampler == "grid"):
            raise SearchError(
                "--strategy evolution runs one trial at a time on the embedded backend, without --cv or --sampler grid"
            )
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise SearchError(f"--sampler {self.sampler!r}: unknown; known: {', '.join(SAMPLERS)}")
        if self.pruner is not None and self.pruner not in PRUNERS:
            raise SearchError(f"--pruner {self.pruner!r}: unknown; known: {', '.join(PRUNERS)}")
        if self.cv == 1 or self.cv < 0:
            raise SearchError(f"--cv {self.cv}: use 0 (no cross-validation) or k >= 2 folds")
        bad_targets = [t for t in self.report_to if t not in REPORT_TARGETS]
        if bad_targets:
            raise SearchError(f"--report-to: unknown {bad_targets}; known: {', '.join(REPORT_TARGETS)}")
        if self.n_jobs < 1:
            raise SearchError(f"--n-jobs {self.n_jobs}: must be at least 1")
        self.max_params_count = parse_count(self.max_params) if self.max_params is not None else None
        self.disk_cap_bytes = parse_bytes(self.disk_cap) if self.disk_cap is not None else None
        self.trial_tokens_count = (
            parse_count(self.trial_tokens, "--trial-tokens") if self.trial_tokens is not None else None
        )

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def sampler_and_pruner(self) -> tuple[str, str, list[str]]:
        """(sampler, pruner, notes): the defaults that depend on the other options (NSGA-II for several
        objectives; no pruner where pruning cannot apply), with a note for each option overridden."""
        sampler = self.sampler or ("nsga2" if self.multi_objective else "tpe")
        pruner = self.pruner or ("none" if self.multi_objective or self.cv >= 2 else "asha")
        notes = []
        if self.strategy == "evolution" and pruner != "none":
            notes.append("evolution: no pruner (selection happens in the tournaments)")
            pruner = "none"
        if self.multi_objective and pruner != "none":
            notes.append(f"--pruner {pruner} ignored: Optuna prunes single-objective studies only")
            pruner = "none"
        if self.cv >= 2 and pruner != "none":
            notes.append(f"--pruner {pruner} ignored with --cv: the score is the mean over folds")
            pruner = "none"
        return sampler, pruner, notes

    def override_paths(self) -> set[str]:
        """The config paths fixed on the command line (``--section.field VALUE``): left out of the space."""
        return {tok[2:].split("=", 1)[0] for tok in self.overrides if tok.startswith("--")}

    # -- the stored form (pipeline.json "options") ----------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The options as given, for ``pipeline.json``."""
        return {f.name: getattr(self, f.name) for f in _stored_fields()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TuneOptions:
        """The options a run stored (keys it did not store yet take the defaults above)."""
        known = {f.name for f in _stored_fields()}
        kw = {k: v for k, v in d.items() if k in known}
        kw["objectives"] = list(kw.get("objectives") or ["val_loss"])
        return cls(**kw)

    def given(self) -> dict[str, Any]:
        """The options that differ from their defaults (what the user gave on this command line)."""
        return {k: v for k, v in self.to_dict().items() if v != _DEFAULTS.get(k)}


def _stored_fields() -> list[Field[Any]]:
    """The options ``pipeline.json`` keeps: those given at construction, except per-process ones."""
    return [f for f in fields(TuneOptions) if f.init and f.metadata.get("stored", True)]


_DEFAULTS = {f.name: getattr(TuneOptions(out=""), f.name) for f in _stored_fields()}
