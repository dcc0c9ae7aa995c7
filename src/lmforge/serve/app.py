"""The OpenAI-compatible HTTP app (FastAPI; layer 6).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both streamed as server-sent events
with ``"stream": true``), ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``, ``GET /`` (the
playground page) and FastAPI's ``/openapi.json`` and ``/docs``.

Request path: validate (:mod:`lmforge.serve.schemas`, then the checks that need the model: vocabulary,
context, server limits) -> take a concurrency slot (429 when all are taken) -> a :class:`~lmforge.serve.
batcher.Job` for the batcher -> wait for its events under the request's time limit (504 after it) ->
a JSON body or an event stream. The slot is freed when the response ends, the time limit passes or the
client disconnects; the job is then cancelled, which stops the engine once nothing else needs the batch.

Decoding parameters: ``temperature`` 0 is greedy (``n`` > 1 then repeats the one greedy completion), above
0 samples with ``top_p`` / ``top_k``; ``num_beams`` > 1 is beam search (beam sampling when ``temperature``
> 0); ``stop`` and the end-of-text token end a completion (``finish_reason`` ``"stop"``), the token budget
``max_tokens`` ends it with ``"length"``.

Chat prompts are rendered with the model's chat template when its directory has one (``chat_template.jinja``
or ``chat_template`` in ``tokenizer_config.json``, a Jinja template as in Hugging Face), otherwise with the
plain template (see :data:`PLAIN_CHAT_HELP`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmforge import __version__
from lmforge.config import LmforgeError
from lmforge.predict import GenerationConfig, GenerationError, GenerationOutput
from lmforge.predict.streaming import IncrementalDetokenizer
from lmforge.serve.batcher import Batcher, DoneEvent, ErrorEvent, Job, TokenEvent
from lmforge.serve.schemas import (
    ApiError,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    error_body,
)

log = logging.getLogger("lmforge.serve")

PLAIN_CHAT_HELP = """\
The plain chat template: each message as "<|ROLE|>\\nCONTENT\\n" (ROLE: system, user or assistant;
"developer" is shown as system), then "<|assistant|>\\n" for the reply. The reply also stops at
"\\n<|user|>" and "\\n<|system|>" (the start of a next turn)."""
PLAIN_CHAT_STOP = ["\n<|user|>", "\n<|system|>"]
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
"""OpenAI's default ``max_tokens`` of ``/v1/completions``."""
_POLL_S = 0.25
"""While no event arrives, check this often whether the client has gone."""


@dataclass
class ServeOptions:
    """Limits and settings of a server (the ``lmforge serve`` flags)."""

    model_name: str = "lmforge"
    """The model id clients send as ``model`` and ``GET /v1/models`` lists."""
    max_concurrency: int = 8
    """Requests served at once; one more gets 429."""
    timeout: float = 60.0
    """Seconds a request may take before it gets 504 (a stream gets an error event)."""
    max_tokens_limit: int = 2048
    """Largest ``max_tokens`` accepted (the context bounds it too)."""
    default_chat_max_tokens: int = 256
    """``max_tokens`` of a chat request that gives none (less when the context has less room)."""
    max_body_bytes: int = 1_000_000
    batch_wait_ms: float = 5.0
    """How long the batcher waits for more requests to join a batch."""
    max_batch_rows: int = 32
    """Decoding rows (prompts x sequences or beams) of one batched generate call, and of one request."""
    chat_template: str | None = None
    """Jinja source of the chat template; None: the plain template."""

    def __post_init__(self) -> None:
        for name in (
            "max_concurrency",
            "max_tokens_limit",
            "default_chat_max_tokens",
            "max_body_bytes",
            "max_batch_rows",
        ):
            if getattr(self, name) < 1:
                raise LmforgeError(f"serve option {name} = {getattr(self, name)}: must be at least 1")
        if not (self.timeout > 0 and math.isfinite(self.timeout)):
            raise LmforgeError(f"serve option timeout = {self.timeout}: must be a positive number of seconds")
        if self.batch_wait_ms < 0:
            raise LmforgeError(f"serve option batch_wait_ms = {self.batch_wait_ms}: must be >= 0")


