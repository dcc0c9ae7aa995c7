"""One generation engine for every model family (layer 3: imports models' contract only).

The engine talks to a model only through the incremental-state contract of
:class:`lmforge.models.base.LanguageModel`: ``init_state``, ``step`` (with a ``valid`` mask for left
padding), ``reorder_state``, ``state_length`` and ``max_seq_len``, and where a model has them, ``reserve_state``
(how long the state will grow) and ``decoding()`` (the context to decode in). So a KV-cached transformer and a
recurrent network decode with the same code.

Flow of :func:`generate`:

1. plan: per prompt a budget of new tokens (``max_new_tokens`` / ``max_length``) and a check (or an
   explicit left truncation) against the model's context;
2. prefill: the prompts, left-padded to one (N, L) batch with a ``valid`` mask, go through one ``step``;
3. decode: one ``step`` of (rows, 1) per token. Greedy and sampling drop finished rows from the state
   (``reorder_state``); beam search keeps ``num_beams`` rows per prompt and reorders them every step.

Scores are processed by :mod:`lmforge.predict.processors` in HF's order. Beam search follows HF
transformers (>= 4.50): a finished hypothesis of ``n`` new tokens (its end-of-sequence token counted)
scores ``sum_logprobs / n ** length_penalty``, and ``early_stopping`` means the same.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lmforge.predict.processors import LogitsProcessor, LogitsProcessorList, build_processors
from lmforge.predict.streaming import IncrementalDetokenizer

Streamer = Callable[[int, list[int]], None]
"""``streamer(row, new_token_ids)``; ``row = prompt_index * num_return_sequences + sequence_index``."""

TextStreamer = Callable[[int, str], None]
"""``streamer(row, new_text)`` for :func:`generate_text`."""

DEFAULT_MAX_NEW_TOKENS = 20
"""New tokens per prompt when neither ``max_new_tokens`` nor ``max_length`` is set."""

_LENGTH, _EOS, _STOP = 0, 1, 2
_REASONS = ("length", "eos", "stop")
_NEG = -1.0e9  # "impossible" beam score (additive, as HF), finite so that sums and sorts stay defined


class GenerationError(ValueError):
    """A user-facing generation problem (bad config, prompt too long for the model, ...)."""


# ------------------------------------------------------------------------------------------ config
def _is_int(v: Any) -> bool:
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

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`GenerationError` naming the first bad field."""

        def bad(name: str, msg: str) -> GenerationError:
            return GenerationError(f"GenerationConfig.{name} = {getattr(self, name)!r}: {msg}")

        for name in ("max_new_tokens", "max_length"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 1):
                raise bad(name, "must be a positive integer or None")
        for name in ("do_sample", "truncate_prompt"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be True or False")
        for name in ("temperature", "top_p", "repetition_penalty", "length_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad(name, "must be a finite number")
        if self.temperature < 0:
            raise bad("temperature", "must be >= 0 (0 means greedy)")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 0):
            raise bad("top_k", "must be a non-negative integer or None")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be > 0 (1 is off)")
        if not _is_int(self.no_repeat_ngram_size) or self.no_repeat_ngram_size < 0:
            raise bad("no_repeat_ngram_size", "must be a non-negative integer (0 is off)")
        if not _is_int(self.num_beams) or self.num_beams < 1:
            raise bad("num_beams", "must be a positive integer")
        if self.early_stopping not in (True, False, "never") or not isinstance(self.early_stopping, (bool, str)):
            raise bad("early_stopping", "must be True, False or 'never'")
        if not _is_int(self.num_return_sequences) or self.num_return_sequences < 1:
            raise bad("num_return_sequences", "must be a positive integer")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise bad("num_return_sequences", f"must be <= num_beams ({self.num_beams}) in beam search")
        if self.num_beams == 1 and not self.do_sample and self.num_return_sequences > 1:
            raise bad("num_return_sequences", "greedy decoding gives one sequence; set do_sample=True or num_beams")
        eos = self.eos_token_id
        if eos is not None:
            ids = [eos] if _is_int(eos) else eos
            if not isinstance(ids, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in ids):
                raise bad("eos_token_id", "must be a non-negative integer, a list of them, or None")
        if self.pad_token_id is not None and (not _is_int(self.pad_token_id) or self.pad_token_id < 0):
            raise bad("pad_token_id", "must be a non-negative integer or None")
        if isinstance(self.stop_strings, str):
            self.stop_strings = [self.stop_strings]
        if self.stop_strings is not None:
            if not isinstance(self.stop_strings, (list, tuple)) or not all(
                isinstance(s, str) and s for s in self.stop_strings
            ):
                raise bad("stop_strings", "must be a list of non-empty strings")
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", "must be an integer or None")


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


# ------------------------------------------------------------------------------------------ public
def generate(
    model: Any,
    prompts: Sequence[Sequence[int]] | torch.Tensor,
    config: GenerationConfig | None = None,
    *,
    tokenizer: Any = None,
    streamer: Streamer | None = None,
    processors: Sequence[LogitsProcessor] | None = None,
) -> GenerationOutput:
    """Generate completions of token-id prompts with any model that implements the state contract.

    ``prompts``: a list of id lists (any lengths; batched with left padding) or a (B, T) / (T,) long tensor.
    ``tokenizer`` (``encode``/``decode``) is needed for ``stop_strings`` and gives the default eos and
    ``texts``. ``streamer(row, ids)`` receives the new ids of each row as they are produced (exactly the
    returned ids, in order; with stop strings, text that may begin a stop string is held back); beam search
    calls it once per returned sequence at the end. Extra ``processors`` run after the built-in ones.
    """
    config = config if config is not None else GenerationConfig()
    config.validate()
    prompt_lists = _as_prompt_lists(prompts)
    if config.stop_strings and tokenizer is None:
        raise GenerationError("GenerationConfig.stop_strings needs a tokenizer to decode the completion")
    eos = _resolve_eos(config, tokenizer)
    vocab = _vocab_size(model)
    _check_ids(prompt_lists, eos, config.pad_token_id, vocab)
    max_seq_len = getattr(model, "max_seq_len", None)
    prompt_lists, budgets = _plan(prompt_lists, config, max_seq_len)

    procs = build_processors(config, num_eos=len(eos))
    if processors:
        procs.extend(processors)
    device = _model_device(model)
    sampling = config.do_sample and config.temperature > 0
    generator = None
    if sampling and config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    run = _Run(
        model=model,
        config=config,
        device=device,
        eos=eos,
        pad=config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0),
        procs=procs,
        sampling=sampling,
        generator=generator,
        tokenizer=tokenizer,
        stops=list(config.stop_strings or []),
        streamer=streamer,
    )
    R = config.num_return_sequences
    results: list[list[_Hyp]] = [[] for _ in prompt_lists]
    was_training = model.training
    model.eval()
    try:
        decoding = model.decoding() if hasattr(model, "decoding") else contextlib.nullcontext()
        with torch.inference_mode(), decoding:
            for group in _context_groups([len(p) for p in prompt_lists], budgets, max_seq_len):
                group_prompts = [prompt_lists[i] for i in group]
                group_budgets = [budgets[i] for i in group]
                if config.num_beams > 1:
                    hyps = _beam_search(run, group_prompts, group_budgets, group)
                else:
                    hyps = _sample_search(run, group_prompts, group_budgets, group)
                for k, i in enumerate(group):
                    results[i] = hyps[k * R : (k + 1) * R]
    finally:
        model.train(was_training)
    return GenerationOutput(
        sequences=[[h.ids for h in r] for r in results],
        scores=[[h.score for h in r] for r in results],
        finish_reasons=[[_REASONS[h.reason] for h in r] for r in results],
        texts=[[h.text or "" for h in r] for r in results] if tokenizer is not None else None,
    )


