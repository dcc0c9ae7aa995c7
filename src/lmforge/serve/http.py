"""HTTP plumbing of the server, below the routes: the request-body limit, the concurrency slots, the
server-sent-event response and the JSON error response.

None of it knows about models or the OpenAI request shapes; it only knows how an error body looks."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmforge.serve.schemas import ApiError, error_body


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
                await send_json(send, 400, error_body("Content-Length is not a number", code="bad_request"))
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
        await send_json(send, 413, error_body(msg, code="request_too_large"))


async def send_json(
    send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """Answer with a JSON body straight from ASGI (the middleware answers before the app exists for the
    request) and close the connection, since the unread rest of the body may still be arriving."""
    data = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(data)).encode()),
        (b"connection", b"close"),
        *(headers or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data, "more_body": False})


class Slots:
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


class EventStream(StreamingResponse):
    """An SSE response that frees its request's resources (``on_close``: free the slot, cancel the job) as
    soon as the client disconnects, the stream ends, or ``deadline`` (event-loop time) passes.

    Starlette's own disconnect handling is not enough here: it cancels the writer, and a writer with events
    already queued never waits, so the cancellation can be swallowed until the queue drains. Here a watcher
    task reads the ASGI ``http.disconnect`` message and runs ``on_close`` itself, and the writer yields to
    the event loop between events so that the watcher (and the transport's callbacks) always get to run.
    ``deadline`` also ends a stream whose writes are stalled by a client that stopped reading."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None], *, deadline: float) -> None:
        super().__init__(
            content, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self._gen = content
        self._on_close = on_close
        self._deadline = deadline

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        watcher = loop.create_task(self._watch(receive))
        writer = loop.create_task(self._write(send))
        try:
            await asyncio.wait(
                {watcher, writer}, timeout=max(0.0, self._deadline - loop.time()), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            self._on_close()
            watcher.cancel()
            writer.cancel()
            await asyncio.wait({watcher, writer})
            await self._gen.aclose()  # type: ignore[attr-defined]
        if not writer.cancelled() and writer.exception() is not None:
            err = writer.exception()
            if not isinstance(err, (ClientDisconnect, OSError)):
                raise err  # type: ignore[misc]

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self._on_close()

    async def _write(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for chunk in self._gen:
            await send({"type": "http.response.body", "body": chunk.encode("utf-8"), "more_body": True})
            # writing to a gone client does not fail or wait: yield so that the disconnect can be seen
            await asyncio.sleep(0)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def sse(obj: Any) -> str:
    """One server-sent event carrying ``obj`` as compact JSON."""
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


class ErrorJSONResponse(JSONResponse):
    """JSON with non-ASCII characters escaped: an error message may quote a request's text, which can hold
    lone surrogates (valid in JSON escapes, not encodable as UTF-8)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")