# ------------------------------------------------------------------------------------ chat template
class ChatTemplate:
    """Renders chat messages into one prompt string (a Jinja template, or the plain one)."""

    def __init__(self, source: str | None = None, *, bos_token: str = "", eos_token: str = "") -> None:
        self.source = source
        self.stop: list[str] = [] if source else list(PLAIN_CHAT_STOP)
        self._template = None
        self._extra = {"bos_token": bos_token, "eos_token": eos_token}
        if source:
            try:
                from jinja2 import TemplateError
                from jinja2.sandbox import ImmutableSandboxedEnvironment
            except ImportError as err:
                raise LmforgeError(f"the model's chat template needs jinja2 (pip install jinja2): {err}") from None

            def raise_exception(message: str) -> None:
                raise TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            try:
                self._template = env.from_string(source)
            except TemplateError as err:
                raise LmforgeError(f"the chat template does not compile: {err}") from None

    def render(self, messages: list[dict[str, str]]) -> str:
        if self._template is None:
            parts = []
            for m in messages:
                role = "system" if m["role"] == "developer" else m["role"]
                parts.append(f"<|{role}|>\n{m['content']}\n")
            return "".join(parts) + "<|assistant|>\n"
        from jinja2 import TemplateError

        try:
            return self._template.render(messages=messages, add_generation_prompt=True, **self._extra)
        except TemplateError as err:
            raise ApiError(400, f"The model's chat template refused the messages: {err}", param="messages") from None


def find_chat_template(*folders: str | Path | None) -> str | None:
    """The chat template in the first folder that has one: ``chat_template.jinja`` or the ``chat_template``
    of ``tokenizer_config.json`` (a string, or a list of named templates of which ``default`` is used)."""
    for folder in folders:
        if folder is None:
            continue
        d = Path(folder)
        d = d if d.is_dir() else d.parent
        if (d / "chat_template.jinja").is_file():
            return (d / "chat_template.jinja").read_text(encoding="utf-8")
        try:
            cfg = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        tpl = cfg.get("chat_template") if isinstance(cfg, dict) else None
        if isinstance(tpl, list):
            named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
            tpl = named.get("default")
        if isinstance(tpl, str) and tpl.strip():
            return tpl
    return None