def generate_text(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    config: GenerationConfig | None = None,
    streamer: TextStreamer | None = None,
) -> list[list[str]]:
    """Encode text prompts, :func:`generate`, decode: per prompt ``num_return_sequences`` completions,
    each cut before the first stop string. ``streamer(row, text)`` receives the text as it is produced."""
    if isinstance(prompts, str):
        raise GenerationError("generate_text takes a list of prompts; wrap a single prompt in a list")
    ids = [_encode(tokenizer, p) for p in prompts]
    adapter = _TextStreamAdapter(tokenizer, streamer) if streamer is not None else None
    out = generate(model, ids, config, tokenizer=tokenizer, streamer=adapter)
    assert out.texts is not None
    if adapter is not None:
        adapter.close(out.texts)
    return out.texts


# ------------------------------------------------------------------------------------------ setup
@dataclass
class _Run:
    model: Any
    config: GenerationConfig
    device: torch.device
    eos: list[int]
    pad: int
    procs: LogitsProcessorList
    sampling: bool
    generator: torch.Generator | None
    tokenizer: Any
    stops: list[str]
    streamer: Streamer | None


@dataclass
class _Hyp:
    ids: list[int]
    score: float
    reason: int
    text: str | None = None


def _as_prompt_lists(prompts: Sequence[Sequence[int]] | torch.Tensor) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        if prompts.dim() != 2 or prompts.dtype.is_floating_point:
            raise GenerationError(
                f"prompts tensor must be (B, T) integer ids, got {tuple(prompts.shape)} {prompts.dtype}"
            )
        return prompts.tolist()
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise GenerationError("prompts must be a non-empty list of token-id lists (or a (B, T) tensor)")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, torch.Tensor):
            p = p.tolist()
        if not isinstance(p, (list, tuple)) or not all(_is_int(t) for t in p):
            raise GenerationError(f"prompt {i} must be a list of integer token ids, got {type(p).__name__}")
        out.append(list(p))
    return out


