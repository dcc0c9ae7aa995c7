"""How to generate, separately from the model config: :class:`GenerationConfig` (validated on creation),
what comes back (:class:`GenerationOutput`) and the one error a user can cause (:class:`GenerationError`).

Kept apart from the engine so that the logits processors, which are built from a config, can import it
without importing the engine that uses them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, TypeGuard

from lmforge.config import LmforgeError

DEFAULT_MAX_NEW_TOKENS = 20
"""New tokens per prompt when neither ``max_new_tokens`` nor ``max_length`` is set."""


class GenerationError(LmforgeError, ValueError):
    """A user-facing generation problem (bad config, prompt too long for the model, ...).

    A :class:`~lmforge.config.LmforgeError`, so the CLI prints it as one line; still a ``ValueError`` for
    callers that caught it as one."""


def is_int(v: object) -> TypeGuard[int]:
    """An ``int`` that is not a ``bool`` (``True`` is no token id or size)."""
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class GenerationConfig:
    """How to generate (separate from the model config). Validated on creation and by :func:`generate`."""

    max_new_tokens: int | None = None
    """New tokens per prompt (default 20 when ``max_length`` is unset too)."""
    max_length: int | None = None
    """Prompt plus new tokens. When both limits are set, the tighter one applies per prompt."""
    do_sample: bool = False
    """Sample from the processed distribution instead of taking the most likely token."""
    temperature: float = 1.0
    """Sampling temperature; 0 means greedy."""
    top_k: int | None = None
    """Sample only among the k most likely tokens (None or 0: off)."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of most likely tokens with this much probability (1: off)."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens already in the prompt or completion (CTRL / HF convention; 1: off)."""
    no_repeat_ngram_size: int = 0
    """Never produce an n-gram of this size twice, prompt included (0: off)."""
    num_beams: int = 1
    """> 1: beam search."""
    length_penalty: float = 1.0
    """Beam score = sum_logprobs / new_tokens ** length_penalty (> 0 favours longer completions)."""
    early_stopping: bool | Literal["never"] = False
    """Beam search: True stops once ``num_beams`` hypotheses finished; False stops when the best running
    beam, scored at its current length, cannot beat the worst finished one; "never" scores it at the
    longest possible length (exact for ``length_penalty`` >= 0)."""
    num_return_sequences: int = 1
    """Completions per prompt (<= num_beams for beam search; sampling draws them independently)."""
    eos_token_id: int | list[int] | None = None
    """End-of-sequence id(s), left out of the returned ids. None: the tokenizer's end-of-text token;
    [] disables."""
    pad_token_id: int | None = None
    """Id fed for left padding (masked out by ``valid``). None: the first eos id, else 0."""
    stop_strings: list[str] | None = None
    """Stop once the decoded completion contains one of these; it is cut before it (needs a tokenizer)."""
    seed: int | None = None
    """Seed of the sampling generator: the same seed gives the same completions. None: torch's global RNG."""
    truncate_prompt: bool = False
    """A prompt that does not fit the model's context together with its new tokens is cut from the LEFT
    (its last tokens kept). False: such a prompt raises :class:`GenerationError`."""
    copy_bias: float = 0.0
    """lmforge's decoding-time copy mechanism (prompt lookup): added to the score of each token that continues
    the longest suffix of the completion found in the prompt, i.e. the token(s) that followed it there
    (:class:`~lmforge.predict.processors.CopyBiasProcessor`; 0: off)."""
    source_bias: float = 0.0
    """Added to the score of every token that occurs in the prompt (the other half of the copy mechanism;
    0: off)."""
    source_half_life: int = 0
    """``source_bias`` halves every this many tokens from the start of the prompt (by a token's first
    occurrence): a lead bias, as summaries draw on a text's beginning (0: the same bias everywhere)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`GenerationError` naming the first bad field."""

        def bad(name: str, msg: str) -> GenerationError:
            return GenerationError(f"GenerationConfig.{name} = {getattr(self, name)!r}: {msg}")

        for name in ("max_new_tokens", "max_length"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or v < 1):
                raise bad(name, "must be a positive integer or None")
        for name in ("do_sample", "truncate_prompt"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be True or False")
        for name in ("temperature", "top_p", "repetition_penalty", "length_penalty", "copy_bias", "source_bias"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad(name, "must be a finite number")
        if self.temperature < 0:
            raise bad("temperature", "must be >= 0 (0 means greedy)")
        if not is_int(self.source_half_life) or self.source_half_life < 0:
            raise bad("source_half_life", "must be a non-negative integer (0 is off)")
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 0):
            raise bad("top_k", "must be a non-negative integer or None")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be > 0 (1 is off)")
        if not is_int(self.no_repeat_ngram_size) or self.no_repeat_ngram_size < 0:
            raise bad("no_repeat_ngram_size", "must be a non-negative integer (0 is off)")
        if not is_int(self.num_beams) or self.num_beams < 1:
            raise bad("num_beams", "must be a positive integer")
        if self.early_stopping not in (True, False, "never") or not isinstance(self.early_stopping, (bool, str)):
            raise bad("early_stopping", "must be True, False or 'never'")
        if not is_int(self.num_return_sequences) or self.num_return_sequences < 1:
            raise bad("num_return_sequences", "must be a positive integer")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise bad("num_return_sequences", f"must be <= num_beams ({self.num_beams}) in beam search")
        if self.num_beams == 1 and not self.do_sample and self.num_return_sequences > 1:
            raise bad("num_return_sequences", "greedy decoding gives one sequence; set do_sample=True or num_beams")
        eos = self.eos_token_id
        if eos is not None:
            ids = [eos] if is_int(eos) else eos
            if not isinstance(ids, (list, tuple)) or not all(is_int(i) and i >= 0 for i in ids):
                raise bad("eos_token_id", "must be a non-negative integer, a list of them, or None")
        if self.pad_token_id is not None and (not is_int(self.pad_token_id) or self.pad_token_id < 0):
            raise bad("pad_token_id", "must be a non-negative integer or None")
        if isinstance(self.stop_strings, str):
            self.stop_strings = [self.stop_strings]
        if self.stop_strings is not None:
            if not isinstance(self.stop_strings, (list, tuple)) or not all(
                isinstance(s, str) and s for s in self.stop_strings
            ):
                raise bad("stop_strings", "must be a list of non-empty strings")
        if self.seed is not None and not is_int(self.seed):
            raise bad("seed", "must be an integer or None")


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability (log-softmax of the model's raw logits, before any processor)
    and the ``k`` most likely (id, logprob) alternatives at that position, best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class GenerationOutput:
    """Per prompt, ``num_return_sequences`` completions (best first for beam search)."""

    sequences: list[list[list[int]]]
    """New token ids only; no eos token; cut before a stop string (tokens wholly before it)."""
    scores: list[list[float]]
    """Beam search: the length-penalized beam score. Greedy / sampling: the sum of the model's
    (unprocessed) log-probabilities of the generated tokens, eos included."""
    finish_reasons: list[list[str]]
    """``"eos"``, ``"length"`` (token budget or context) or ``"stop"`` (a stop string)."""
    texts: list[list[str]] | None = None
    """Decoded completions, cut before a stop string (only when a tokenizer is given)."""
