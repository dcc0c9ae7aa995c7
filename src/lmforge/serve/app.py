"""The OpenAI-compatible HTTP app (FastAPI; layer 6): builds it from a model and wires the routes.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both streamed as server-sent events
with ``"stream": true``), ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /tokenize``, ``POST
/detokenize``, ``GET /health``, ``GET /metrics`` (Prometheus), ``GET /`` (the playground page) and FastAPI's ``/openapi.json`` and ``/docs``.
Every response carries an ``X-Request-Id`` header and is logged as one JSON line
(:mod:`lmforge.serve.access_log`).

A request is validated by :mod:`lmforge.serve.schemas` (error messages: :mod:`lmforge.serve.validation`),
checked against the model and the limits by :mod:`lmforge.serve.prepare`, run by
:mod:`lmforge.serve.handler` through the batcher, and answered in :mod:`lmforge.serve.responses`' shapes.

Decoding parameters: ``temperature`` 0 is greedy (``n`` > 1 then repeats the one greedy completion), above
0 samples with ``top_p`` / ``top_k``; ``num_beams`` > 1 is beam search (beam sampling when ``temperature``
> 0); ``stop`` and the end-of-text token end a completion (``finish_reason`` ``"stop"``), the token budget
``max_tokens`` ends it with ``"length"``. ``presence_penalty`` / ``frequency_penalty`` / ``logit_bias``,
``logprobs``, ``seed`` and structured output (``response_format`` json_object / json_schema, and the
lmforge extension ``guided_choice``, by constrained decoding: :mod:`lmforge.predict.constrained`) are
OpenAI's. A field a request leaves out takes the model's ``generation_config.json`` value, if it has one.

Chat prompts are rendered with the model's chat template when its directory has one (``chat_template.jinja``
or ``chat_template`` in ``tokenizer_config.json``, a Jinja template as in Hugging Face), otherwise with the
plain template (see :data:`lmforge.serve.chat_template.PLAIN_CHAT_HELP`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge import __version__
from lmforge.config import LmforgeError
from lmforge.models import native
from lmforge.models.base import DecodingModel
from lmforge.predict.generation_config import load_generation_defaults
from lmforge.predict.loading import load_pretrained, resolve_checkpoint
from lmforge.serve.access_log import AccessLog
from lmforge.serve.chat_template import PLAIN_CHAT_STOP, find_chat_template
from lmforge.serve.handler import Server
from lmforge.serve.http import BodyLimitMiddleware, ErrorJSONResponse
from lmforge.serve.metrics import CONTENT_TYPE, ServerMetrics
from lmforge.serve.options import ServeOptions
from lmforge.serve.protocols import ServedTokenizer
from lmforge.serve.schemas import (
    ApiError,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    NotReady,
    TokenizeRequest,
    TokenizeResponse,
    error_body,
)
from lmforge.serve.security import ApiKeyCheck, HostAllowList
from lmforge.serve.validation import validation_error

log = logging.getLogger("lmforge.serve")

__all__ = [
    "PLAIN_CHAT_STOP",
    "ServeOptions",
    "build_app",
    "create_app",
    "default_model_name",
    "find_chat_template",
    "load_app",
    "load_server",
    "loading_app",
    "playground_html",
]


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


def create_app(
    model: DecodingModel,
    tokenizer: ServedTokenizer,
    options: ServeOptions | None = None,
    generation_defaults: dict[str, Any] | None = None,
) -> FastAPI:
    """The FastAPI app serving ``model`` (any model of the state contract) with ``tokenizer``;
    ``generation_defaults``: the model's decoding defaults (``generation_config.json`` keys)."""
    options = options or ServeOptions()
    return build_app(options, Server(model, tokenizer, options, generation_defaults=generation_defaults))


class Loading:
    """The server behind the routes, or why there is none yet: still loading, or loading failed."""

    def __init__(self, server: Server | None) -> None:
        self.server = server
        self.error: str | None = None

    def ready(self) -> Server:
        """The server; 503 while the model loads (or when loading failed)."""
        if self.server is not None:
            return self.server
        why = f"loading the model failed: {self.error}" if self.error else "the model is still loading"
        raise ApiError(503, f"The server is not ready: {why}; retry shortly", type="server_error", code="not_ready")