def _tokenizer_eot(tokenizer: Any) -> int | None:
    for name in ("eot_id", "eot_token_id", "eos_id", "eos_token_id"):
        v = getattr(tokenizer, name, None)
        if _is_int(v):
            return v
    return None


def _resolve_eos(config: GenerationConfig, tokenizer: Any) -> list[int]:
    eos = config.eos_token_id
    if eos is None:
        eot = _tokenizer_eot(tokenizer) if tokenizer is not None else None
        return [] if eot is None else [eot]
    return [eos] if _is_int(eos) else list(dict.fromkeys(eos))


def _vocab_size(model: Any) -> int | None:
    v = getattr(model, "vocab_size", None)
    if not _is_int(v):
        v = getattr(getattr(model, "config", None), "vocab_size", None)
    return v if _is_int(v) else None


def _model_device(model: Any) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _check_ids(prompts: list[list[int]], eos: list[int], pad: int | None, vocab: int | None) -> None:
    for i, p in enumerate(prompts):
        if not p:
            raise GenerationError(f"prompt {i} is empty: give at least one token (e.g. the tokenizer's end-of-text id)")
        lo, hi = min(p), max(p)
        if lo < 0 or (vocab is not None and hi >= vocab):
            raise GenerationError(
                f"prompt {i} has token id {lo if lo < 0 else hi} outside the model's vocabulary of {vocab} ids"
            )
    if vocab is not None:
        for name, ids in (("eos_token_id", eos), ("pad_token_id", [] if pad is None else [pad])):
            for t in ids:
                if t >= vocab:
                    raise GenerationError(f"GenerationConfig.{name} = {t} is outside the model's vocabulary of {vocab}")


