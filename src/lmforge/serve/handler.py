"""Request handling: the :class:`Server` state behind the routes and the path of one request through it.

Path: take a concurrency slot (429 when all are taken) -> a :class:`~lmforge.serve.batcher.Job` for the
batcher -> wait for its events under the request's time limit (504 after it) -> a JSON body or an event
stream. The slot is freed when the response ends, the time limit passes or the client disconnects; the job
is then cancelled, which stops the engine once nothing else needs the batch. Checking a request is
:mod:`lmforge.serve.prepare`'s job; shaping the answer is :mod:`lmforge.serve.responses`'."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from lmforge.config import LmforgeError
from lmforge.models.base import DecodingModel
from lmforge.predict.config import TokenLogprob
from lmforge.predict.constrained import token_bytes
from lmforge.serve.batcher import Batcher, DoneEvent, ErrorEvent, Job, TokenEvent
from lmforge.serve.chat_template import ChatTemplate
from lmforge.serve.http import EventStream, Slots, sse
from lmforge.serve.metrics import ServerMetrics
from lmforge.serve.options import ServeOptions
from lmforge.serve.prepare import Prepared, RequestPreparer
from lmforge.serve.protocols import ServedTokenizer
from lmforge.serve.responses import ChunkStream, LogprobFormat, completion_body
from lmforge.serve.schemas import ApiError

POLL_S = 0.25
"""While no event arrives, check this often whether the client has gone."""


STALLED_GRACE_S = 5.0
"""How long past its time limit a stream may still wait for a client that stopped reading."""


class ClientGone(Exception):
    """The client disconnected while its request waited for the engine."""


class Server:
    """The state behind the routes: model, tokenizer, options, request checks, batcher, slots."""

    def __init__(
        self,
        model: DecodingModel,
        tokenizer: ServedTokenizer,
        options: ServeOptions,
        generation_defaults: dict[str, Any] | None = None,
    ) -> None:
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
            time_limit=options.template_timeout,
        )
        self.requests = RequestPreparer(
            tokenizer,
            options,
            self.chat,
            context=self.context,
            vocab_size=self.vocab_size,
            generation_defaults=generation_defaults,
        )
        self.metrics: ServerMetrics | None = None
        """Set by the app (``/metrics``); None: nothing recorded."""
        self._logprob_format: LogprobFormat | None = None
        self.slots = Slots(options.max_concurrency)
        self.batcher = Batcher(
            model,
            tokenizer,
            max_wait_s=options.batch_wait_ms / 1000.0,
            max_batch_rows=options.max_batch_rows,
            batching="per-request" if options.batching == "per-request" else "continuous",
            prefill_chunk_size=options.prefill_chunk_size,
        )
        self.created = int(time.time())

    def logprob_format(self) -> LogprobFormat:
        if self._logprob_format is None:
            table = token_bytes(self.tokenizer, self.vocab_size)[0] if hasattr(self.tokenizer, "backend") else None
            self._logprob_format = LogprobFormat(self.tokenizer, table)
        return self._logprob_format

    async def respond(self, request: Request, prep: Prepared) -> Response:
        release = self.slots.acquire()
        loop = asyncio.get_running_loop()
        started = loop.time()
        # logprobs come with token events: a job that wants them streams its events even for a JSON reply
        job = Job(
            prompts=prep.prompts,
            config=prep.config,
            loop=loop,
            stream=prep.stream or prep.logprobs is not None,
            processors=list(prep.processors),
            logprobs=prep.logprobs,
        )
        deadline = loop.time() + self.options.timeout
        logprobs: dict[int, list[TokenLogprob]] = {}
        fmt = self.logprob_format() if prep.logprobs is not None else None
        try:
            self.batcher.submit(job)
            first = await self._next_event(job, deadline, request)
            if not prep.stream:  # a JSON reply: gather the token events' logprobs until the end
                while isinstance(first, TokenEvent):
                    logprobs.setdefault(first.row, []).extend(first.logprobs or [])
                    first = await self._next_event(job, deadline, request)
            if isinstance(first, ErrorEvent):
                raise engine_error(first.error)
        except ClientGone:
            job.cancel()
            release()
            return Response(status_code=499)
        except BaseException:
            job.cancel()
            release()
            raise
        first_token = loop.time() - started
        if not prep.stream:
            job.cancel()
            release()
            assert isinstance(first, DoneEvent)
            per_row = getattr(first, "logprobs", None)  # a scheduler that also gives them with the output
            if per_row is not None:
                logprobs = dict(enumerate(per_row))
            body = completion_body(prep, first.output, self.options.model_name, logprobs, fmt)
            self._record(prep, loop.time() - started, first_token, body["usage"])
            return JSONResponse(body)

        # at the time limit the engine stops for this job even while the writer is stuck on a stalled reader
        # (the generator below only notices the deadline between two writes)
        timer = loop.call_at(deadline, job.cancel)

        def on_close() -> None:
            timer.cancel()
            job.cancel()
            release()

        # past the time limit the stream ends with an error event; a client too stalled to take even that is
        # dropped a little later
        return EventStream(
            self._events(prep, job, first, deadline, started, first_token, fmt),
            on_close,
            deadline=deadline + STALLED_GRACE_S,
        )

    def _record(self, prep: Prepared, latency: float, first_token: float | None, usage: dict[str, int]) -> None:
        if self.metrics is not None:
            endpoint = "completions" if prep.kind == "text" else "chat"
            self.metrics.finished(endpoint, latency, first_token, usage)
            self.metrics.batch.observe(len(prep.prompts) * max(prep.config.num_return_sequences, prep.config.num_beams))

    async def _next_event(
        self, job: Job, deadline: float, request: Request | None
    ) -> TokenEvent | DoneEvent | ErrorEvent:
        """The job's next event; 504 past ``deadline``; :class:`ClientGone` when ``request``'s client has
        gone (a started stream passes None: its :class:`EventStream` watches for the disconnect itself).

        Not ``asyncio.wait_for``: on Python 3.11 it swallows a cancellation that arrives as the queue hands
        over an item, so a stream with events queued could not be cancelled until the queue ran dry."""
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
                return job.events.get_nowait()
            except asyncio.QueueEmpty:
                pass
            getter = loop.create_task(job.events.get())
            try:
                await asyncio.wait({getter}, timeout=min(remaining, POLL_S))
            finally:
                getter.cancel()  # an item the getter has not taken yet stays in the queue
            if getter.done() and not getter.cancelled():
                return getter.result()
            if request is not None and await request.is_disconnected():
                raise ClientGone

    async def _events(
        self,
        prep: Prepared,
        job: Job,
        first: TokenEvent | DoneEvent | ErrorEvent,
        deadline: float,
        started: float,
        first_token: float,
        fmt: LogprobFormat | None,
    ) -> AsyncIterator[str]:
        chunks = ChunkStream(prep, self.tokenizer, self.options.model_name, fmt)
        for chunk in chunks.opening():
            yield chunk
        event = first
        loop = asyncio.get_running_loop()
        while True:
            if isinstance(event, TokenEvent):
                for chunk in chunks.tokens(event.row, event.ids, event.logprobs):
                    yield chunk
            elif isinstance(event, DoneEvent):
                for chunk in chunks.done(event.output):
                    yield chunk
                self._record(prep, loop.time() - started, first_token, prep.usage(event.output))
                return
            else:
                yield sse(engine_error(event.error).body())
                return
            try:
                event = await self._next_event(job, deadline, None)
            except ApiError as err:  # the time limit, after the response has started
                yield sse(err.body())
                return


def engine_error(err: BaseException) -> ApiError:
    """An exception from the engine -> the API error: the request's fault (400) or the server's (500)."""
    if isinstance(err, (LmforgeError, ValueError)):
        return ApiError(400, str(err))
    return ApiError(500, f"Generation failed: {type(err).__name__}: {err}", type="server_error")