def build_app(options: ServeOptions, server: Server | None = None, load: Callable[[], Server] | None = None) -> FastAPI:
    """The app with its routes; the server is given, or built by ``load`` in a thread at startup (then
    ``/health`` answers 503 until it is ready, and ``app.state.on_load_failure()`` runs if it fails)."""
    state = Loading(server)
    metrics = ServerMetrics()
    metrics.watch(
        lambda: state.server.slots.active if state.server is not None else 0,
        lambda: state.server.batcher if state.server is not None else None,
    )
    if server is not None:
        server.metrics = metrics

    async def load_in_background(app: FastAPI) -> None:
        assert load is not None
        try:
            loaded = await asyncio.to_thread(load)
        except Exception as err:  # a one-line reason for /health and the log, then the server stops
            state.error = str(err) if isinstance(err, LmforgeError) else f"{type(err).__name__}: {err}"
            log.error("loading the model failed: %s", state.error)
            app.state.on_load_failure()
            return
        loaded.batcher.start()
        loaded.metrics = metrics
        app.state.server = state.server = loaded

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = None
        if state.server is not None:
            state.server.batcher.start()
        else:
            loader = asyncio.get_running_loop().create_task(load_in_background(app))
        yield
        if loader is not None:
            loader.cancel()
        if state.server is not None:
            await state.server.batcher.stop()

    app = FastAPI(
        title="lmforge",
        version=__version__,
        description="OpenAI-compatible completions and chat completions of an lmforge model.",
        lifespan=lifespan,
    )
    app.state.server = server
    app.state.loading = state
    app.state.metrics = metrics
    app.state.on_load_failure = lambda: None
    # outermost last: access log -> Host check -> CORS (its preflights carry no key) -> API key -> body limit
    # -> routes
    app.add_middleware(BodyLimitMiddleware, max_bytes=options.max_body_bytes)
    if options.api_key is not None:
        app.add_middleware(ApiKeyCheck, api_key=options.api_key)
    if options.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=options.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
        )
    if options.allowed_hosts is not None:
        app.add_middleware(HostAllowList, allowed=options.allowed_hosts)
    app.add_middleware(AccessLog)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if err.status == 429 else None
        metrics.rejected.labels(status=str(err.status)).inc()
        return ErrorJSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        api = validation_error(list(err.errors()))
        metrics.rejected.labels(status=str(api.status)).inc()
        return ErrorJSONResponse(api.body(), status_code=api.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        message = err.detail if isinstance(err.detail, str) else json.dumps(err.detail)
        if err.status_code == 404:
            message = f"Not found: {request.method} {request.url.path}"
        elif err.status_code == 400 and "parsing the body" in message:  # e.g. not UTF-8
            message = "The request body could not be parsed: it must be UTF-8 encoded JSON"
        return ErrorJSONResponse(error_body(message, code=code), status_code=err.status_code, headers=err.headers)

    err_only: dict[str, Any] = {"model": ErrorResponse}

    @app.post("/v1/completions", response_model=None, responses=_responses(CompletionResponse))
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """Complete one or more prompts (OpenAI ``/v1/completions``)."""
        server = state.ready()
        return await server.respond(request, server.requests.prepare_completion(body))

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
        server = state.ready()
        return await server.respond(request, await server.requests.prepare_chat(body))

    @app.post("/tokenize", response_model=TokenizeResponse, responses={400: err_only, 404: err_only})
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        """Token ids of a prompt, or of chat messages as the chat template renders them."""
        server = state.ready()
        ids = await server.requests.tokenize(body)
        return {"tokens": ids, "count": len(ids), "max_model_len": server.context}

    @app.post("/detokenize", response_model=DetokenizeResponse, responses={400: err_only, 404: err_only})
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        """The text of token ids."""
        return {"prompt": state.ready().requests.detokenize(body)}

    def card() -> dict[str, Any]:
        server = state.ready()
        return ModelCard(id=options.model_name, created=server.created, max_model_len=server.context).model_dump()

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses={404: {"model": ErrorResponse}})
    async def model_info(model_id: str) -> dict[str, Any]:
        state.ready().requests.check_model(model_id)
        return card()

    @app.get("/health", response_model=Health, responses={503: {"model": NotReady}})
    async def health() -> Any:
        """200 when the server is ready; 503 while the model loads or when loading failed."""
        server = state.server
        if server is None:
            status = "failed" if state.error else "loading"
            return JSONResponse({"status": status, "model": options.model_name, "error": state.error}, 503)
        return {
            "status": "ok",
            "model": options.model_name,
            "active": server.slots.active,
            "max_concurrency": options.max_concurrency,
            "queued_requests": server.batcher.queued,
            "generate_calls": server.batcher.batches_run,
            "requests_generated": server.batcher.jobs_run,
        }

    @app.get("/metrics", response_class=Response)
    async def prometheus() -> Response:
        """Prometheus metrics: requests running / waiting / rejected, time to first token, latency,
        tokens per second, rows per request, tokens served, and the scheduler's own counters."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

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


def load_server(
    model_dir: str | Path, *, device: str = "cpu", chat_template_file: str | Path | None = None, **options: Any
) -> Server:
    """Load a model (an lmforge run or checkpoint directory, a Hugging Face directory or ``hf:NAME``) and
    build its :class:`Server`; ``options`` are :class:`ServeOptions` fields."""
    model, tokenizer, cfg = load_pretrained(model_dir, map_location=device, native=True)
    options.setdefault("model_name", default_model_name(model_dir))
    if chat_template_file is not None:
        try:
            options["chat_template"] = Path(chat_template_file).read_text(encoding="utf-8")
        except OSError as err:
            raise LmforgeError(f"--chat-template {chat_template_file}: {err.strerror}") from None
    elif not str(model_dir).startswith("hf:"):
        options["chat_template"] = find_chat_template(resolve_checkpoint(model_dir), cfg.tokenizer.path)
    defaults = load_generation_defaults(model_dir)
    return Server(model, tokenizer, ServeOptions(**options), generation_defaults=defaults)


def loading_app(
    model_dir: str | Path, *, device: str = "cpu", chat_template_file: str | Path | None = None, **options: Any
) -> FastAPI:
    """The app of :func:`load_server`'s server, returned at once: the model loads in a thread when the app
    starts, and ``/health`` answers 503 until it is ready (``lmforge serve``). On the CPU the C++ decoding
    step is built (or loaded) then too, rather than during the first request."""
    options.setdefault("model_name", default_model_name(model_dir))

    def load() -> Server:
        server = load_server(model_dir, device=device, chat_template_file=chat_template_file, **options)
        if device == "cpu":
            native.decode_step()
        return server

    return build_app(ServeOptions(**options), load=load)


def load_app(
    model_dir: str | Path, *, device: str = "cpu", chat_template_file: str | Path | None = None, **options: Any
) -> FastAPI:
    """Load a model (an lmforge run or checkpoint directory, a Hugging Face directory or ``hf:NAME``) and
    build its app; ``options`` are :class:`ServeOptions` fields."""
    server = load_server(model_dir, device=device, chat_template_file=chat_template_file, **options)
    return build_app(server.options, server)