def _plan(
    prompts: list[list[int]], config: GenerationConfig, max_seq_len: int | None
) -> tuple[list[list[int]], list[int]]:
    """Per prompt: the new-token budget, and the prompt (left-truncated when allowed) that fits the context."""
    out, budgets = [], []
    for i, p in enumerate(prompts):
        L = len(p)
        n = config.max_new_tokens
        if config.max_length is not None:
            room = config.max_length - L
            if room < 1:
                raise GenerationError(
                    f"prompt {i} has {L} tokens, leaving no room for new tokens under "
                    f"GenerationConfig.max_length = {config.max_length}"
                )
            n = room if n is None else min(n, room)
        n = DEFAULT_MAX_NEW_TOKENS if n is None else n
        C = max_seq_len
        if C is not None and L + n > C:
            if n >= C:
                raise GenerationError(
                    f"{n} new tokens leave no room for prompt {i} in the model's context of {C} tokens; "
                    "lower GenerationConfig.max_new_tokens"
                )
            if not config.truncate_prompt:
                if L > C:
                    raise GenerationError(
                        f"prompt {i} has {L} tokens, longer than the model's context of {C} tokens "
                        f"(set truncate_prompt=True to keep its last {C - n} tokens)"
                    )
                raise GenerationError(
                    f"prompt {i} ({L} tokens) + {n} new tokens = {L + n} tokens exceeds the model's context "
                    f"of {C} tokens (lower max_new_tokens, or set truncate_prompt=True to keep the prompt's "
                    f"last {C - n} tokens)"
                )
            p = p[L - (C - n) :]
        out.append(p)
        budgets.append(n)
    return out, budgets


def _context_groups(lengths: list[int], budgets: list[int], max_seq_len: int | None) -> list[list[int]]:
    """Split the prompts into batches whose padded length plus new tokens fits the context (padding
    occupies state too). One batch unless the budgets differ (``max_length``) on a bounded model."""
    order = list(range(len(lengths)))
    if max_seq_len is None or max(lengths) + max(budgets) <= max_seq_len:
        return [order]
    groups: list[list[int]] = []
    cur: list[int] = []
    top_len = top_new = 0
    for i in sorted(order, key=lambda j: lengths[j]):
        L, n = max(top_len, lengths[i]), max(top_new, budgets[i])
        if cur and L + n > max_seq_len:
            groups.append(cur)
            cur, L, n = [], lengths[i], budgets[i]
        cur.append(i)
        top_len, top_new = L, n
    groups.append(cur)
    return groups


def _encode(tokenizer: Any, text: str) -> list[int]:
    ids = tokenizer.encode(text)
    return list(getattr(ids, "ids", ids))


def _prefill(run: _Run, prompts: list[list[int]], budget: int) -> tuple[Any, torch.Tensor, torch.Tensor | None]:
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


def _pick(run: _Run, scores: torch.Tensor) -> torch.Tensor:
    """(B, V) processed scores -> (B,) next tokens."""
    if run.sampling:
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, 1, generator=run.generator).squeeze(1)
    return scores.argmax(dim=-1)


# ------------------------------------------------------------------------------ stop strings / text
def _find_stop(text: str, stops: list[str], start: int = 0) -> int:
    """Position of the earliest stop string in ``text[start:]`` (-1: none)."""
    found = [p for p in (text.find(s, start) for s in stops) if p >= 0]
    return min(found) if found else -1


def _held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of ``text`` that could be the start of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def _ids_before(tokenizer: Any, ids: list[int], pos: int, text: str) -> int:
    """Number of leading tokens whose decoded text lies wholly within ``text[:pos]``."""
    for j in range(len(ids), -1, -1):
        d = tokenizer.decode(ids[:j]) if j else ""
        if len(d) <= pos and text.startswith(d):
            return j
    return 0


