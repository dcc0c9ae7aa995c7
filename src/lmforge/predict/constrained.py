"""Constrained decoding: a logits processor that masks every token that would break a grammar (a JSON
schema, any JSON object, or one of a fixed list of strings), so each completion is valid by construction.

The grammar engine is llguidance (chosen over xgrammar, outlines-core and lm-format-enforcer in
``benchmarks/constrained_masks.py``: compiles a schema in milliseconds, where outlines-core builds a
whole-vocabulary automaton first, computes a mask in tens of microseconds, and handles any JSON, where
outlines-core needs a regular language). It works on BYTES: the crux is :func:`token_bytes`, which
gives the bytes each lmforge token id stands for, for every tokenizer kind:

- ``byte`` / ``bpe`` / GPT-2-style ``hf`` (ByteLevel decoder): the token string mapped back through
  GPT-2's byte-to-unicode table;
- ``char`` (WordLevel + Fuse): the character's UTF-8;
- SentencePiece-style ``hf`` (Metaspace / Replace decoders, ByteFallback ``<0xNN>`` tokens): ``▁`` is a
  space, ``<0xNN>`` the byte;
- special tokens, ``<unk>`` and ids past the tokenizer (a model's padded vocabulary): no bytes, so never
  allowed; the end-of-text id ends a completion once the grammar accepts.

The processor keeps one matcher per distinct row so far (rows are identified by their tokens, not their
position), so it works in any batch layout: the engine's (finished rows dropped) or a scheduler's that
calls it once per row.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import llguidance
import llguidance.torch as lltorch
import torch

from lmforge.config import LmforgeError
from lmforge.data.tokenizer import bytes_to_unicode
from lmforge.predict.processors import RowStates

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class ConstraintError(LmforgeError, ValueError):
    """A grammar (JSON schema, choices) that cannot be compiled; the message names the field."""


class ConstrainedTokenizer(Protocol):
    """What constrained decoding needs of a tokenizer: decoding (the fallback mapping); lmforge's
    :class:`~lmforge.data.tokenizer.Tokenizer` also has ``backend`` (a ``tokenizers.Tokenizer``) and
    ``eot_id``, read with getattr."""

    def decode(self, ids: list[int]) -> str: ...


def _decoders(spec: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not spec:
        return []
    if spec.get("type") == "Sequence":
        return [d for sub in spec.get("decoders", []) for d in _decoders(sub)]
    return [spec]


def token_bytes(tokenizer: ConstrainedTokenizer, vocab_size: int) -> tuple[list[bytes], list[int]]:
    """Per token id below ``vocab_size``: the bytes it adds to the text (b"" for special tokens and ids
    the tokenizer does not have), and the ids of special tokens."""
    backend = getattr(tokenizer, "backend", None)
    if backend is None:
        return _decoded_bytes(tokenizer, vocab_size)
    spec = json.loads(backend.to_str())
    decoders = _decoders(spec.get("decoder"))
    kinds = {d.get("type") for d in decoders}
    byte_level = "ByteLevel" in kinds or (spec.get("pre_tokenizer") or {}).get("type") == "ByteLevel"
    replaces: list[tuple[str, str]] = []
    for d in decoders:
        if d.get("type") == "Metaspace":
            replaces.append((d.get("replacement", "▁"), " "))
        elif d.get("type") == "Replace" and isinstance(d.get("pattern", {}).get("String"), str):
            replaces.append((d["pattern"]["String"], d.get("content", "")))
    added = backend.get_added_tokens_decoder()
    special = sorted(i for i, t in added.items() if t.special and i < vocab_size)
    unk = (spec.get("model") or {}).get("unk_token")
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    out: list[bytes] = []
    for i in range(vocab_size):
        tok = backend.id_to_token(i)
        if tok is None or i in added and added[i].special or tok == unk:
            out.append(b"")
        elif i in added:  # a non-special added token reads as itself
            out.append(added[i].content.encode("utf-8"))
        elif byte_level and all(c in to_byte for c in tok):
            out.append(bytes(to_byte[c] for c in tok))
        elif "ByteFallback" in kinds and (m := _BYTE_FALLBACK.fullmatch(tok)):
            out.append(bytes([int(m.group(1), 16)]))
        else:
            for old, new in replaces:
                tok = tok.replace(old, new)
            out.append(tok.encode("utf-8"))
    return out, special


def _decoded_bytes(tokenizer: ConstrainedTokenizer, vocab_size: int) -> tuple[list[bytes], list[int]]:
    """A tokenizer without a ``tokenizers`` backend: each id's own decoding (exact for tokens that are whole
    characters, which is what such tokenizers have; an id that fails to decode gets no bytes)."""
    out = []
    for i in range(vocab_size):
        try:
            text = tokenizer.decode([i])
        except Exception:  # an id the tokenizer does not know
            text = ""
        out.append(text.encode("utf-8") if "\ufffd" not in text else b"")
    eot = getattr(tokenizer, "eot_id", None)
    return out, [eot] if isinstance(eot, int) and eot < vocab_size else []


class TokenizerBytes:
    """The tokenizer llguidance sees (``llguidance.TokenizerWrapper``'s fields): bytes per id, eos, and a
    greedy longest-match encoder (llguidance only uses it to tokenize grammar-forced text)."""

    def __init__(self, tokens: list[bytes], eos: int, special: list[int]) -> None:
        self.tokens = tokens
        self.eos_token_id = eos
        self.bos_token_id = None
        self.special_token_ids = special
        self._by_bytes = {t: i for i, t in enumerate(tokens) if t}
        self._longest = max((len(t) for t in tokens), default=1)

    def __call__(self, data: bytes) -> list[int]:
        ids, at = [], 0
        while at < len(data):
            for n in range(min(self._longest, len(data) - at), 0, -1):
                i = self._by_bytes.get(data[at : at + n])
                if i is not None:
                    ids.append(i)
                    at += n
                    break
            else:
                at += 1  # a byte no token spells: skipped
        return ids


class GrammarVocabulary:
    """A tokenizer's vocabulary in llguidance's form (built once per server: ~vocabulary-size work)."""

    def __init__(self, tokenizer: ConstrainedTokenizer, vocab_size: int, eos_token_id: int) -> None:
        tokens, special = token_bytes(tokenizer, vocab_size)
        if eos_token_id >= vocab_size:
            raise ConstraintError(f"eos_token_id {eos_token_id} is outside the vocabulary of {vocab_size}")
        self.vocab_size = vocab_size
        self.tokens = tokens
        self.eos_token_id = eos_token_id
        wrapper = TokenizerBytes(tokens, eos_token_id, sorted(set(special) | {eos_token_id}))
        self.ll = llguidance.LLTokenizer(llguidance.TokenizerWrapper(wrapper), n_vocab=vocab_size)

    def compile(self, grammar: Grammar) -> CompiledGrammar:
        """Check and compile ``grammar`` (a :class:`ConstraintError` naming the request field if it fails)."""
        text = grammar.llguidance()
        matcher = llguidance.LLMatcher(self.ll, text, log_level=0)
        if matcher.is_error():
            raise ConstraintError(f"Invalid value for '{grammar.field}': {matcher.get_error()}")
        return CompiledGrammar(self, text, matcher)


@dataclass(frozen=True)
class Grammar:
    """What a completion must be: ``kind`` ``json_schema`` (``schema``), ``json_object`` (any JSON object)
    or ``choice`` (exactly one of ``choices``); ``field`` names the request field it came from."""

    kind: str
    schema: dict[str, Any] | None = None
    choices: tuple[str, ...] = ()
    field: str = "response_format"

    def llguidance(self) -> str:
        if self.kind == "json_schema":
            return _json_grammar(self.schema if self.schema is not None else {}, self.field)
        if self.kind == "json_object":
            return _json_grammar({"type": "object"}, self.field)
        if self.kind == "choice":
            if not self.choices or any(not c for c in self.choices):
                raise ConstraintError(f"Invalid value for '{self.field}': give at least one non-empty string")
            alternatives = " | ".join(json.dumps(c) for c in self.choices)
            return llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}")
        raise ConstraintError(f"Invalid value for '{self.field}': unknown grammar kind {self.kind!r}")


def _json_grammar(schema: dict[str, Any], field: str) -> str:
    try:
        # whitespace is kept to what a JSON parser needs: an untrained model would otherwise fill its token
        # budget with spaces and newlines between the tokens
        return llguidance.LLMatcher.grammar_from_json_schema(
            schema, overrides={"whitespace_flexible": False, "coerce_one_of": True}
        )
    except ValueError as err:
        raise ConstraintError(f"Invalid value for '{field}': {err}") from None


class CompiledGrammar:
    """A compiled grammar and its start matcher; :meth:`processor` gives a fresh logits processor."""

    def __init__(self, vocabulary: GrammarVocabulary, text: str, start: llguidance.LLMatcher) -> None:
        self.vocabulary = vocabulary
        self.text = text
        self.start = start

    def processor(self) -> ConstrainedProcessor:
        return ConstrainedProcessor(self)

    def accepts(self, ids: Sequence[int]) -> bool:
        """Whether ``ids`` (a whole completion, without the end-of-text id) is a complete match."""
        m = self.start.deep_copy()
        return all(m.consume_token(int(t)) for t in ids) and m.is_accepting()


class ConstrainedProcessor:
    """``(input_ids (B, T), scores (B, V)) -> scores`` with every token the grammar forbids at ``-inf``.

    Each row's matcher is found by the row's tokens (:class:`~lmforge.predict.processors.RowStates`): a
    row first seen is a prompt and starts the grammar; later rows advance a copy of their parent's matcher
    by their last token. So rows may be dropped, reordered or passed one at a time. A row with nothing
    valid left (a token forced past the mask, a choice the vocabulary cannot spell) may only end."""

    def __init__(self, grammar: CompiledGrammar) -> None:
        self.grammar = grammar
        self.rows: RowStates[llguidance.LLMatcher] = RowStates(self._start, self._advance)

    def _start(self, prompt: tuple[int, ...]) -> llguidance.LLMatcher:
        return self.grammar.start.deep_copy()

    @staticmethod
    def _advance(parent: llguidance.LLMatcher, token: int) -> llguidance.LLMatcher:
        m = parent.deep_copy()
        m.consume_token(token)
        return m

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        B = input_ids.size(0)
        V = self.grammar.vocabulary.vocab_size
        mask = lltorch.allocate_token_bitmask(B, V)
        eos = self.grammar.vocabulary.eos_token_id
        for b, (_, m) in enumerate(self.rows(input_ids)):
            if not m.is_error():
                lltorch.fill_next_token_bitmask(m, mask, b)
            if m.is_error() or not bool(mask[b].any()):
                mask[b].zero_()
                mask[b, eos // 32] = 1 << (eos % 32) if eos % 32 < 31 else -(1 << 31)
        allowed = _unpack(mask, scores.size(-1))
        return scores.masked_fill(~allowed.to(scores.device), float("-inf"))


def _unpack(mask: torch.Tensor, width: int) -> torch.Tensor:
    """(B, ceil(V / 32)) int32 bitmask -> (B, width) bool (ids at or past the mask's vocabulary: False)."""
    bits = torch.arange(32, dtype=torch.int32)
    allowed = ((mask[:, :, None] >> bits) & 1).bool().reshape(mask.size(0), -1)  # (B, 32 * words)
    if allowed.size(1) >= width:
        return allowed[:, :width]
    return torch.cat([allowed, allowed.new_zeros(mask.size(0), width - allowed.size(1))], dim=1)
