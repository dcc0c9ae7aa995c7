"""Engine output -> OpenAI response shapes: the JSON body of a finished request and the server-sent-event
chunks of a streamed one (``text_completion`` / ``chat.completion`` / ``chat.completion.chunk``).

Only formatting lives here; waiting for the engine, time limits and disconnects are the handler's. Streamed
text goes through :class:`~lmforge.predict.streaming.IncrementalDetokenizer`, the engine's own streamer, so
a multi-byte character split across tokens is never sent half."""

from __future__ import annotations

from typing import Any

from lmforge.predict import GenerationOutput
from lmforge.predict.config import TokenLogprob
from lmforge.predict.streaming import IncrementalDetokenizer
from lmforge.serve.http import sse
from lmforge.serve.prepare import Prepared
from lmforge.serve.protocols import ServedTokenizer

_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
"""The engine's finish reasons -> OpenAI's ``finish_reason``."""

DONE = "data: [DONE]\n\n"
"""The event that ends a successful stream."""


class LogprobFormat:
    """Token log-probabilities in OpenAI's two shapes: ``/v1/completions``' (parallel lists) and chat's
    (``content``: one object per token with its text, bytes and top alternatives)."""

    def __init__(self, tokenizer: ServedTokenizer, token_bytes: list[bytes] | None = None) -> None:
        self.tokenizer = tokenizer
        self.token_bytes = token_bytes

    def text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def bytes_of(self, token_id: int) -> list[int]:
        if self.token_bytes is not None and token_id < len(self.token_bytes) and self.token_bytes[token_id]:
            return list(self.token_bytes[token_id])
        return list(self.text(token_id).encode("utf-8"))

    def completion(self, lps: list[TokenLogprob], top: int, offset: int = 0) -> dict[str, Any]:
        tokens = [self.text(lp.token_id) for lp in lps]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{self.text(i): v for i, v in lp.top[:top]} for lp in lps] if top else None,
            "text_offset": offsets,
        }

    def chat(self, lps: list[TokenLogprob], top: int) -> dict[str, Any]:
        def one(i: int, v: float) -> dict[str, Any]:
            return {"token": self.text(i), "logprob": v, "bytes": self.bytes_of(i)}

        return {
            "content": [
                {**one(lp.token_id, lp.logprob), "top_logprobs": [one(i, v) for i, v in lp.top[:top]]} for lp in lps
            ]
        }

    def shape(self, kind: str, lps: list[TokenLogprob], top: int) -> dict[str, Any]:
        return self.completion(lps, top) if kind == "text" else self.chat(lps, top)


def completion_body(
    prep: Prepared,
    out: GenerationOutput,
    model_name: str,
    logprobs: dict[int, list[TokenLogprob]] | None = None,
    fmt: LogprobFormat | None = None,
) -> dict[str, Any]:
    """The JSON body of a finished (not streamed) request; ``logprobs``: per engine row, when asked."""
    assert out.texts is not None
    choices: list[dict[str, Any]] = []
    R = prep.rows_per_prompt
    for p, texts in enumerate(out.texts):
        for s, text in enumerate(texts):
            reason = _FINISH.get(out.finish_reasons[p][s], "stop")
            lp: dict[str, Any] | None = None
            if prep.logprobs is not None and fmt is not None:
                lp = fmt.shape(prep.kind, (logprobs or {}).get(p * R + s, []), prep.logprobs)
            for idx in prep.choice_indices(p, s):
                if prep.kind == "text":
                    shown = prep.prompt_texts[p] + text if prep.echo else text
                    choices.append({"index": idx, "text": shown, "logprobs": lp, "finish_reason": reason})
                else:
                    choices.append(
                        {
                            "index": idx,
                            "message": {"role": "assistant", "content": text},
                            "logprobs": lp,
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

    def __init__(
        self, prep: Prepared, tokenizer: ServedTokenizer, model_name: str, fmt: LogprobFormat | None = None
    ) -> None:
        self.prep = prep
        self.model_name = model_name
        self.fmt = fmt
        self.offsets: dict[int, int] = {}
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

    def tokens(self, row: int, ids: list[int], logprobs: list[TokenLogprob] | None = None) -> list[str]:
        """New ids of one engine row -> a chunk with its new text (none while a character is incomplete,
        unless it carries the tokens' logprobs)."""
        delta = self.rows[row].add(ids)
        lp: dict[str, Any] | None = None
        if logprobs and self.fmt is not None and self.prep.logprobs is not None:
            if self.prep.kind == "text":
                lp = self.fmt.completion(logprobs, self.prep.logprobs, self.offsets.get(row, 0))
                self.offsets[row] = self.offsets.get(row, 0) + sum(len(t) for t in lp["tokens"])
            else:
                lp = self.fmt.chat(logprobs, self.prep.logprobs)
        if not delta and lp is None:
            return []
        p, s = divmod(row, self.R)
        return [self._chunk([self._choice(i, delta, None, logprobs=lp) for i in self.prep.choice_indices(p, s)])]

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

    def _choice(
        self, idx: int, text: str | None, reason: str | None, role: bool = False, logprobs: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        if self.prep.kind == "text":
            return {"index": idx, "text": text or "", "logprobs": logprobs, "finish_reason": reason}
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        return {"index": idx, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
