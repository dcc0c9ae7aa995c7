"""Will a fresh model train in the memory there is? A coarse estimate, made before anything is allocated,
so that ``--model.d_model 100000`` is refused with the numbers instead of dying in the allocator (#14.9).

The estimate counts fp32 weights, their gradients, the optimizer's state and the activations one
micro-batch keeps for the backward pass (per layer and token about ``34 * d_model + 5 * n_head * T``
values, Korthikanti et al. 2022, plus the logits and their gradient). It only has to be right within a
small factor: a run is refused only when the estimate exceeds all the memory available.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.config import RunConfig
from lmforge.models import build_model
from lmforge.models.memory import free_memory
from lmforge.train.errors import TrainingError

OPTIMIZER_STATE = {"gd": 0, "sgd": 0, "momentum": 1, "adam": 2, "adamw": 2, "muon": 2}
"""Values of optimizer state per parameter (Muon's momentum plus AdamW's moments on the rest: at most 2)."""
FP32 = 4


@dataclass(frozen=True)
class MemoryEstimate:
    params: int
    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations


def count_params(cfg: RunConfig, vocab_size: int) -> int:
    """Parameters of the model ``cfg`` describes, built on the meta device (no memory allocated)."""
    with torch.device("meta"):
        model = build_model(cfg.model, vocab_size=vocab_size, max_seq_len=cfg.max_seq_len)
    return model.num_params()


def estimate_training_memory(cfg: RunConfig, params: int, vocab_size: int) -> MemoryEstimate:
    """Bytes needed to train ``params`` parameters with ``cfg``'s optimizer, batch and block size."""
    m, tc = cfg.model, cfg.train
    d_model = int(getattr(m, "d_model", 0) or 0)
    n_layer = int(getattr(m, "n_layer", 0) or 0)
    n_head = int(getattr(m, "n_head", 0) or 0)
    rows, T = tc.batch_size, cfg.data.block_size
    values = rows * T * (n_layer * (34 * d_model + 5 * n_head * T) + 3 * vocab_size)
    return MemoryEstimate(
        params=params,
        weights=FP32 * params,
        gradients=FP32 * params,
        optimizer=FP32 * params * OPTIMIZER_STATE.get(cfg.optim.name, 2),
        activations=FP32 * values,
    )


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def check_fits_in_memory(cfg: RunConfig, vocab_size: int, device: torch.device, free: int | None = None) -> None:
    """Raise :class:`TrainingError` with the numbers when training a fresh ``cfg.model`` on ``device`` needs
    more memory than is available (``free`` bytes; default: what :func:`lmforge.models.memory.free_memory` says)."""
    free = free_memory(device) if free is None else free
    if free is None or cfg.model.family == "hf":  # an HF model is loaded, not built: its loader sizes it
        return
    est = estimate_training_memory(cfg, count_params(cfg, vocab_size), vocab_size)
    if est.total <= free:
        return
    m = cfg.model
    shape = ", ".join(f"model.{k} {getattr(m, k)}" for k in ("d_model", "n_layer", "n_head") if hasattr(m, k))
    raise TrainingError(
        f"the model does not fit in memory: training it needs about {_size(est.total)} "
        f"({est.params:,} parameters: {_size(est.weights)} weights, {_size(est.gradients)} gradients, "
        f"{_size(est.optimizer)} {cfg.optim.name} state; {_size(est.activations)} activations for a batch of "
        f"{cfg.train.batch_size} x {cfg.data.block_size} tokens) but {device.type} has {_size(free)} available; "
        f"make it smaller ({shape}) or lower train.batch_size"
    )