# -------------------------------------------------------------------------------- body size limit
class BodyLimitMiddleware:
    """Reads a request body up to ``max_bytes`` before the app sees it; a larger one gets 413 (the
    ``Content-Length`` is checked first, a chunked body while it arrives)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            if not length.strip().isdigit():
                await _send_json(send, 400, error_body("Content-Length is not a number", code="bad_request"))
                return
            if int(length) > self.max_bytes:
                await self._too_large(send)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._too_large(send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send) -> None:
        msg = f"The request body is larger than this server's limit of {self.max_bytes} bytes"
        await _send_json(send, 413, error_body(msg, code="request_too_large"))


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(data)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data, "more_body": False})


# --------------------------------------------------------------------------- validation messages
_UNION_HINTS = {
    "prompt": "a non-empty string, a list of strings, a list of token ids (integers >= 0) or a list of such lists",
    "stop": "a non-empty string or a list of at most 4 non-empty strings (each at most 256 characters)",
    "content": 'a string or a list of {"type": "text", "text": ...} parts',
}
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _is_type_tag(part: Any) -> bool:
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or "-" in part)


def _param(loc: list[Any]) -> str | None:
    """``["messages", 0, "content", "str"]`` -> ``"messages.0.content"`` (up to the first union tag: past it
    the locations differ per union member)."""
    names = []
    for p in loc:
        if _is_type_tag(p):
            break
        names.append(str(p))
    return ".".join(names) or None


def validation_error(errors: list[dict[str, Any]]) -> ApiError:
    """pydantic / FastAPI errors -> one 400 :class:`ApiError` naming the first bad field."""
    if not errors:
        return ApiError(400, "The request is invalid")
    e = errors[0]
    loc = list(e.get("loc", ()))
    if loc and loc[0] == "body":
        loc = loc[1:]
    if e.get("type") == "json_invalid":
        reason = (e.get("ctx") or {}).get("error", "JSON decode error")
        where = f" at character {loc[-1]}" if loc and isinstance(loc[-1], int) else ""
        return ApiError(400, f"The request body is not valid JSON: {reason}{where}", code="invalid_json")
    param = _param(loc)
    unicode = next((x for x in errors if x.get("type") == "string_unicode"), None)
    if unicode is not None:  # a JSON escape of a lone surrogate
        where = _param([p for p in unicode.get("loc", ()) if p != "body"])
        what = f"'{where}'" if where else "a parameter name"
        return ApiError(400, f"Invalid value for {what}: not valid Unicode (a lone surrogate)", param=where)
    if param is None:
        return ApiError(400, "The request body must be a JSON object of parameters (Content-Type: application/json)")
    kind = e.get("type", "")
    if kind == "missing":
        return ApiError(400, f"Missing required parameter: '{param}'", param=param)
    if kind == "extra_forbidden":
        return ApiError(400, f"Unrecognized request parameter: '{param}'", param=param)
    union = any(_is_type_tag(p) for p in loc)
    last = next((p for p in reversed(param.split(".")) if not p.isdigit()), param)
    if union and last in _UNION_HINTS:
        return ApiError(400, f"Invalid value for '{param}': expected {_UNION_HINTS[last]}", param=param)
    shown = repr(e.get("input"))
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return ApiError(400, f"Invalid value for '{param}' ({shown}): {e.get('msg', 'invalid')}", param=param)


# ------------------------------------------------------------------------------ prepared requests
_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


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


class _ClientGone(Exception):
    pass


class _Slots:
    """Counts requests in progress (the event loop is single-threaded: no lock)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    def acquire(self) -> Callable[[], None]:
        """Take a slot or raise 429; returns an idempotent release function."""
        if self.active >= self.limit:
            raise ApiError(
                429,
                f"The server is busy: all {self.limit} request slots are in use (--max-concurrency); retry shortly",
                type="rate_limit_error",
                code="rate_limit_exceeded",
            )
        self.active += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.active -= 1

        return release


