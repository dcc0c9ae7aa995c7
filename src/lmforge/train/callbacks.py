"""What the training loop shares with its callers: the :class:`Callback` hooks, the :class:`LoopState`
they read and the :class:`TrainResult` it returns.

The loop knows nothing about search: a caller (an Optuna objective, a Ray trial) passes callbacks whose
``on_eval`` may stop training, which is how pruning works without ``train`` importing optuna.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.config import RunConfig
from lmforge.models.base import LanguageModel


@dataclass
class LoopState:
    """What callbacks may read while training runs."""

    config: RunConfig
    out_dir: Path
    model: LanguageModel
    step: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0
    best_val_loss: float = math.inf
    best_step: int = -1
    last_record: dict[str, Any] = field(default_factory=dict)
    rank: int = 0
    """Data-parallel rank of this process (callbacks run on every rank; write files only on rank 0)."""
    world_size: int = 1


class Callback:
    """Hooks of the loop. ``on_eval`` or ``on_step`` returning True stops training (reason ``callback``).
    ``on_step`` runs after every optimizer step: it must be cheap, and decide from ``state`` alone (its
    step, tokens and clock are the same on every rank, so every rank stops at the same step)."""

    def on_train_start(self, state: LoopState) -> None:  # noqa: B027 (optional hook)
        pass

    def on_step(self, state: LoopState) -> bool:
        return False

    def on_eval(self, state: LoopState, record: dict[str, Any]) -> bool:
        return False

    def on_train_end(self, state: LoopState, result: TrainResult) -> None:  # noqa: B027
        pass


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    tokens: int
    elapsed_s: float
    best_val_loss: float
    best_step: int
    final_val_loss: float
    stop_reason: str
    num_params: int
    history: list[dict[str, Any]]
    phases: dict[str, float] = field(default_factory=dict)
    """Wall seconds by phase: ``build_s`` (model, optimizer, data views), ``train_s`` (optimizer steps),
    ``compile_s`` (the first compiled step beyond a normal one), ``eval_s``, ``checkpoint_s`` (checkpoints
    and best/)."""
    compiled: bool = False
    """Whether the model trained compiled (``train.compile`` true, or ``auto`` decided so)."""


# ------------------------------------------------------------------------------------- live curves
REPORT_TARGETS = ("tensorboard", "mlflow")
"""Where :class:`LiveCurves` can send a run's evaluations (``lmforge tune --report-to``)."""


class LiveCurves(Callback):
    """Every evaluation's losses and learning rate, at ``step = trained tokens``, to TensorBoard
    (``torch.utils.tensorboard``, event files under ``log_dir``) and/or MLflow (a run named ``name`` in the
    tracking store ``mlflow_uri``, default ``file:LOG_DIR/../mlruns``), as ``targets`` says. A target whose
    package is not installed is skipped with a one-line warning (MLflow is optional). Rank 0 only."""

    def __init__(self, targets: list[str], log_dir: Path, name: str, params: dict[str, Any] | None = None,
                 mlflow_uri: str | None = None) -> None:  # fmt: skip
        unknown = [t for t in targets if t not in REPORT_TARGETS]
        if unknown:
            raise ValueError(f"--report-to: unknown {unknown}; known: {', '.join(REPORT_TARGETS)}")
        self.targets = list(targets)
        self.log_dir = Path(log_dir)
        self.name = name
        self.params = dict(params or {})
        self.mlflow_uri = mlflow_uri or (self.log_dir.parent / "mlruns").resolve().as_uri()
        self._tb: Any = None
        self._mlflow: Any = None

    def on_train_start(self, state: LoopState) -> None:
        if state.rank != 0:
            return
        import importlib
        import importlib.util
        import warnings

        if "tensorboard" in self.targets:
            if importlib.util.find_spec("tensorboard") is None:
                warnings.warn("--report-to tensorboard: the tensorboard package is not installed", stacklevel=2)
            else:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.log_dir / self.name))
        if "mlflow" in self.targets:
            if importlib.util.find_spec("mlflow") is None:
                warnings.warn("--report-to mlflow: the mlflow package is not installed", stacklevel=2)
            else:
                mlflow = importlib.import_module("mlflow")  # optional: no stubs, no hard dependency
                mlflow.set_tracking_uri(self.mlflow_uri)
                mlflow.start_run(run_name=self.name)
                if self.params:
                    mlflow.log_params({k: str(v) for k, v in self.params.items()})
                self._mlflow = mlflow

    def on_eval(self, state: LoopState, record: dict[str, Any]) -> bool:
        scalars = {k: float(record[k]) for k in ("val_loss", "train_loss", "lr") if record.get(k) is not None}
        scalars = {k: v for k, v in scalars.items() if math.isfinite(v)}
        step = int(record.get("tokens", state.tokens))
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, global_step=step)
            self._tb.flush()
        if self._mlflow is not None:
            self._mlflow.log_metrics(scalars, step=step)
        return False

    def on_train_end(self, state: LoopState, result: TrainResult) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._mlflow is not None:
            self._mlflow.end_run()
            self._mlflow = None
