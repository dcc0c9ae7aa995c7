"""What every trial of a study shares: the search context stored in the study, the token streams, and the
trial's config and run directory.

The context lives in a study user attribute (``CONTEXT_ATTR``), so a worker on another machine needs only
the storage and the study name to run trials exactly as ``lmforge tune`` would.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from lmforge.config import RunConfig, build_config
from lmforge.data import PreparedData, Tokenizer, eval_batches, prepare_data
from lmforge.data.sampler import Batch
from lmforge.search import splits
from lmforge.search.budget import Fidelity
from lmforge.search.space import SearchSpace, apply_values, parse_space, repair_config
from lmforge.search.study import SearchError, frozen, original_number

CONTEXT_ATTR = "lmforge"
"""Study user attribute holding the :class:`SearchContext` (so a worker needs only storage + study name)."""
EVAL_BLOCKS = 64
"""Validation blocks per evaluation of a trial (a fixed set: every trial is scored on the same text)."""


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
    report_to: list[str] = field(default_factory=list)
    """Live trial curves (``--report-to``): tensorboard, mlflow."""

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


def load_context(study: optuna.Study) -> SearchContext:
    """The search context a study carries; a study that ``lmforge tune`` did not create is refused."""
    raw = study.user_attrs.get(CONTEXT_ATTR)
    if not raw:
        raise SearchError(f"study {study.study_name!r} was not created by lmforge tune (no search context)")
    return SearchContext.from_dict(raw)


# -------------------------------------------------------------------------------------------- data
@dataclass
class SearchData:
    """The token streams trials use: training, the search's validation half, the held-out test half,
    and (with ``--cv``) the folds of training + validation documents."""

    prepared: PreparedData
    """The prepared data with ``val`` replaced by the search's half."""
    test: np.ndarray
    folds: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.prepared.tokenizer


def prepare_search_data(base: dict[str, Any], cv: int = 0, seed: int = 0) -> SearchData:
    prepared = prepare_data(build_config(base))
    eot = getattr(prepared.tokenizer, "eot_id", None)
    val, test = splits.holdout_split(prepared.val, eot, seed)
    prepared = replace(prepared, val=val)
    folds = splits.kfold(np.concatenate([np.asarray(prepared.train), val]), eot, cv, seed) if cv >= 2 else []
    return SearchData(prepared=prepared, test=test, folds=folds)


def fixed_val_batches(tokens: np.ndarray, cfg: RunConfig, n_blocks: int) -> list[Batch]:
    """Evaluation batches independent of the trial's batch size: the same blocks for every trial."""
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


def trial_dir(ctx: SearchContext, study: optuna.Study, trial: optuna.Trial) -> Path:
    """``DIR/trials/NNNN``: NNNN is the first trial of the retry chain, so a retry resumes its checkpoint."""
    return Path(ctx.run_dir) / "trials" / f"{original_number(frozen(study, trial)):04d}"
