"""lmforge.train: the one training loop and what it needs beside it (layer 3).

- ``loop``: :func:`train`, the loop itself (a small state object whose methods are the steps).
- ``callbacks``: :class:`Callback`, :class:`LoopState`, :class:`TrainResult` (how callers observe and stop it).
- ``errors``: :class:`TrainingError`.
- ``device``: :func:`resolve_device`, :func:`autocast_context`, :func:`seed_everything`, the grad scaler.
- ``distributed``: data-parallel ranks (torchrun): sharded batches and the collectives that keep ranks agreed.
- ``launch``: ``lmforge train --nproc N`` starts N workers with torchrun's launcher.
- ``data_source``: token streams (language modelling) or task examples, behind one interface.
- ``evaluation``: :func:`evaluate_loss`, the token-weighted validation loss.
- ``optim``, ``schedule``: optimizers (AdamW, Muon, SGD, full-batch GD) and learning-rate schedules.
- ``progress``, ``terminate``: the progress bar and SIGTERM as a request to checkpoint and stop.
"""

from lmforge.train.callbacks import Callback, LoopState, TrainResult
from lmforge.train.device import autocast_context, resolve_device, seed_everything
from lmforge.train.errors import TrainingError
from lmforge.train.evaluation import evaluate_loss
from lmforge.train.loop import train

__all__ = [
    "Callback",
    "LoopState",
    "TrainResult",
    "TrainingError",
    "autocast_context",
    "evaluate_loss",
    "resolve_device",
    "seed_everything",
    "train",
]
