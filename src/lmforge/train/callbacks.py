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
    """Hooks of the loop. ``on_eval`` returning True stops training (reason ``callback``)."""

    def on_train_start(self, state: LoopState) -> None:  # noqa: B027 (optional hook)
        pass

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