class _EventStream(StreamingResponse):
    """An SSE response that always runs ``on_close`` (free the slot, cancel the job) when it ends,
    however it ends: finished, client gone, or cancelled."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(
            content, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self._gen = content
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except (ClientDisconnect, OSError):
            pass
        finally:
            self._on_close()
            await self._gen.aclose()  # type: ignore[attr-defined]


class _ErrorResponse(JSONResponse):
    """JSON with non-ASCII characters escaped: an error message may quote a request's text, which can hold
    lone surrogates (valid in JSON escapes, not encodable as UTF-8)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def _check_text(text: str, param: str) -> str:
    """A request string must be encodable as UTF-8 (a JSON escape can smuggle in a lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ApiError(
            400, f"Invalid value for '{param}': not valid Unicode ({err.reason} at character {err.start})", param=param
        ) from None
    return text


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


# ------------------------------------------------------------------------------------------ server
class Server:
    """The state behind the routes: model, tokenizer, options, batcher, slots."""

    def __init__(self, model: Any, tokenizer: Any, options: ServeOptions) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.options = options
        self.context: int | None = getattr(model, "max_seq_len", None)
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        self.vocab_size: int = vocab if isinstance(vocab, int) else tokenizer.vocab_size
        self.chat = ChatTemplate(
            options.chat_template,
            bos_token=getattr(tokenizer, "eot_token", ""),
            eos_token=getattr(tokenizer, "eot_token", ""),
        )
        self.slots = _Slots(options.max_concurrency)
        self.batcher = Batcher(
            model, tokenizer, max_wait_s=options.batch_wait_ms / 1000.0, max_batch_rows=options.max_batch_rows
        )
        self.created = int(time.time())

    # ------------------------------------------------------------------------------- validation
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
        sampling = req.temperature > 0
        n, beams = req.n, req.num_beams
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
                temperature=req.temperature if sampling else 0.0,
                top_p=req.top_p if sampling else 1.0,
                top_k=(req.top_k or None) if sampling else None,
                num_beams=beams,
                num_return_sequences=returned,
                stop_strings=stops or None,
                seed=req.seed if sampling else None,
            )
        except GenerationError as err:
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
        if isinstance(p, str):
            texts, prompts = [p], None
        elif p and all(isinstance(x, int) for x in p):
            texts, prompts = None, [list(p)]  # type: ignore[arg-type]
        elif p and all(isinstance(x, list) for x in p):
            texts, prompts = None, [list(x) for x in p]  # type: ignore[union-attr]
        else:
            texts, prompts = list(p), None  # type: ignore[arg-type]
        if not p:
            raise ApiError(400, "Invalid value for 'prompt': the prompt is empty", param="prompt")
        if texts is not None:
            prompts = []
            for i, t in enumerate(texts):
                where = "prompt" if isinstance(p, str) else f"prompt[{i}]"
                if not t:
                    raise ApiError(400, f"Invalid value for '{where}': the prompt is empty", param="prompt")
                prompts.append(self.tokenizer.encode(_check_text(t, "prompt")))
        else:
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
        stops = [_check_text(t, "stop") for t in ([req.stop] if isinstance(req.stop, str) else req.stop or [])]
        cfg, copies = self._config(req, max_tokens, stops)
        self._check_rows(len(prompts), cfg, req.n)
        return Prepared(
            kind="text",
            prompts=prompts,
            prompt_texts=texts,
            config=cfg,
            n=req.n,
            copies=copies,
            stream=req.stream,
            echo=req.echo,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
        )

    def prepare_chat(self, req: ChatCompletionRequest) -> Prepared:
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
        messages = [
            {"role": m.role, "content": _check_text(m.text(), f"messages.{i}.content")}
            for i, m in enumerate(req.messages)
        ]
        if not any(m["content"] for m in messages):
            raise ApiError(400, "Invalid value for 'messages': every message is empty", param="messages")
        text = self.chat.render(messages)
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
        user_stops = [_check_text(t, "stop") for t in ([req.stop] if isinstance(req.stop, str) else req.stop or [])]
        stops = user_stops + [s for s in self.chat.stop if s not in user_stops]
        cfg, copies = self._config(req, max_tokens, stops)
        self._check_rows(1, cfg, req.n)
        return Prepared(
            kind="chat",
            prompts=[ids],
            prompt_texts=[text],
            config=cfg,
            n=req.n,
            copies=copies,
            stream=req.stream,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
        )

    # -------------------------------------------------------------------------------- responding
    async def respond(self, request: Request, prep: Prepared) -> Response:
        release = self.slots.acquire()
        loop = asyncio.get_running_loop()
        job = Job(prompts=prep.prompts, config=prep.config, loop=loop, stream=prep.stream)
        deadline = loop.time() + self.options.timeout
        try:
            self.batcher.submit(job)
            first = await self._next_event(job, deadline, request)
            if isinstance(first, ErrorEvent):
                raise _engine_error(first.error)
        except _ClientGone:
            job.cancel()
            release()
            return Response(status_code=499)
        except BaseException:
            job.cancel()
            release()
            raise
        if not prep.stream:
            job.cancel()
            release()
            assert isinstance(first, DoneEvent)
            return JSONResponse(self._body(prep, first.output))

        def on_close() -> None:
            job.cancel()
            release()

        return _EventStream(self._events(prep, job, first, deadline, request), on_close)

    async def _next_event(self, job: Job, deadline: float, request: Request) -> TokenEvent | DoneEvent | ErrorEvent:
        loop = asyncio.get_running_loop()
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ApiError(
                    504,
                    f"The request did not finish within this server's time limit of "
                    f"{self.options.timeout:g} s (--timeout)",
                    type="timeout_error",
                    code="timeout",
                )
            try:
                return await asyncio.wait_for(job.events.get(), min(remaining, _POLL_S))
            except TimeoutError:
                if await request.is_disconnected():
                    raise _ClientGone from None

    def _body(self, prep: Prepared, out: GenerationOutput) -> dict[str, Any]:
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
            "model": self.options.model_name,
            "choices": choices,
            "usage": prep.usage(out),
        }

    def _chunk(self, prep: Prepared, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        text = prep.kind == "text"
        obj: dict[str, Any] = {
            "id": ("cmpl-" if text else "chatcmpl-") + prep.id,
            "object": "text_completion" if text else "chat.completion.chunk",
            "created": prep.created,
            "model": self.options.model_name,
            "choices": choices,
        }
        if usage is not None:
            obj["usage"] = usage
        return _sse(obj)

    def _choice(
        self, prep: Prepared, idx: int, text: str | None, reason: str | None, role: bool = False
    ) -> dict[str, Any]:
        if prep.kind == "text":
            return {"index": idx, "text": text or "", "logprobs": None, "finish_reason": reason}
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        return {"index": idx, "delta": delta, "logprobs": None, "finish_reason": reason}

    async def _events(
        self, prep: Prepared, job: Job, first: TokenEvent | DoneEvent | ErrorEvent, deadline: float, request: Request
    ) -> AsyncIterator[str]:
        R = prep.rows_per_prompt
        rows = [IncrementalDetokenizer(self.tokenizer) for _ in range(len(prep.prompts) * R)]
        # the opening chunk: the assistant role (chat) or the echoed prompt (completions)
        if prep.kind == "chat":
            yield self._chunk(
                prep,
                [
                    self._choice(prep, i, "", None, role=True)
                    for r in range(len(rows))
                    for i in prep.choice_indices(r // R, r % R)
                ],
            )
        elif prep.echo:
            yield self._chunk(
                prep,
                [
                    self._choice(prep, i, prep.prompt_texts[r // R], None)
                    for r in range(len(rows))
                    for i in prep.choice_indices(r // R, r % R)
                ],
            )
        event = first
        while True:
            if isinstance(event, TokenEvent):
                delta = rows[event.row].add(event.ids)
                if delta:
                    p, s = divmod(event.row, R)
                    yield self._chunk(prep, [self._choice(prep, i, delta, None) for i in prep.choice_indices(p, s)])
            elif isinstance(event, DoneEvent):
                out = event.output
                assert out.texts is not None
                for p, texts in enumerate(out.texts):
                    for s, final in enumerate(texts):
                        rest = rows[p * R + s].finish(final)
                        reason = _FINISH.get(out.finish_reasons[p][s], "stop")
                        yield self._chunk(
                            prep,
                            [
                                self._choice(prep, i, rest if rest or prep.kind == "text" else None, reason)
                                for i in prep.choice_indices(p, s)
                            ],
                        )
                if prep.include_usage:
                    yield self._chunk(prep, [], usage=prep.usage(out))
                yield "data: [DONE]\n\n"
                return
            else:
                yield _sse(_engine_error(event.error).body())
                return
            try:
                event = await self._next_event(job, deadline, request)
            except ApiError as err:  # the time limit, after the response has started
                yield _sse(err.body())
                return
            except _ClientGone:
                return


def _engine_error(err: BaseException) -> ApiError:
    if isinstance(err, (GenerationError, LmforgeError, ValueError)):
        return ApiError(400, str(err))
    return ApiError(500, f"Generation failed: {type(err).__name__}: {err}", type="server_error")


# --------------------------------------------------------------------------------------------- app
def _responses(model: type) -> dict[int | str, dict[str, Any]]:
    err = {"model": ErrorResponse}
    return {
        200: {
            "model": model,
            "description": 'The completion; with "stream": true, server-sent events of '
            "chunks of this shape, then `data: [DONE]`",
        },
        400: err,
        404: err,
        413: err,
        429: err,
        504: err,
    }


def create_app(model: Any, tokenizer: Any, options: ServeOptions | None = None) -> FastAPI:
    """The FastAPI app serving ``model`` (any model of the state contract) with ``tokenizer``."""
    options = options or ServeOptions()
    server = Server(model, tokenizer, options)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.batcher.start()
        yield
        await server.batcher.stop()

    app = FastAPI(
        title="lmforge",
        version=__version__,
        description="OpenAI-compatible completions and chat completions of an lmforge model.",
        lifespan=lifespan,
    )
    app.state.server = server
    app.add_middleware(BodyLimitMiddleware, max_bytes=options.max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if err.status == 429 else None
        return _ErrorResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        api = validation_error(list(err.errors()))
        return _ErrorResponse(api.body(), status_code=api.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        message = err.detail if isinstance(err.detail, str) else json.dumps(err.detail)
        if err.status_code == 404:
            message = f"Not found: {request.method} {request.url.path}"
        elif err.status_code == 400 and "parsing the body" in message:  # e.g. not UTF-8
            message = "The request body could not be parsed: it must be UTF-8 encoded JSON"
        return _ErrorResponse(error_body(message, code=code), status_code=err.status_code, headers=err.headers)

    @app.post("/v1/completions", response_model=None, responses=_responses(CompletionResponse))
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """Complete one or more prompts (OpenAI ``/v1/completions``)."""
        return await server.respond(request, server.prepare_completion(body))

    @app.post(
        "/v1/chat/completions",
        response_model=None,
        responses={
            **_responses(ChatCompletionResponse),
            201: {"model": ChatCompletionChunk, "description": "(shape of a streamed chunk)"},
        },
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        """Reply to a conversation (OpenAI ``/v1/chat/completions``)."""
        return await server.respond(request, server.prepare_chat(body))

    def card() -> dict[str, Any]:
        return ModelCard(id=options.model_name, created=server.created, max_model_len=server.context).model_dump()

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses={404: {"model": ErrorResponse}})
    async def model_info(model_id: str) -> dict[str, Any]:
        server.check_model(model_id)
        return card()

    @app.get("/health", response_model=Health)
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": options.model_name,
            "active": server.slots.active,
            "max_concurrency": options.max_concurrency,
            "queued_requests": server.batcher.queued,
            "generate_calls": server.batcher.batches_run,
            "requests_generated": server.batcher.jobs_run,
        }

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground() -> HTMLResponse:
        return HTMLResponse(playground_html())

    return app


def playground_html() -> str:
    return resources.files("lmforge.serve").joinpath("playground.html").read_text(encoding="utf-8")


def default_model_name(model_dir: str | Path) -> str:
    """``runs/tiny`` -> ``tiny``; ``runs/tiny/best`` -> ``tiny``; ``hf:gpt2`` -> ``gpt2``."""
    text = str(model_dir)
    if text.startswith("hf:"):
        return text[3:]
    p = Path(text).expanduser().resolve()
    return p.parent.name if p.name == "best" and p.parent.name else p.name


def load_app(
    model_dir: str | Path, *, device: str = "cpu", chat_template_file: str | Path | None = None, **options: Any
) -> FastAPI:
    """Load a model (an lmforge run or checkpoint directory, a Hugging Face directory or ``hf:NAME``) and
    build its app; ``options`` are :class:`ServeOptions` fields."""
    from lmforge.predict.loading import load_pretrained, resolve_checkpoint

    model, tokenizer, cfg = load_pretrained(model_dir, map_location=device, native=True)
    options.setdefault("model_name", default_model_name(model_dir))
    if chat_template_file is not None:
        try:
            options["chat_template"] = Path(chat_template_file).read_text(encoding="utf-8")
        except OSError as err:
            raise LmforgeError(f"--chat-template {chat_template_file}: {err.strerror}") from None
    elif not str(model_dir).startswith("hf:"):
        options["chat_template"] = find_chat_template(resolve_checkpoint(model_dir), cfg.tokenizer.path)
    return create_app(model, tokenizer, ServeOptions(**options))