class _RowText:
    """Python-side mirror of the rows' completions, kept only when streaming or watching stop strings:
    ids, decoded text, stop-string detection and the streaming hold-back."""

    def __init__(self, run: _Run, stream_rows: list[int]) -> None:
        n = len(stream_rows)
        self.run = run
        self.stream_rows = stream_rows
        self.ids: list[list[int]] = [[] for _ in range(n)]
        self.text = [""] * n
        self.offsets: list[list[int]] = [[0] for _ in range(n)]  # offsets[r][j] = len(decode(ids[:j]))
        self.sent = [0] * n
        self.cut: list[tuple[int, str] | None] = [None] * n
        self.max_stop = max((len(s) for s in run.stops), default=0)

    def add(self, r: int, tok: int) -> bool:
        """Append a (non-eos) token to row ``r``; True when it completes a stop string."""
        ids = self.ids[r]
        ids.append(tok)
        run = self.run
        if not run.stops:
            if run.streamer is not None:
                run.streamer(self.stream_rows[r], [tok])
                self.sent[r] = len(ids)
            return False
        prev = len(self.text[r])
        text = run.tokenizer.decode(ids)
        self.text[r] = text
        offs = self.offsets[r]
        offs.append(len(text))
        # a few extra characters: a partial UTF-8 character at the end may have decoded differently before
        pos = _find_stop(text, run.stops, max(0, min(prev, len(text)) - self.max_stop - 4))
        if pos >= 0:
            j = max(_ids_before(run.tokenizer, ids, pos, text), self.sent[r])
            self.cut[r] = (j, text[:pos])
            self._emit(r, j)
            return True
        if run.streamer is not None:
            safe = len(text) - _held_back(text, run.stops)
            j = self.sent[r]
            while j < len(ids) and offs[j + 1] <= safe:
                j += 1
            self._emit(r, j)
        return False

    def finish(self, r: int) -> None:
        """Row ``r`` ended without a stop string: stream whatever was held back."""
        self._emit(r, len(self.ids[r]))

    def _emit(self, r: int, j: int) -> None:
        if self.run.streamer is not None and j > self.sent[r]:
            self.run.streamer(self.stream_rows[r], self.ids[r][self.sent[r] : j])
        self.sent[r] = max(self.sent[r], j)

    def result(self, r: int) -> tuple[list[int], str | None, bool]:
        """(ids, text or None, stopped)."""
        if self.cut[r] is not None:
            j, text = self.cut[r]
            return self.ids[r][:j], text, True
        return self.ids[r], (self.text[r] if self.run.stops else None), False


def _finalize_text(run: _Run, ids: list[int], text: str | None) -> tuple[list[int], str | None, bool]:
    """Decode (when a tokenizer is given) and cut at the first stop string."""
    if run.tokenizer is None:
        return ids, None, False
    if text is None:
        text = run.tokenizer.decode(ids)
    if run.stops:
        pos = _find_stop(text, run.stops)
        if pos >= 0:
            return ids[: _ids_before(run.tokenizer, ids, pos, text)], text[:pos], True
    return ids, text, False


class _TextStreamAdapter:
    """Turns id streaming into text streaming, one :class:`IncrementalDetokenizer` per row."""

    def __init__(self, tokenizer: Any, callback: TextStreamer) -> None:
        self.tokenizer = tokenizer
        self.callback = callback
        self.rows: dict[int, IncrementalDetokenizer] = {}

    def _row(self, row: int) -> IncrementalDetokenizer:
        if row not in self.rows:
            self.rows[row] = IncrementalDetokenizer(self.tokenizer)
        return self.rows[row]

    def __call__(self, row: int, ids: list[int]) -> None:
        delta = self._row(row).add(ids)
        if delta:
            self.callback(row, delta)

    def close(self, texts: list[list[str]]) -> None:
        """Send what is left of each final text (e.g. the part of a token before a stop string)."""
        for i, seqs in enumerate(texts):
            for j, text in enumerate(seqs):
                delta = self._row(i * len(seqs) + j).finish(text)
                if delta:
                    self.callback(i * len(seqs) + j, delta)


