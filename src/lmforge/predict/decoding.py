"""What one :func:`~lmforge.predict.generate` call shares with its search strategies (greedy / sampling
in :mod:`~lmforge.predict.sampling`, beam search in :mod:`~lmforge.predict.beam`): the resolved settings
(:class:`DecodeRun`), a finished :class:`Hypothesis` with its finish reason, and the prefill step that
both strategies start with.

Kept below the engine so that the strategies do not import the module that dispatches to them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lmforge.models.base import DecodingModel
from lmforge.predict.config import GenerationConfig
from lmforge.predict.processors import LogitsProcessorList
from lmforge.predict.streaming import GenerationTokenizer, Streamer

LENGTH, EOS, STOP = 0, 1, 2
"""Finish reasons, as ints (cheap to keep in tensors during beam search)."""
FINISH_REASONS = ("length", "eos", "stop")
"""The names :class:`~lmforge.predict.config.GenerationOutput` reports, indexed by the ints above."""


@dataclass
class DecodeRun:
    """The settings of one generate call, resolved once (eos ids, pad id, processors, sampling generator)."""

    model: DecodingModel
    config: GenerationConfig
    device: torch.device
    eos: list[int]
    pad: int
    procs: LogitsProcessorList
    sampling: bool
    generator: torch.Generator | None
    tokenizer: GenerationTokenizer | None
    stops: list[str]
    streamer: Streamer | None


@dataclass
class Hypothesis:
    """One returned completion: new ids (no eos), its score and finish reason, its text when decoded."""

    ids: list[int]
    score: float
    reason: int
    text: str | None = None


def prefill(run: DecodeRun, prompts: list[list[int]], budget: int) -> tuple[Any, torch.Tensor, torch.Tensor | None]:
    """Left-pad the prompts into (N, L), one ``step`` -> state, last logits (N, V), history (N, L) or None
    (history: the prompt ids with -1 for padding, only kept when a processor reads it)."""
    lengths = [len(p) for p in prompts]
    N, L = len(prompts), max(lengths)
    ids = torch.tensor([[run.pad] * (L - len(p)) + p for p in prompts], dtype=torch.long, device=run.device)
    valid = None
    if min(lengths) < L:
        lens = torch.tensor(lengths, device=run.device)
        valid = torch.arange(L, device=run.device)[None, :] >= (L - lens)[:, None]  # (N, L)
    state = run.model.init_state(N, run.device)
    if hasattr(run.model, "reserve_state"):  # a cache can be allocated once (the longest prompt + its budget)
        run.model.reserve_state(state, L + budget)
    logits, state = run.model.step(ids, state, valid=valid)
    history = None
    if run.procs.needs_history:
        history = ids if valid is None else ids.masked_fill(~valid, -1)
    return state, logits[:, -1, :], history
