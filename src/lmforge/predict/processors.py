"""Composable logits processors ``(input_ids, scores) -> scores`` (as in HF transformers' generation).

``input_ids`` (B, T) long holds each row's tokens so far (prompt and completion); NEGATIVE ids mark
left padding and are ignored. ``scores`` (B, V) float are the next-token logits (log-probabilities in
beam search). A processor returns new scores and never changes its inputs.

:func:`build_processors` assembles them in the order HF applies them: repetition penalty,
no-repeat-ngram, (lmforge's own) the copy bias, then, only when sampling, temperature, top-k, top-p.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Generic, NamedTuple, TypeVar

import numpy as np
import torch

from lmforge.predict.config import GenerationConfig

LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(input_ids (B, T), scores (B, V)) -> scores (B, V)``."""

S = TypeVar("S")


class RowStates(Generic[S]):
    """Per-row state of a stateful processor (a grammar matcher, where the prompt ends), found by the row's
    tokens rather than its position, so it works in any batch layout: :func:`generate`'s (rows dropped as
    they finish, beams reordered) and a scheduler that calls once per row with that row's own (1, T) ids.

    A row (padding dropped) seen for the first time, whose tokens less the last were not seen in an earlier
    call, is a prompt: ``start(tokens)``; otherwise it continues that row: ``advance(state, last_token)``,
    which must return a new state (the parent may continue in other rows too). The ``capacity`` most
    recently used rows are kept."""

    def __init__(
        self, start: Callable[[tuple[int, ...]], S], advance: Callable[[S, int], S], capacity: int = 1024
    ) -> None:
        self.start = start
        self.advance = advance
        self.capacity = capacity
        self.states: OrderedDict[tuple[int, ...], S] = OrderedDict()

    def __call__(self, input_ids: torch.Tensor) -> list[tuple[tuple[int, ...], S]]:
        """Per row of ``input_ids`` (B, T): its tokens (no padding) and its state."""
        found: list[tuple[tuple[int, ...], S]] = []
        new: dict[tuple[int, ...], S] = {}
        for row in input_ids.tolist():
            key = tuple(t for t in row if t >= 0)
            state = new.get(key)
            if state is None:
                state = self.states.get(key)
            if state is None:
                parent = self.states.get(key[:-1]) if key else None
                state = self.start(key) if parent is None else self.advance(parent, key[-1])
            new[key] = state
            found.append((key, state))
        for key, state in new.items():  # known only from the next call on: rows of one call never chain
            self.states[key] = state
            self.states.move_to_end(key)
        while len(self.states) > self.capacity:
            self.states.popitem(last=False)
        return found


class TemperatureProcessor:
    """Divide the logits by ``temperature`` (> 0; below 1 sharpens, above 1 flattens)."""

    def __init__(self, temperature: float) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores / self.temperature


class TopKProcessor:
    """Keep the ``top_k`` highest scores (ties with the k-th are kept), set the rest to ``-inf``."""

    def __init__(self, top_k: int, min_tokens_to_keep: int = 1) -> None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.top_k = max(int(top_k), int(min_tokens_to_keep))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        k = min(self.top_k, scores.size(-1))
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]  # (B, 1)
        return scores.masked_fill(scores < kth, float("-inf"))


class TopPProcessor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability reaches ``top_p``."""

    def __init__(self, top_p: float, min_tokens_to_keep: int = 1) -> None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.top_p = float(top_p)
        self.min_tokens_to_keep = int(min_tokens_to_keep)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        sorted_scores, sorted_idx = torch.sort(scores, dim=-1, descending=False)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)  # (B, V), ascending probabilities
        # drop the low tail whose mass stays within 1 - top_p; the most likely tokens always survive
        remove = cum <= (1.0 - self.top_p)
        remove[..., -self.min_tokens_to_keep :] = False
        remove = remove.scatter(-1, sorted_idx, remove)
        return scores.masked_fill(remove, float("-inf"))


def _seen_mask(input_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, T) ids with negative padding -> (B, V) bool: the token occurs in the row."""
    ids = input_ids.masked_fill(input_ids < 0, vocab_size)  # padding goes to a spare column
    seen = torch.zeros(input_ids.size(0), vocab_size + 1, dtype=torch.bool, device=input_ids.device)
    return seen.scatter_(1, ids, True)[:, :vocab_size]


