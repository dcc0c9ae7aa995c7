"""A tiny checkpoint, a slow model and a live uvicorn server for the serve tests."""

from __future__ import annotations

import socket
import string
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.config import build_config
from lmforge.data.tokenizer import char_tokenizer
from lmforge.models import build_model
from lmforge.runs import save_checkpoint

CONTEXT = 64


def make_checkpoint(path: Path, family: str = "transformer") -> Path:
    """A randomly initialised model (~100-character vocabulary, width 32, 2 layers) saved as a checkpoint.
    ``init_std`` is large so that greedy decoding has clear winners (no near-ties between batch layouts)."""
    torch.manual_seed(0)
    tok = char_tokenizer([string.printable])
    model_cfg: dict[str, Any] = {
        "family": family,
        "n_layer": 2,
        "d_model": 32,
        "vocab_size": tok.vocab_size,
        "init_std": 0.3,
    }
    if family == "transformer":
        model_cfg.update(n_head=2, max_seq_len=CONTEXT)
    cfg = build_config({"model": model_cfg, "data": {"block_size": CONTEXT}, "tokenizer": {"kind": "char"}})
    model = build_model(cfg.model)
    return save_checkpoint(path, model=model, config_yaml=cfg.to_yaml(), tokenizer=tok)


class SlowModel(nn.Module):
    """Wraps a model of the state contract; every ``step`` first sleeps ``delay`` seconds, so a request
    takes long enough to hold its slot (concurrency, time-limit and disconnect tests)."""

    def __init__(self, inner: nn.Module, delay: float) -> None:
        super().__init__()
        self.inner = inner
        self.delay = delay
        self.config = inner.config
        self.max_seq_len = getattr(inner, "max_seq_len", None)
        self.steps = 0

    def init_state(self, batch_size: int, device: Any = None) -> Any:
        return self.inner.init_state(batch_size, device)

    def step(self, idx: torch.Tensor, state: Any, valid: torch.Tensor | None = None) -> Any:
        self.steps += 1
        time.sleep(self.delay)
        return self.inner.step(idx, state, valid=valid)

    def reorder_state(self, state: Any, index: torch.Tensor) -> Any:
        return self.inner.reorder_state(state, index)

    def state_length(self, state: Any) -> int:
        return self.inner.state_length(state)


class LiveServer:
    """``with LiveServer(app) as s:`` runs uvicorn in a thread on 127.0.0.1 with a free port (``s.url``);
    ``config``: more ``uvicorn.Config`` arguments (e.g. ``http``, the protocol class)."""

    def __init__(self, app: Any, **config: Any) -> None:
        import uvicorn

        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2, **config))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def wait_until(predicate: Any, timeout: float = 5.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
