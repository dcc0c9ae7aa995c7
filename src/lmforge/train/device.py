"""Where and how the arithmetic runs: the device, mixed precision and the global seeds.

Shared by the loop and by callers that size or evaluate models outside it (search's memory probe, the
final evaluation), so that ``train.device: auto`` and ``train.dtype`` mean the same thing everywhere.
"""

from __future__ import annotations

import contextlib
import os
import random
from typing import Any

import numpy as np
import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_context(device: torch.device, dtype: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA by default; fp32 on CPU."""
    if dtype == "float32" or (dtype == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    dt = torch.float16 if dtype == "float16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dt)


def grad_scaler(device: torch.device, dtype: str) -> torch.amp.GradScaler | None:
    """A loss scaler for float16 on CUDA (its gradients underflow without one); None otherwise."""
    return torch.amp.GradScaler(device.type) if (dtype == "float16" and device.type == "cuda") else None


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch on ``device``: on CUDA through pinned memory and a non-blocking copy, so the host goes on
    queueing the forward pass while the copy runs; unchanged on the CPU."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