class RepetitionPenaltyProcessor:
    """CTRL repetition penalty (as HF): every token already in the row has its score divided by
    ``penalty`` when positive and multiplied by it when negative (``penalty > 1`` discourages repeats)."""

    def __init__(self, penalty: float) -> None:
        if not penalty > 0:
            raise ValueError(f"repetition penalty must be > 0, got {penalty}")
        self.penalty = float(penalty)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        seen = _seen_mask(input_ids, scores.size(-1))
        penalized = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
        return torch.where(seen, penalized, scores)


class NoRepeatNGramProcessor:
    """Ban every token that would complete an n-gram already present in the row (prompt included)."""

    def __init__(self, ngram_size: int) -> None:
        if ngram_size < 1:
            raise ValueError(f"no_repeat_ngram_size must be >= 1, got {ngram_size}")
        self.n = int(ngram_size)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        n = self.n
        B, T = input_ids.shape
        if T < n:
            return scores
        if n == 1:
            return scores.masked_fill(_seen_mask(input_ids, scores.size(-1)), float("-inf"))
        windows = input_ids.unfold(1, n, 1)  # (B, T - n + 1, n): every n-gram of the row
        suffix = input_ids[:, T - n + 1 :]  # (B, n - 1): the n-gram the next token would complete
        match = (windows[:, :, :-1] == suffix[:, None, :]).all(-1)
        match &= (windows >= 0).all(-1) & (suffix >= 0).all(-1, keepdim=True)
        banned = torch.zeros(B, scores.size(-1) + 1, dtype=torch.bool, device=scores.device)
        targets = windows[:, :, -1].masked_fill(~match, scores.size(-1))  # unmatched -> spare column
        banned.scatter_(1, targets, True)
        return scores.masked_fill(banned[:, :-1], float("-inf"))


class _CopyState(NamedTuple):
    """A row's copy state: its prompt, the match length ending at each prompt position, which positions
    were copied, the positions the next token would continue, and the source boost (tokens, bias)."""

    source: np.ndarray
    match: np.ndarray
    copied: np.ndarray
    targets: np.ndarray
    boost: tuple[torch.Tensor, torch.Tensor]


class CopyBiasProcessor:
    """A decoding-time copy mechanism (prompt lookup, in the spirit of a pointer network's copy switch, for
    any model family): ``copy_bias`` is added to the score of each token that follows, in the prompt, the
    longest suffix of the completion found there with a token after it (the prompt ``5 6 7 5 8`` and the
    completion ``... 5`` boost 6 and 8; ``... 5 6`` boosts 7 alone, its match of two tokens being the
    longest), and ``source_bias`` to every token of the prompt (halving every ``source_half_life`` tokens
    from the prompt's start, by the token's first occurrence, when that is > 0). Nothing is boosted before
    the completion's first token occurs in the prompt, except by ``source_bias``.

    Coverage (as pointer-generator networks' coverage, against loops): a prompt position whose token was
    boosted and then produced counts as copied, and is not boosted again; so a copy that reaches the end of
    a span does not start it over.

    A row's prompt is what it holds when the processor first sees it (:class:`RowStates`); its state is the
    length of the match ending at each prompt position, advanced by one comparison per token (the longest
    common suffix recurrence), and the copied positions, so a step costs O(prompt length) whatever the
    completion's length."""

    def __init__(self, copy_bias: float = 0.0, source_bias: float = 0.0, source_half_life: int = 0) -> None:
        self.copy_bias = float(copy_bias)
        self.source_bias = float(source_bias)
        self.source_half_life = int(source_half_life)
        self.rows: RowStates[_CopyState] = RowStates(self._start, self._advance)

    def _start(self, tokens: tuple[int, ...]) -> _CopyState:
        source = np.asarray(tokens, dtype=np.int64)  # (L,)
        match = np.zeros(len(source), dtype=np.int64)  # match[i]: completion suffix ending at source[i]
        copied = np.zeros(len(source), dtype=bool)  # copied[i]: source[i] was copied
        # the prompt's distinct tokens and the source bias of each, once per row
        distinct, first = np.unique(source, return_index=True)
        weight = np.full(len(distinct), self.source_bias)
        if self.source_half_life > 0:
            weight = weight * 0.5 ** (first / self.source_half_life)
        boost = (torch.from_numpy(distinct), torch.from_numpy(weight))
        return _CopyState(source, match, copied, self._targets(match, copied), boost)

    @staticmethod
    def _targets(match: np.ndarray, copied: np.ndarray) -> np.ndarray:
        """(L,) bool: the positions whose token continues the longest match and was not copied yet."""
        targets = np.zeros(len(match), dtype=bool)
        if len(match) < 2:
            return targets
        open_ = ~copied[1:]  # continuation i + 1 of a match ending at i
        longest = int(match[:-1][open_].max()) if open_.any() else 0
        if longest > 0:
            targets[1:] = (match[:-1] == longest) & open_
        return targets

    @classmethod
    def _advance(cls, state: _CopyState, token: int) -> _CopyState:
        source = state.source
        copied = state.copied | (state.targets & (source == token))
        new = (source == token).astype(np.int64)
        new[1:] *= state.match[:-1] + 1  # a match ending at i extends the one that ended at i - 1
        return _CopyState(source, new, copied, cls._targets(new, copied), state.boost)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        bias = torch.zeros_like(scores)
        for b, (_, st) in enumerate(self.rows(input_ids)):
            if self.source_bias and len(st.source):
                tokens, weight = st.boost
                bias[b, tokens.to(scores.device)] += weight.to(scores.device, scores.dtype)
            if self.copy_bias:
                follow = np.unique(st.source[st.targets])  # what came after each longest match
                if len(follow):
                    bias[b, torch.from_numpy(follow).to(scores.device)] += self.copy_bias
        return scores + bias


