"""The contract every model family implements (layer 2: imports config only).

``forward`` trains; ``init_state``/``step``/``reorder_state`` decode incrementally, so one generation
engine serves every family (KV cache for the transformer, hidden state for the recurrent ones).

State contract (the generation engine relies on it):
- ``state = model.init_state(batch_size, device)`` starts an empty state.
- ``logits, state = model.step(idx, state, valid=None)`` consumes ``idx`` of shape (B, T) (T > 1 for a
  prompt prefill, T == 1 while decoding) and returns logits (B, T, V) for those positions.
  ``valid`` (B, T) bool marks real tokens; ``False`` entries are LEFT padding of batched prompts of
  different lengths: they must not change the state (recurrent) or be attended to (transformer),
  and positions count only valid tokens, so a padded row gives the same logits as the row alone.
- ``model.reorder_state(state, index)`` selects/reorders batch rows (beam search), index (B',) long. Use only
  the state it returns: it may reuse the buffers of the one it was given (as Hugging Face's ``reorder_cache``).
- ``model.state_length(state)`` -> tokens consumed so far (padding included), for context checks.
- ``model.reserve_state(state, length)`` (optional) hints how long the state will grow.
- States are treated as opaque by callers.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import nn

from lmforge.config import IGNORE_INDEX, LmforgeError

"""Targets equal to this are left out of the loss (prompt tokens of a prompt -> completion task)."""


class ContextLengthError(LmforgeError, ValueError):
    """A forward pass or a ``step`` would go past the model's ``max_seq_len`` (the engine should crop or stop)."""


class DecodingModel(Protocol):
    """What the generation engine (and task scoring / evaluation) needs from a model: the state contract
    above plus the few ``nn.Module`` members it touches. Every :class:`LanguageModel` satisfies it.

    Written as a protocol, not as ``LanguageModel``, so that the engine states its needs in one place and
    a test double or a wrapped foreign model only has to provide these. Optional, looked up with
    ``hasattr``/``getattr`` and so not listed: ``reserve_state(state, length)`` and ``decoding()`` (see
    :class:`LanguageModel`), and ``vocab_size`` or ``config.vocab_size`` (checks prompt ids when present).
    """

    training: bool
    max_seq_len: int | None
    """``None``: unbounded (recurrent); otherwise prompts plus new tokens must fit."""

    def __call__(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The forward pass: idx (B, T) -> (logits (B, T, V), loss or None)."""
        ...

    def parameters(self) -> Iterator[nn.Parameter]: ...

    def eval(self) -> object: ...

    def train(self, mode: bool = True) -> object: ...

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> Any: ...

    def step(self, idx: torch.Tensor, state: Any, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]: ...

    def reorder_state(self, state: Any, index: torch.Tensor) -> Any: ...


class LanguageModel(nn.Module):
    """Base class: a causal language model over token ids."""

    config: Any
    max_seq_len: int | None = None
    """Longest sequence the model can attend over (``None``: unbounded, e.g. recurrent)."""

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) long -> logits (B, T, V); loss = mean cross-entropy over targets != -100."""
        raise NotImplementedError

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> Any:
        raise NotImplementedError

    def step(self, idx: torch.Tensor, state: Any, valid: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def reorder_state(self, state: Any, index: torch.Tensor) -> Any:
        raise NotImplementedError

    def state_length(self, state: Any) -> int:
        raise NotImplementedError

    def reserve_state(self, state: Any, length: int) -> None:
        """Hint that ``state`` will hold ``length`` tokens (a cache can allocate once instead of growing)."""

    def decoding(self) -> contextlib.AbstractContextManager:
        """Context the generation engine decodes in (kernel settings that suit one-token steps)."""
        return contextlib.nullcontext()

    def num_params(self, exclude_embeddings: bool = False) -> int:
        raise NotImplementedError

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Forward+backward FLOPs per trained token (6N plus attention), as in the PaLM/nanoGPT MFU."""
        raise NotImplementedError


_onednn_lock = threading.Lock()
_onednn_users = 0
_onednn_was_enabled = True


@contextlib.contextmanager
def without_onednn() -> Iterator[None]:
    """Run the body with oneDNN (``torch.backends.mkldnn``) off, for one-token decoding steps on the CPU.

    At decoding sizes oneDNN's per-call set-up costs more than the work: measured with torch 2.13 on one
    core, GELU over 512 values takes 5.2 us with it and 1.0 us without, an LSTM decoding step 316 us and
    111 us. The switch is process-wide, so nested and concurrent users are counted and the setting found
    by the first one is restored when the last one leaves; meanwhile other threads also run without
    oneDNN (slower convolutions, same results up to float rounding).
    """
    global _onednn_users, _onednn_was_enabled
    # torch's stubs type ``mkldnn.enabled`` as its descriptor (ContextProp); the module reads and writes a bool
    with _onednn_lock:
        if _onednn_users == 0:
            _onednn_was_enabled = torch.backends.mkldnn.enabled  # type: ignore[assignment]
            torch.backends.mkldnn.enabled = False  # type: ignore[assignment]
        _onednn_users += 1
    try:
        yield
    finally:
        with _onednn_lock:
            _onednn_users -= 1
            if _onednn_users == 0:
                torch.backends.mkldnn.enabled = _onednn_was_enabled  # type: ignore[assignment]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; targets (B, T) already shifted, -100 ignored."""
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )
