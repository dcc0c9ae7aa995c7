"""Text streaming: token ids in, new text out, one row at a time (the one incremental detokenizer).

Used by :func:`lmforge.predict.generate`'s ``text_streamer`` and by the server's event streams."""

from __future__ import annotations

from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


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