class LogitsProcessorList(list):
    """Apply processors in order; an empty list returns the scores unchanged."""

    def __init__(self, processors: Sequence[LogitsProcessor] = ()) -> None:
        super().__init__(processors)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for p in self:
            scores = p(input_ids, scores)
        return scores

    @property
    def needs_history(self) -> bool:
        """Whether a processor may read ``input_ids`` (the engine then keeps the token history)."""
        return not all(isinstance(p, (TemperatureProcessor, TopKProcessor, TopPProcessor)) for p in self)


def build_processors(config: GenerationConfig, num_eos: int = 0) -> LogitsProcessorList:
    """The processors a :class:`GenerationConfig` asks for, in HF order; only enabled ones are built.

    Sampling warpers (temperature, top-k, top-p) are used only with ``do_sample`` (and temperature > 0);
    with beam sampling they keep at least ``num_eos + 1`` tokens so a beam can always continue.
    """
    procs: list[LogitsProcessor] = []
    if config.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyProcessor(config.repetition_penalty))
    if config.no_repeat_ngram_size > 0:
        procs.append(NoRepeatNGramProcessor(config.no_repeat_ngram_size))
    if config.copy_bias or config.source_bias:
        procs.append(CopyBiasProcessor(config.copy_bias, config.source_bias, config.source_half_life))
    if config.do_sample and config.temperature > 0:
        keep = num_eos + 1 if config.num_beams > 1 else 1
        if config.temperature != 1.0:
            procs.append(TemperatureProcessor(config.temperature))
        if config.top_k:
            procs.append(TopKProcessor(config.top_k, min_tokens_to_keep=keep))
        if config.top_p < 1.0:
            procs.append(TopPProcessor(config.top_p, min_tokens_to_keep=keep))
    return LogitsProcessorList(procs)


class PresenceFrequencyPenaltyProcessor:
    """OpenAI's presence and frequency penalties: ``score[j] -= c[j] * frequency + (c[j] > 0) * presence``,
    ``c[j]`` being how often token j was generated so far in the row (the prompt does not count).

    A row's prompt is what it holds when the processor first sees it (:class:`RowStates`), so one processor
    serves every row of a request in any batch layout."""

    def __init__(self, presence: float = 0.0, frequency: float = 0.0) -> None:
        self.presence = float(presence)
        self.frequency = float(frequency)
        self.prompt_lengths: RowStates[int] = RowStates(len, lambda start, _token: start)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        V = scores.size(-1)
        counts = torch.zeros(scores.size(0), V, dtype=scores.dtype, device=scores.device)
        for b, (tokens, start) in enumerate(self.prompt_lengths(input_ids)):
            generated = tokens[start:]
            if generated:
                ids = torch.tensor(generated, dtype=torch.long, device=scores.device)
                counts[b].index_add_(0, ids, torch.ones(len(generated), dtype=scores.dtype, device=scores.device))
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence


class LogitBiasProcessor:
    """Add ``bias[token_id]`` to that token's score in every row (OpenAI's ``logit_bias``; -100 in effect
    bans a token, +100 forces it)."""

    def __init__(self, bias: dict[int, float]) -> None:
        self.ids = torch.tensor(list(bias), dtype=torch.long)
        self.values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = scores.clone()
        out[:, self.ids.to(scores.device)] += self.values.to(scores.device, scores.dtype)
        return out
