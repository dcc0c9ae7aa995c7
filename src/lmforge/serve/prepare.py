"""A validated OpenAI request -> :class:`Prepared`: prompts as token ids plus the engine's
:class:`~lmforge.predict.GenerationConfig`, after the checks that need the model (vocabulary, context) and
the server's limits (tokens, decoding rows).

The schemas (:mod:`lmforge.serve.schemas`) check what a request says on its own; this module checks what it
asks of this model and this server, so every refusal is a 400/404 before any work is queued."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from lmforge.config import LmforgeError
from lmforge.predict import GenerationConfig, GenerationOutput
from lmforge.predict.constrained import CompiledGrammar, ConstraintError, Grammar, GrammarVocabulary
from lmforge.predict.generation_config import with_defaults
from lmforge.predict.processors import (
    LogitBiasProcessor,
    LogitsProcessor,
    PresenceFrequencyPenaltyProcessor,
    TemperatureProcessor,
    TopKProcessor,
    TopPProcessor,
)
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
    processors: list[LogitsProcessor] = field(default_factory=list)
    """This request's own logits processors (penalties, logit_bias, the grammar mask)."""
    logprobs: int | None = None
    """Alternatives per token wanted with the log-probabilities (None: no logprobs)."""
    grammar: CompiledGrammar | None = None
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
        generation_defaults: dict[str, Any] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.options = options
        self.chat = chat
        self.context = context
        self.vocab_size = vocab_size
        self.defaults = dict(generation_defaults or {})
        """The model's ``generation_config.json`` settings: each request's defaults."""
        self._vocabulary: GrammarVocabulary | None = None

    def grammar_vocabulary(self) -> GrammarVocabulary:
        """The vocabulary as the grammar engine sees it (built on the first structured request)."""
        if self._vocabulary is None:
            eos = getattr(self.tokenizer, "eot_id", None)
            if not isinstance(eos, int):
                raise ApiError(
                    400, "Structured output needs a tokenizer with an end-of-text token", param="response_format"
                )
            self._vocabulary = GrammarVocabulary(self.tokenizer, self.vocab_size, eos)
        return self._vocabulary

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
        """The engine config: the model's defaults (``generation_config.json``), then what the request set.
        ``temperature`` > 0 samples; left out, the model's ``do_sample`` decides (else its temperature)."""
        d = self.defaults
        temperature = _filled(req.temperature) if req.given("temperature") else float(d.get("temperature", 1.0))
        if req.given("temperature") or "do_sample" not in d:
            sampling = temperature > 0
        else:
            sampling = bool(d["do_sample"]) and temperature > 0
        n = _filled(req.n)
        beams = _filled(req.num_beams) if req.given("num_beams") else int(d.get("num_beams", 1))
        if beams > 1 and n > beams:
            raise ApiError(
                400, f"Invalid value for 'n': {n} completions need num_beams >= {n} (got {beams})", param="n"
            )
        if beams > 1 and req.logprobs is not None and req.logprobs is not False:
            raise ApiError(400, "'logprobs' is not supported with beam search (num_beams > 1)", param="logprobs")
        copies, returned = (n, 1) if (not sampling and beams == 1) else (1, n)
        top_p = _filled(req.top_p) if req.given("top_p") else d.get("top_p")
        top_k = _filled(req.top_k) if req.given("top_k") else d.get("top_k")
        overrides: dict[str, Any] = {
            "max_new_tokens": max_tokens,
            "do_sample": sampling,
            # greedy settings are normalised so that all greedy requests share one batch key
            "temperature": temperature if sampling else 0.0,
            "top_p": top_p if sampling else 1.0,
            "top_k": (top_k or 0) if sampling else 0,
            "num_beams": beams,
            "num_return_sequences": returned,
            "stop_strings": stops or None,
            "seed": req.seed if sampling else None,
        }
        try:
            cfg = with_defaults(d, overrides)
        except LmforgeError as err:  # GenerationError: settings the engine refuses
            raise ApiError(400, str(err)) from None
        if not cfg.top_k:
            cfg.top_k = None
        return cfg, copies

    def _default_max_tokens(self, fallback: int) -> int:
        value = self.defaults.get("max_new_tokens")
        return int(value) if isinstance(value, int) else fallback

    def _processors(
        self, req: CompletionRequest | ChatCompletionRequest, cfg: GenerationConfig
    ) -> tuple[list[LogitsProcessor], CompiledGrammar | None]:
        """The request's own processors: penalties, ``logit_bias``, the grammar mask, then the sampling
        warpers. The engine runs a config's warpers before extra processors, so when a request has any,
        temperature / top-k / top-p move out of ``cfg`` to the end of the list: penalties and bias then act
        on the raw logits (OpenAI's order), and top-k / top-p choose among the tokens the grammar allows
        (before it, they could leave no allowed token at all)."""
        procs: list[LogitsProcessor] = []
        presence, frequency = _filled(req.presence_penalty), _filled(req.frequency_penalty)
        if presence or frequency:
            procs.append(PresenceFrequencyPenaltyProcessor(presence, frequency))
        if req.logit_bias:
            bias: dict[int, float] = {}
            for key, value in req.logit_bias.items():
                token = int(key) if key.strip().isascii() and key.strip().isdigit() else -1
                if not 0 <= token < self.vocab_size:
                    raise ApiError(
                        400,
                        f"Invalid value for 'logit_bias': key {key!r} is not a token id of this model's vocabulary "
                        f"(0 to {self.vocab_size - 1})",
                        param="logit_bias",
                    )
                bias[token] = value
            procs.append(LogitBiasProcessor(bias))
        grammar = self._grammar(req)
        if grammar is not None:
            procs.append(grammar.processor())
        if procs and cfg.do_sample and cfg.num_beams == 1:
            if cfg.temperature != 1.0:
                procs.append(TemperatureProcessor(cfg.temperature))
            if cfg.top_k:
                procs.append(TopKProcessor(cfg.top_k))
            if cfg.top_p < 1.0:
                procs.append(TopPProcessor(cfg.top_p))
            cfg.temperature, cfg.top_k, cfg.top_p = 1.0, None, 1.0
        return procs, grammar

    def _grammar(self, req: CompletionRequest | ChatCompletionRequest) -> CompiledGrammar | None:
        fmt = req.response_format
        wanted: Grammar | None = None
        if fmt is not None and fmt.type == "json_object":
            wanted = Grammar("json_object")
        elif fmt is not None and fmt.type == "json_schema":
            assert fmt.json_schema is not None
            wanted = Grammar("json_schema", schema=fmt.json_schema.schema_, field="response_format.json_schema.schema")
        if req.guided_choice is not None:
            if wanted is not None:
                raise ApiError(
                    400, "Give one of 'response_format' (JSON) and 'guided_choice', not both", param="guided_choice"
                )
            wanted = Grammar("choice", choices=tuple(req.guided_choice), field="guided_choice")
        if wanted is None:
            return None
        try:
            return self.grammar_vocabulary().compile(wanted)
        except ConstraintError as err:
            raise ApiError(400, str(err), param=wanted.field) from None

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
        if req.logprobs is not None and req.echo:
            raise ApiError(
                400, "'echo' with 'logprobs' is not supported by this server (no prompt logprobs)", param="echo"
            )
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
        max_tokens = self._max_tokens(
            req.max_tokens if req.given("max_tokens") else None,
            prompts,
            "max_tokens",
            self._default_max_tokens(COMPLETIONS_DEFAULT_MAX_TOKENS),
        )
        stops = [check_text(t, "stop") for t in ([req.stop] if isinstance(req.stop, str) else req.stop or [])]
        cfg, copies = self._config(req, max_tokens, stops)
        self._check_rows(len(prompts), cfg, _filled(req.n))
        procs, grammar = self._processors(req, cfg)
        return Prepared(
            processors=procs,
            grammar=grammar,
            logprobs=req.logprobs,
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
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
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
        max_tokens = self._max_tokens(
            requested, [ids], param, self._default_max_tokens(self.options.default_chat_max_tokens)
        )
        user_stops = [check_text(t, "stop") for t in ([req.stop] if isinstance(req.stop, str) else req.stop or [])]
        stops = user_stops + [s for s in self.chat.stop if s not in user_stops]
        cfg, copies = self._config(req, max_tokens, stops)
        self._check_rows(1, cfg, _filled(req.n))
        procs, grammar = self._processors(req, cfg)
        return Prepared(
            processors=procs,
            grammar=grammar,
            logprobs=(req.top_logprobs or 0) if req.logprobs else None,
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