# ------------------------------------------------------------------------------ greedy / sampling
def _sample_search(run: _Run, prompts: list[list[int]], budgets: list[int], prompt_ids: list[int]) -> list[_Hyp]:
    """Greedy or sampled decoding of a batch; returns ``len(prompts) * R`` hypotheses, prompt-major."""
    model, device, R = run.model, run.device, run.config.num_return_sequences
    state, logits, history = _prefill(run, prompts, max(budgets))
    if R > 1:  # one prefill per prompt, then R rows each
        expand = torch.arange(len(prompts), device=device).repeat_interleave(R)
        state = model.reorder_state(state, expand)
        logits = logits[expand]
        history = history[expand] if history is not None else None
    B = len(prompts) * R
    row_budget = [b for b in budgets for _ in range(R)]
    max_steps = max(row_budget)
    budget_t = torch.tensor(row_budget, device=device) if min(row_budget) < max_steps else None
    L = history.size(1) if history is not None else 0
    if history is not None:
        history = torch.cat([history, history.new_full((B, max_steps), -1)], dim=1)

    out = torch.full((B, max_steps), run.pad, dtype=torch.long, device=device)  # (B, steps) new tokens
    sum_lp = torch.zeros(B, dtype=torch.float32, device=device)
    n_gen = [0] * B
    reason = [_LENGTH] * B
    rows = list(range(B))  # active row -> output row
    rows_t: torch.Tensor | None = None  # the same on the device, once rows were dropped
    stream_rows = [prompt_ids[b // R] * R + b % R for b in range(B)]
    tracker = _RowText(run, stream_rows) if (run.streamer is not None or run.stops) else None
    eos_t = torch.tensor(run.eos, device=device) if run.eos else None
    single_eos = run.eos[0] if len(run.eos) == 1 else None

    for t in range(max_steps):
        scores = logits if logits.dtype == torch.float32 else logits.float()  # (A, V)
        logprobs = scores.log_softmax(dim=-1)
        if run.procs:
            scores = run.procs(history[:, : L + t] if history is not None else scores.new_empty(0, 0), scores)
        tok = _pick(run, scores)  # (A,)
        lp = logprobs.gather(1, tok[:, None]).squeeze(1)
        if rows_t is None:
            out[:, t] = tok
            sum_lp += lp
        else:
            out[rows_t, t] = tok
            sum_lp.index_add_(0, rows_t, lp)
        if history is not None:
            history[:, L + t] = tok

        is_eos = None
        if eos_t is not None:
            is_eos = tok == single_eos if single_eos is not None else torch.isin(tok, eos_t)
        last = t + 1 == max_steps
        ended: torch.Tensor | None = is_eos
        if budget_t is not None:
            at_budget = budget_t <= t + 1
            ended = at_budget if ended is None else ended | at_budget
        stopped: set[int] = set()
        if tracker is not None:
            eos_list = is_eos.tolist() if is_eos is not None else None
            for a, (b, tk) in enumerate(zip(rows, tok.tolist(), strict=True)):
                if (eos_list is None or not eos_list[a]) and tracker.add(b, tk):
                    stopped.add(a)
        if not (last or stopped or (ended is not None and bool(ended.any()))):
            logits, state = model.step(tok[:, None], state)
            logits = logits[:, -1, :]
            continue

        # some rows end here: record them, then drop them from the batch
        eos_list = is_eos.tolist() if is_eos is not None else [False] * len(rows)
        ended_list = ended.tolist() if ended is not None else [False] * len(rows)
        keep = []
        for a, b in enumerate(rows):
            if eos_list[a]:
                n_gen[b], reason[b] = t, _EOS
            elif a in stopped:
                n_gen[b], reason[b] = t + 1, _STOP
            elif ended_list[a] or last:
                n_gen[b], reason[b] = t + 1, _LENGTH
            else:
                keep.append(a)
                continue
            if tracker is not None and a not in stopped:
                tracker.finish(b)
        if not keep:
            break
        keep_t = torch.tensor(keep, device=device)
        state = model.reorder_state(state, keep_t)
        rows = [rows[a] for a in keep]
        rows_t = torch.tensor(rows, device=device)
        tok = tok[keep_t]
        budget_t = budget_t[keep_t] if budget_t is not None else None
        history = history[keep_t] if history is not None else None
        logits, state = model.step(tok[:, None], state)
        logits = logits[:, -1, :]

    out_list = out.tolist()
    scores_list = sum_lp.tolist()
    hyps = []
    for b in range(B):
        if tracker is not None:
            ids, text, stop = tracker.result(b)
            ids, text, _ = _finalize_text(run, ids, text) if not stop else (ids, text, True)
        else:
            ids, text, _ = _finalize_text(run, out_list[b][: n_gen[b]], None)
        hyps.append(_Hyp(ids=ids, score=scores_list[b], reason=reason[b], text=text))
    return hyps


# ------------------------------------------------------------------------------------- beam search
def _beam_search(run: _Run, prompts: list[list[int]], budgets: list[int], prompt_ids: list[int]) -> list[_Hyp]:
    """Beam search over a batch of prompts (N prompts x K beams as rows), as HF transformers does it."""
    cfg, model, device = run.config, run.model, run.device
    N, K, R = len(prompts), cfg.num_beams, cfg.num_return_sequences
    state, logits, prompt_hist = _prefill(run, prompts, max(budgets))
    expand = torch.arange(N, device=device).repeat_interleave(K)  # one prefill per prompt, K rows each
    state = model.reorder_state(state, expand)
    logits = logits[expand]
    prompt_hist = prompt_hist[expand] if prompt_hist is not None else None
    V = logits.size(-1)
    max_steps = max(budgets)
    budget_t = torch.tensor(budgets, device=device)  # (N,)
    # candidates per prompt: enough that K of them continue even if the best ones all end in eos
    C = min(max(2, 1 + len(run.eos)) * K, K * V)
    top_k_mask = torch.arange(C, device=device) < K  # (C,)
    eos_t = torch.tensor(run.eos, device=device) if run.eos else None
    lp_pow = cfg.length_penalty

    run_seqs = torch.full((N, K, max_steps), run.pad, dtype=torch.long, device=device)
    run_scores = torch.zeros(N, K, device=device)
    run_scores[:, 1:] = _NEG  # all beams start equal: only the first may expand at step 0
    fin_seqs = run_seqs.clone()
    fin_scores = torch.full((N, K), _NEG, device=device)
    fin_len = torch.zeros(N, K, dtype=torch.long, device=device)
    fin_reason = torch.zeros(N, K, dtype=torch.long, device=device)
    fin_done = torch.zeros(N, K, dtype=torch.bool, device=device)
    improvable = torch.ones(N, dtype=torch.bool, device=device)
    base = torch.arange(N, device=device)[:, None] * K  # (N, 1) first row of each prompt

    min_budget = min(budgets)
    no_fin = torch.full((N,), _NEG, device=device)
    any_full = False  # whether some prompt holds K finished hypotheses (only then can its worst one bar a beam)

    for t in range(max_steps):
        logp = (logits if logits.dtype == torch.float32 else logits.float()).log_softmax(dim=-1)  # (N*K, V)
        if run.procs:
            hist = logp.new_empty(0, 0, dtype=torch.long)
            if prompt_hist is not None:
                hist = torch.cat([prompt_hist, run_seqs[:, :, :t].reshape(N * K, t)], dim=1)
            logp = run.procs(hist, logp)
        acc = (logp.view(N, K, V) + run_scores[:, :, None]).view(N, K * V)
        at_budget = min_budget <= t + 1  # some prompt spends its last token at this step
        fast = not run.stops and not at_budget and not run.sampling
        if fast:
            # when none of the K best candidates ends here (always so without an eos token), they are the K
            # that go on and the finished hypotheses stay as they are: the general path below would give the
            # same result with more ops
            cand_scores, idx = torch.topk(acc, K if eos_t is None else C, dim=-1)  # (N, K or C)
            if eos_t is not None:
                fast = not bool(torch.isin(idx[:, :K] % V, eos_t).any())
        if fast:
            run_scores, idx = cand_scores[:, :K], idx[:, :K]  # (N, K)
            run_beam, tok = idx // V, idx % V
            run_seqs = run_seqs.gather(1, run_beam[:, :, None].expand(N, K, max_steps))
            run_seqs[:, :, t] = tok
        else:
            if run.sampling:
                idx = torch.multinomial(acc.softmax(dim=-1), C, generator=run.generator)
                cand_scores, order = acc.gather(1, idx).sort(dim=-1, descending=True)
                idx = idx.gather(1, order)
            elif run.stops or at_budget:
                cand_scores, idx = torch.topk(acc, C, dim=-1)  # (N, C)
            beam, tok = idx // V, idx % V
            cand_seqs = run_seqs.gather(1, beam[:, :, None].expand(N, C, max_steps))  # (N, C, steps)
            cand_seqs[:, :, t] = tok

            hit_eos = torch.isin(tok, eos_t) if eos_t is not None else torch.zeros_like(tok, dtype=torch.bool)
            hit = hit_eos | (budget_t <= t + 1)[:, None] if at_budget else hit_eos
            hit_stop = None
            if run.stops:
                texts = [[run.tokenizer.decode(s) for s in row] for row in cand_seqs[:, :, : t + 1].tolist()]
                hit_stop = (
                    torch.tensor([[_find_stop(x, run.stops) >= 0 for x in row] for row in texts], device=device)
                    & ~hit_eos
                )
                hit = hit | hit_stop

            # the best K candidates that go on
            live_scores = cand_scores + hit.float() * _NEG
            nxt = torch.topk(live_scores, K, dim=-1).indices  # (N, K)
            run_seqs = cand_seqs.gather(1, nxt[:, :, None].expand(N, K, max_steps))
            run_scores = live_scores.gather(1, nxt)
            run_beam = beam.gather(1, nxt)

            # candidates that end here, among the top K, join the finished hypotheses if they are good enough
            # (not those grown from the placeholder beams of step 0: they only exist when K * V is tiny)
            just = hit & top_k_mask & (cand_scores > _NEG / 2)
            if bool(just.any()):
                new_scores = cand_scores / float(t + 1) ** lp_pow
                new_scores = new_scores + (~just | ~improvable[:, None]).float() * _NEG
                new_len = torch.full_like(tok, t + 1).masked_fill(hit_eos, t)  # eos is not returned
                new_reason = torch.full_like(tok, _LENGTH).masked_fill(hit_eos, _EOS)
                if hit_stop is not None:
                    new_reason = new_reason.masked_fill(hit_stop, _STOP)
                merged = torch.cat([fin_scores, new_scores], dim=1)
                best = torch.topk(merged, K, dim=-1).indices  # (N, K)
                fin_scores = merged.gather(1, best)
                fin_seqs = torch.cat([fin_seqs, cand_seqs], dim=1).gather(1, best[:, :, None].expand(N, K, max_steps))
                fin_len = torch.cat([fin_len, new_len], dim=1).gather(1, best)
                fin_reason = torch.cat([fin_reason, new_reason], dim=1).gather(1, best)
                fin_done = torch.cat([fin_done, just], dim=1).gather(1, best)
                any_full = bool(fin_done.all(dim=1).any())

        # can a running beam still beat the worst finished one? (HF's heuristics, per prompt) Not asked while
        # nothing has finished and every score is finite (no processor can ban tokens): the answer is yes.
        if not (fast and not any_full and not run.procs):
            gen_len = budget_t if cfg.early_stopping == "never" and lp_pow > 0 else torch.full_like(budget_t, t + 1)
            best_running = run_scores[:, 0] / gen_len.float() ** lp_pow
            worst_fin = torch.where(fin_done.all(dim=1), fin_scores.min(dim=1).values, no_fin) if any_full else no_fin
            improvable = improvable & (best_running > worst_fin)
            if at_budget:
                improvable &= budget_t > t + 1
            if cfg.early_stopping is True and any_full:  # done as soon as K hypotheses finished
                improvable &= ~fin_done.all(dim=1)
            if not bool(improvable.any()):
                break
        if t + 1 == max_steps:
            break
        state = model.reorder_state(state, (base + run_beam).view(-1))
        logits, state = model.step(run_seqs[:, :, t].reshape(N * K, 1), state)
        logits = logits[:, -1, :]

    # a slot never filled (num_return_sequences above the number of possible completions) scores -inf
    seqs, scores = fin_seqs.tolist(), fin_scores.masked_fill(~fin_done, float("-inf")).tolist()
    lens, reasons = fin_len.tolist(), fin_reason.tolist()
    hyps = []
    for n in range(N):
        for r in range(R):
            ids = seqs[n][r][: lens[n][r]]
            ids, text, stopped = _finalize_text(run, ids, None)
            reason = _STOP if stopped else reasons[n][r]
            hyps.append(_Hyp(ids=ids, score=scores[n][r], reason=reason, text=text))
            if run.streamer is not None:
                run.streamer(prompt_ids[n] * R + r, ids)
    return hyps
