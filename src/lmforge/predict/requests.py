"""What :class:`~lmforge.predict.continuous.ContinuousScheduler` keeps per request and per row: a
:class:`Request` (prompts, settings, callbacks; filled in by the scheduler as it runs), its rows (:class:`Row`,
one completion of one prompt), a group being prefilled (:class:`Prefill`) and a finished request's
:class:`RequestTiming`."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lmforge.predict.config import GenerationConfig, GenerationOutput, TokenLogprob
from lmforge.predict.decoding import LENGTH
from lmforge.predict.processors import LogitsProcessor, LogitsProcessorList
from lmforge.predict.streaming import RowText

TokenCallback = Callable[[int, list[int], list[TokenLogprob] | None], None]
"""``on_tokens(row, ids, logprobs)``: new ids of a row (``row = prompt * n + sequence``), with one
:class:`TokenLogprob` per id when the request asked for ``logprobs``."""


@dataclass(frozen=True)
class RequestTiming:
    """How long one request took (seconds from :meth:`~lmforge.predict.continuous.ContinuousScheduler.submit`)."""

    ttft_s: float | None
    """Until its first generated token (None: it ended before producing one, e.g. cancelled)."""
    e2e_s: float
    """Until it ended (answered, failed or cancelled)."""
    prompt_tokens: int
    completion_tokens: int
    """Tokens generated over all its rows (eos included)."""
    outcome: str
    """``"done"``, ``"error"`` or ``"cancelled"``."""
    steps_to_first_token: int | None = None
    """Scheduler steps from its submission to its first token (1: it started at the next step)."""


@dataclass(eq=False)
class Request:
    """Prompts to complete with one config: ``len(prompts) * config.num_return_sequences`` rows.

    ``on_done(output, logprobs)`` receives the :class:`GenerationOutput` of these prompts (as ``generate``
    returns it) and, when ``logprobs`` is not None, per row the :class:`TokenLogprob` of each returned id;
    ``on_error(exc)`` a failure. Both are called at most once, and neither after :meth:`cancel`."""

    prompts: list[list[int]]
    config: GenerationConfig
    processors: Sequence[LogitsProcessor] = ()
    """Extra processors, after the built-in ones, called per row with (1, T) ids and (1, V) scores."""
    logprobs: int | None = None
    """k: report each generated token's logprob and the k best alternatives (0: the token's only)."""
    on_tokens: TokenCallback | None = None
    on_done: Callable[[GenerationOutput, list[list[TokenLogprob]] | None], None] | None = None
    on_error: Callable[[BaseException], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    # filled by the scheduler
    submitted: float = 0.0
    first_token: float | None = None
    submit_step: int = 0
    first_token_step: int | None = None
    budgets: list[int] = field(default_factory=list)
    eos: list[int] = field(default_factory=list)
    procs: LogitsProcessorList = field(default_factory=LogitsProcessorList)
    generator: torch.Generator | None = None
    sampling: bool = False
    rows: list[Row] = field(default_factory=list)
    finished: int = 0
    generated: int = 0
    ended: bool = False

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def num_rows(self) -> int:
        return len(self.prompts) * self.config.num_return_sequences


@dataclass(eq=False)
class Row:
    """One decoding row: a completion of one prompt of a request."""

    req: Request
    index: int
    """``prompt * n + sequence`` within the request."""
    budget: int
    history: list[int]
    """Prompt then generated ids (only read when a processor needs them)."""
    tracker: RowText
    lps: list[TokenLogprob] = field(default_factory=list)
    sent: int = 0
    """Ids already streamed."""
    n_new: int = 0
    score: float = 0.0
    reason: int = LENGTH
    ids: list[int] = field(default_factory=list)
    text: str | None = None


@dataclass(eq=False)
class Prefill:
    """A group of requests whose prompts are being prefilled, ``chunk`` columns at a time."""

    requests: list[Request]
    ids: torch.Tensor
    """(G, L) left-padded prompts, one row per prompt of the group's requests."""
    valid: torch.Tensor | None
    state: Any
    offset: int = 0
    logits: torch.Tensor | None = None
