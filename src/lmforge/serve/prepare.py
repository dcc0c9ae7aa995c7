"""A validated OpenAI request -> :class:`Prepared`: prompts as token ids plus the engine's
:class:`~lmforge.predict.GenerationConfig`, after the checks that need the model (vocabulary, context) and
the server's limits (tokens, decoding rows).

The schemas (:mod:`lmforge.serve.schemas`) check what a request says on its own; this module checks what it
asks of this model and this server, so every refusal is a 400/404 before any work is queued."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import TypeVar, cast

from lmforge.config import LmforgeError
from lmforge.predict import GenerationConfig, GenerationOutput
from lmforge.serve.chat_template import ChatTemplate
from lmforge.serve.options import ServeOptions
from lmforge.serve.protocols import ServedTokenizer
from lmforge.serve.schemas import (
    ApiError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from lmforge.serve.validation import check_text

COMPLETIONS_DEFAULT_MAX_TOKENS = 16
"""OpenAI's default ``max_tokens`` of ``/v1/completions``."""

T = TypeVar("T")


def _filled(value: T | None) -> T:
    """A request field that may be sent as null: the schema's validator has put its default in by now."""
    assert value is not None
    return value


@dataclass
class Prepared:
    """A validated request, ready for the batcher."""

    kind: str
    """``text`` (completions) or ``chat``."""
    prompts: list[list[int]]
    prompt_texts: list[str]
    config: GenerationConfig
    n: int
    copies: int
    """Greedy decoding with ``n`` > 1 runs one row per prompt and repeats it ``copies`` times."""
    stream: bool
    include_usage: bool = False
    echo: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def rows_per_prompt(self) -> int:
        return self.config.num_return_sequences

    def choice_indices(self, prompt: int, seq: int) -> range:
        first = (prompt * self.rows_per_prompt + seq) * self.copies
        return range(first, first + self.copies)

    def usage(self, out: GenerationOutput) -> dict[str, int]:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(s) for seqs in out.sequences for s in seqs) * self.copies
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class RequestPreparer:
    """Checks requests against one model and one server's options and prepares them for the batcher.

    ``context``: the model's longest sequence (None: unbounded); ``vocab_size``: token ids a prompt may use."""

    def __init__(
        self,
        tokenizer: ServedTokenizer,
        options: ServeOptions,
        chat: ChatTemplate,
        *,
        context: int | None,
        vocab_size: int,
    ) -> None:
        self.tokenizer = tokenizer
        self.options = options
        self.chat = chat
        self.context = context
        self.vocab_size = vocab_size

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.options.model_name:
            raise ApiError(
                404,
                f"The model '{name}' does not exist; this server serves '{self.options.model_name}'",
                param="model",
                code="model_not_found",
            )

    def _check_ids(self, ids: list[int], where: str) -> None:
        bad = next((t for t in ids if t >= self.vocab_size), None)
        if bad is not None:
            raise ApiError(
                400,
                f"{where} has token id {bad}, outside the model's vocabulary of {self.vocab_size} ids",
                param="prompt",
            )

    def _max_tokens(self, requested: int | None, prompts: list[list[int]], param: str, default: int) -> int:
        limit = self.options.max_tokens_limit
        longest = max(len(p) for p in prompts)
        if requested is None:
            n = min(default, limit)
            if self.context is not None:
                room = self.context - longest
                if room < 1:
                    raise ApiError(
                        400,
                        f"This model's maximum context length is {self.context} tokens, but the "
                        f"prompt has {longest} tokens, which leaves no room for a reply",
                        param="messages" if param != "max_tokens" else "prompt",
                        code="context_length_exceeded",
                    )
                n = min(n, room)
            return n
        if requested > limit:
            raise ApiError(
                400,
                f"Invalid value for '{param}': {requested} exceeds this server's limit of {limit} "
                "tokens (--max-tokens-limit)",
                param=param,
            )
        if self.context is not None and longest + requested > self.context:
            raise ApiError(
                400,
                f"This model's maximum context length is {self.context} tokens, but the prompt has "
                f"{longest} tokens and {param} is {requested} ({longest + requested} in total); shorten "
                f"the prompt or lower {param}",
                param=param,
                code="context_length_exceeded",
            )
        return requested

    def _config(
        self, req: CompletionRequest | ChatCompletionRequest, max_tokens: int, stops: list[str]
    ) -> tuple[GenerationConfig, int]:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name) != 0:
                raise ApiError(400, f"'{name}' is not supported by this server (only 0)", param=name)
        if req.logit_bias:
            raise ApiError(400, "'logit_bias' is not supported by this server", param="logit_bias")
        temperature = _filled(req.temperature)
        sampling = temperature > 0
        n, beams = _filled(req.n), _filled(req.num_beams)
        if beams > 1 and n > beams:
            raise ApiError(
                400, f"Invalid value for 'n': {n} completions need num_beams >= {n} (got {beams})", param="n"
            )
        copies, returned = (n, 1) if (not sampling and beams == 1) else (1, n)
        try:
            cfg = GenerationConfig(
                max_new_tokens=max_tokens,
                do_sample=sampling,
                # greedy settings are normalised so that all greedy requests share one batch key
                temperature=temperature if sampling else 0.0,
                top_p=_filled(req.top_p) if sampling else 1.0,
                top_k=(req.top_k or None) if sampling else None,
                num_beams=beams,
                num_return_sequences=returned,
                stop_strings=stops or None,
                seed=req.seed if sampling else None,
            )
        except LmforgeError as err:  # GenerationError: settings the engine refuses
            raise ApiError(400, str(err)) from None
        return cfg, copies

    def _check_rows(self, n_prompts: int, cfg: GenerationConfig, n: int) -> None:
        rows = n_prompts * max(cfg.num_return_sequences, cfg.num_beams)
        if rows > self.options.max_batch_rows:
            raise ApiError(
                400,
                f"The request needs {rows} decoding rows (prompts x max(n, num_beams)), more than "
                f"this server's limit of {self.options.max_batch_rows} (--max-batch-rows)",
                param="n" if n > 1 else "prompt",
            )

    def prepare_completion(self, req: CompletionRequest) -> Prepared:
        self.check_model(req.model)
        if req.logprobs is not None:
            raise ApiError(400, "'logprobs' is not supported by this server", param="logprobs")
        if req.suffix is not None:
            raise ApiError(400, "'suffix' is not supported by this server", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise ApiError(400, "'best_of' is not supported by this server (only equal to n)", param="best_of")
        p = req.prompt
        texts: list[str] | None
        prompts: list[list[int]] | None
        if isinstance(p, str):
            texts, prompts = [p], None
        elif p and all(isinstance(x, int) for x in p):
            texts, prompts = None, [cast(list[int], list(p))]
        elif p and all(isinstance(x, list) for x in p):
            texts, prompts = None, [list(x) for x in cast(list[list[int]], p)]
        else:
            texts, prompts = cast(list[str], list(p)), None
        if not p:
            raise ApiError(400, "Invalid value for 'prompt': the prompt is empty", param="prompt")
        if texts is not None:
            prompts = []
            for i, t in enumerate(texts):
                where = "prompt" if isinstance(p, str) else f"prompt[{i}]"
                if not t:
                    raise ApiError(400, f"Invalid value for '{where}': the prompt is empty", param="prompt")
                prompts.append(self.tokenizer.encode(check_text(t, "prompt")))
        else:
            assert prompts is not None  # token-id prompts: no texts yet
            texts = []
            for i, ids in enumerate(prompts):
                where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
                if not ids:
                    raise ApiError(400, f"Invalid value for '{where}': the prompt is empty", param="prompt")
                self._check_ids(ids, where)
                texts.append(self.tokenizer.decode(ids))
        assert prompts is not None
        for i, ids in enumerate(prompts):
            if not ids:  # a text that encodes to no tokens
                raise ApiError(400, f"Invalid value for 'prompt': prompt {i} encodes to no tokens", param="prompt")
        max_tokens = self._max_tokens(req.max_tokens, prompts, "max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS)
        stops = [check_text(t, "stop") for t in ([req.stop] if isinstance(req.stop, str) else req.stop or [])]
        cfg, copies = self._config(req, max_tokens, stops)
        self._check_rows(len(prompts), cfg, _filled(req.n))
        return Prepared(
            kind="text",
            prompts=prompts,
            prompt_texts=texts,
            config=cfg,
            n=_filled(req.n),
            copies=copies,
            stream=_filled(req.stream),
            echo=_filled(req.echo),
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
        )

    async def prepare_chat(self, req: ChatCompletionRequest) -> Prepared:
        self.check_model(req.model)
        if req.logprobs or req.top_logprobs:
            raise ApiError(400, "'logprobs' is not supported by this server", param="logprobs")
        if (
            req.max_tokens is not None
            and req.max_completion_tokens is not None
            and req.max_tokens != req.max_completion_tokens
        ):
            raise ApiError(
                400, "Give one of 'max_tokens' and 'max_completion_tokens' (they differ)", param="max_completion_tokens"
            )
        messages = self._messages(req.messages)
        if not any(m["content"] for m in messages):
            raise ApiError(400, "Invalid value for 'messages': every message is empty", param="messages")
        text = await self.chat.render(messages)
        ids = self.tokenizer.encode(text)
        if not ids:
            raise ApiError(
                400, "Invalid value for 'messages': the rendered prompt encodes to no tokens", param="messages"
            )
        requested, param = (
            (req.max_completion_tokens, "max_completion_tokens")
            if req.max_completion_tokens is not None
            else (req.max_tokens, "max_tokens")
        )
        max_tokens = self._max_tokens(requested, [ids], param, self.options.default_chat_max_tokens)
        user_stops = [check_text(t, "stop") for t in ([req.stop] if isinstance(req.stop, str) else req.stop or [])]
        stops = user_stops + [s for s in self.chat.stop if s not in user_stops]
        cfg, copies = self._config(req, max_tokens, stops)
        self._check_rows(1, cfg, _filled(req.n))
        return Prepared(
            kind="chat",
            prompts=[ids],
            prompt_texts=[text],
            config=cfg,
            n=_filled(req.n),
            copies=copies,
            stream=_filled(req.stream),
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
        )

    @staticmethod
    def _messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
        return [
            {"role": m.role, "content": check_text(m.text(), f"messages.{i}.content")} for i, m in enumerate(messages)
        ]

    async def tokenize(self, req: TokenizeRequest) -> list[int]:
        """``/tokenize``: the ids the model would see (a chat prompt as its template renders it)."""
        self.check_model(req.model)
        if req.messages is not None:
            return self.tokenizer.encode(await self.chat.render(self._messages(req.messages)))
        return self.tokenizer.encode(check_text(_filled(req.prompt), "prompt"))

    def detokenize(self, req: DetokenizeRequest) -> str:
        """``/detokenize``: ids (checked against the vocabulary) -> text."""
        self.check_model(req.model)
        bad = next((t for t in req.tokens if t >= self.vocab_size), None)
        if bad is not None:
            raise ApiError(
                400,
                f"'tokens' has token id {bad}, outside the model's vocabulary of {self.vocab_size} ids",
                param="tokens",
            )
        return self.tokenizer.decode(req.tokens)
