"""The validation loss: a token-weighted mean over fixed batches (the loop's eval, search's final eval),
under ``torch.inference_mode`` with one host sync per evaluation.

Token-weighted rather than batch-weighted so that masked targets (task fine-tuning) and a short last batch
do not skew it; with data-parallel ranks, the sums are all-reduced so every rank gets the same number.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch

from lmforge.config import IGNORE_INDEX
from lmforge.train.device import to_device
from lmforge.train.distributed import Distributed
from lmforge.train.errors import TrainingError


@torch.inference_mode()
def evaluate_loss(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                  device: torch.device, autocast: contextlib.AbstractContextManager[Any] | None = None,
                  dist: Distributed | None = None) -> tuple[float, int]:
    """Token-weighted mean loss over ``batches`` -> (loss, counted tokens).

    With ``dist`` (data-parallel), each rank scores its share of every batch's rows and the sums are
    all-reduced: every rank returns the loss over all the rows.
    """
    was_training = model.training
    model.eval()
    total_t: torch.Tensor | None = None  # summed on the device: one host sync for the whole evaluation
    count = 0
    for batch in batches:
        x, y = dist.shard(batch) if dist is not None else batch
        n = int((y != IGNORE_INDEX).sum())  # the batches are host tensors: no device sync
        if n == 0:  # nothing to score (an empty shard, all targets masked): the mean loss would be NaN
            continue
        x, y = to_device(x, device), to_device(y, device)
        with autocast or contextlib.nullcontext():
            _, loss = model(x, y)
        part = loss.detach().double() * n
        total_t = part if total_t is None else total_t + part
        count += n
    total = float(total_t) if total_t is not None else 0.0
    model.train(was_training)
    if dist is not None:
        total, count_f = dist.sum([total, float(count)])
        count = int(count_f)
    if count == 0:
        raise TrainingError("validation set has no tokens to score")
    return total / count, count
