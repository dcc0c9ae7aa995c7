"""Engine output -> OpenAI response shapes: the JSON body of a finished request and the server-sent-event
chunks of a streamed one (``text_completion`` / ``chat.completion`` / ``chat.completion.chunk``).

Only formatting lives here; waiting for the engine, time limits and disconnects are the handler's. Streamed
text goes through :class:`~lmforge.predict.streaming.IncrementalDetokenizer`, the engine's own streamer, so
a multi-byte character split across tokens is never sent half."""

from __future__ import annotations

from typing import Any

from lmforge.predict import GenerationOutput
from lmforge.predict.streaming import IncrementalDetokenizer
from lmforge.serve.http import sse
from lmforge.serve.prepare import Prepared
from lmforge.serve.protocols import ServedTokenizer

_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
"""The engine's finish reasons -> OpenAI's ``finish_reason``."""

DONE = "data: [DONE]\n\n"
"""The event that ends a successful stream."""


def completion_body(prep: Prepared, out: GenerationOutput, model_name: str) -> dict[str, Any]:
    """The JSON body of a finished (not streamed) request."""
    assert out.texts is not None
    choices: list[dict[str, Any]] = []
    for p, texts in enumerate(out.texts):
        for s, text in enumerate(texts):
            reason = _FINISH.get(out.finish_reasons[p][s], "stop")
            for idx in prep.choice_indices(p, s):
                if prep.kind == "text":
                    shown = prep.prompt_texts[p] + text if prep.echo else text
                    choices.append({"index": idx, "text": shown, "logprobs": None, "finish_reason": reason})
                else:
                    choices.append(
                        {
                            "index": idx,
                            "message": {"role": "assistant", "content": text},
                            "logprobs": None,
                            "finish_reason": reason,
                        }
                    )
    choices.sort(key=lambda c: c["index"])
    kind = "text_completion" if prep.kind == "text" else "chat.completion"
    prefix = "cmpl-" if prep.kind == "text" else "chatcmpl-"
    return {
        "id": prefix + prep.id,
        "object": kind,
        "created": prep.created,
        "model": model_name,
        "choices": choices,
        "usage": prep.usage(out),
    }


class ChunkStream:
    """The SSE chunks of one streamed request, built from the engine's events as they come: one
    incremental detokenizer per engine row, and each row's text repeated over its ``copies`` choices."""

    def __init__(self, prep: Prepared, tokenizer: ServedTokenizer, model_name: str) -> None:
        self.prep = prep
        self.model_name = model_name
        self.R = prep.rows_per_prompt
        self.rows = [IncrementalDetokenizer(tokenizer) for _ in range(len(prep.prompts) * self.R)]

    def opening(self) -> list[str]:
        """The opening chunk: the assistant role (chat) or the echoed prompt (completions); none otherwise."""
        prep, R = self.prep, self.R
        if prep.kind == "chat":
            return [
                self._chunk(
                    [
                        self._choice(i, "", None, role=True)
                        for r in range(len(self.rows))
                        for i in prep.choice_indices(r // R, r % R)
                    ],
                )
            ]
        if prep.echo:
            return [
                self._chunk(
                    [
                        self._choice(i, prep.prompt_texts[r // R], None)
                        for r in range(len(self.rows))
                        for i in prep.choice_indices(r // R, r % R)
                    ],
                )
            ]
        return []

    def tokens(self, row: int, ids: list[int]) -> list[str]:
        """New ids of one engine row -> a chunk with its new text (none while a character is incomplete)."""
        delta = self.rows[row].add(ids)
        if not delta:
            return []
        p, s = divmod(row, self.R)
        return [self._chunk([self._choice(i, delta, None) for i in self.prep.choice_indices(p, s)])]

    def done(self, out: GenerationOutput) -> list[str]:
        """The closing chunks: each row's rest of text with its finish reason, the usage if asked, [DONE]."""
        prep = self.prep
        assert out.texts is not None
        chunks = []
        for p, texts in enumerate(out.texts):
            for s, final in enumerate(texts):
                rest = self.rows[p * self.R + s].finish(final)
                reason = _FINISH.get(out.finish_reasons[p][s], "stop")
                chunks.append(
                    self._chunk(
                        [
                            self._choice(i, rest if rest or prep.kind == "text" else None, reason)
                            for i in prep.choice_indices(p, s)
                        ],
                    )
                )
        if prep.include_usage:
            chunks.append(self._chunk([], usage=prep.usage(out)))
        chunks.append(DONE)
        return chunks

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        text = self.prep.kind == "text"
        obj: dict[str, Any] = {
            "id": ("cmpl-" if text else "chatcmpl-") + self.prep.id,
            "object": "text_completion" if text else "chat.completion.chunk",
            "created": self.prep.created,
            "model": self.model_name,
            "choices": choices,
        }
        if usage is not None:
            obj["usage"] = usage
        return sse(obj)

    def _choice(self, idx: int, text: str | None, reason: str | None, role: bool = False) -> dict[str, Any]:
        if self.prep.kind == "text":
            return {"index": idx, "text": text or "", "logprobs": None, "finish_reason": reason}
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        return {"index": idx, "delta": delta, "logprobs": None, "finish_reason": reason}
