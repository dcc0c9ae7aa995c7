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
- ``model.reorder_state(state, index)`` selects/reorders batch rows (beam search), index (B',) long.
- ``model.state_length(state)`` -> tokens consumed so far (padding included), for context checks.
- States are treated as opaque by callers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmforge.config import LmforgeError

IGNORE_INDEX = -100
"""Targets equal to this are left out of the loss (prompt tokens of a prompt -> completion task)."""


class ContextLengthError(LmforgeError, ValueError):
    """A forward pass or a ``step`` would go past the model's ``max_seq_len`` (the engine should crop or stop)."""


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

    def num_params(self, exclude_embeddings: bool = False) -> int:
        raise NotImplementedError

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Forward+backward FLOPs per trained token (6N plus attention), as in the PaLM/nanoGPT MFU."""
        raise NotImplementedError


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; targets (B, T) already shifted, -100 ignored."""
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )
