"""The text side of generation: token ids in, text out, one row at a time.

- :class:`Decoder` / :class:`GenerationTokenizer`: what the engine needs from a tokenizer;
- :class:`IncrementalDetokenizer`: the one incremental detokenizer (predict's text streamer, the CLI's
  printer and the server's event streams all use it);
- stop strings: :func:`find_stop`, :func:`held_back` (text that may begin a stop string and so cannot be
  streamed yet), :func:`ids_before`, :func:`finalize_text`, and :class:`RowText`, which follows each row's
  completion while decoding;
- :class:`TextStreamAdapter`: turns the engine's id streaming into text streaming (``generate_text``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

Streamer = Callable[[int, list[int]], None]
"""``streamer(row, new_token_ids)``; ``row = prompt_index * num_return_sequences + sequence_index``."""

TextStreamer = Callable[[int, str], None]
"""``streamer(row, new_text)`` for :func:`lmforge.predict.generate_text`."""


class Decoder(Protocol):
    """Token ids -> text (all that streaming and stop strings need)."""

    def decode(self, ids: list[int]) -> str: ...


class GenerationTokenizer(Decoder, Protocol):
    """What the engine needs from a tokenizer. Optional, looked up with ``getattr``: the end-of-text id
    (``eot_id``, ``eot_token_id``, ``eos_id`` or ``eos_token_id``), the default end of sequence."""

    def encode(self, text: str) -> Any:
        """Text -> a list of ids, or an object whose ``.ids`` is one (a ``tokenizers`` Encoding)."""
        ...


class IncrementalDetokenizer:
    """Streams one row as text: decodes its ids so far and returns the new text, holding back a trailing
    partial character (U+FFFD, the start of a multi-byte character split across tokens) until it
    completes; :meth:`finish` settles the rest against the final text (which may be cut at a stop string)."""

    def __init__(self, tokenizer: Decoder) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""

    def add(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        return self._advance(self.tokenizer.decode(self.ids).rstrip("\ufffd"))

    def finish(self, final: str) -> str:
        return self._advance(final)

    def _advance(self, text: str) -> str:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            delta, self.sent = text[len(self.sent) :], text
            return delta
        return ""


# ------------------------------------------------------------------------------------- stop strings
def find_stop(text: str, stops: list[str], start: int = 0) -> int:
    """Position of the earliest stop string in ``text[start:]`` (-1: none)."""
    found = [p for p in (text.find(s, start) for s in stops) if p >= 0]
    return min(found) if found else -1


def held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of ``text`` that could be the start of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def ids_before(tokenizer: Decoder, ids: list[int], pos: int, text: str) -> int:
    """Number of leading tokens whose decoded text lies wholly within ``text[:pos]``."""
    for j in range(len(ids), -1, -1):
        d = tokenizer.decode(ids[:j]) if j else ""
        if len(d) <= pos and text.startswith(d):
            return j
    return 0


def finalize_text(
    tokenizer: Decoder | None, stops: list[str], ids: list[int], text: str | None
) -> tuple[list[int], str | None, bool]:
    """Decode (when a tokenizer is given) and cut at the first stop string -> (ids, text or None, stopped)."""
    if tokenizer is None:
        return ids, None, False
    if text is None:
        text = tokenizer.decode(ids)
    if stops:
        pos = find_stop(text, stops)
        if pos >= 0:
            return ids[: ids_before(tokenizer, ids, pos, text)], text[:pos], True
    return ids, text, False


class RowText:
    """Python-side mirror of the rows' completions, kept only when streaming or watching stop strings:
    ids, decoded text, stop-string detection and the streaming hold-back.

    ``tokenizer`` is needed only with ``stops`` (the engine refuses stop strings without one)."""

    def __init__(
        self, tokenizer: Decoder | None, stops: list[str], streamer: Streamer | None, stream_rows: list[int]
    ) -> None:
        n = len(stream_rows)
        self.tokenizer = tokenizer
        self.stops = stops
        self.streamer = streamer
        self.stream_rows = stream_rows
        self.ids: list[list[int]] = [[] for _ in range(n)]
        self.text = [""] * n
        self.offsets: list[list[int]] = [[0] for _ in range(n)]  # offsets[r][j] = len(decode(ids[:j]))
        self.sent = [0] * n
        self.cut: list[tuple[int, str] | None] = [None] * n
        self.max_stop = max((len(s) for s in stops), default=0)

    def add(self, r: int, tok: int) -> bool:
        """Append a (non-eos) token to row ``r``; True when it completes a stop string."""
        ids = self.ids[r]
        ids.append(tok)
        if not self.stops:
            if self.streamer is not None:
                self.streamer(self.stream_rows[r], [tok])
                self.sent[r] = len(ids)
            return False
        tokenizer = self.tokenizer
        assert tokenizer is not None  # stop strings come with a tokenizer (checked by generate)
        prev = len(self.text[r])
        text = tokenizer.decode(ids)
        self.text[r] = text
        offs = self.offsets[r]
        offs.append(len(text))
        # a few extra characters: a partial UTF-8 character at the end may have decoded differently before
        pos = find_stop(text, self.stops, max(0, min(prev, len(text)) - self.max_stop - 4))
        if pos >= 0:
            j = max(ids_before(tokenizer, ids, pos, text), self.sent[r])
            self.cut[r] = (j, text[:pos])
            self._emit(r, j)
            return True
        if self.streamer is not None:
            safe = len(text) - held_back(text, self.stops)
            j = self.sent[r]
            while j < len(ids) and offs[j + 1] <= safe:
                j += 1
            self._emit(r, j)
        return False

    def finish(self, r: int) -> None:
        """Row ``r`` ended without a stop string: stream whatever was held back."""
        self._emit(r, len(self.ids[r]))

    def _emit(self, r: int, j: int) -> None:
        if self.streamer is not None and j > self.sent[r]:
            self.streamer(self.stream_rows[r], self.ids[r][self.sent[r] : j])
        self.sent[r] = max(self.sent[r], j)

    def result(self, r: int) -> tuple[list[int], str | None, bool]:
        """(ids, text or None, stopped)."""
        cut = self.cut[r]
        if cut is not None:
            j, text = cut
            return self.ids[r][:j], text, True
        return self.ids[r], (self.text[r] if self.stops else None), False


# ---------------------------------------------------------------------------------- text streaming
class TextStreamAdapter:
    """Turns id streaming into text streaming, one :class:`IncrementalDetokenizer` per row."""

    def __init__(self, tokenizer: Decoder, callback: TextStreamer) -> None:
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
