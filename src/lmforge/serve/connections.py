"""Connection-level defences of ``lmforge serve``, below the app: read timeouts, a connection cap and quiet
handling of descriptor exhaustion. uvicorn has a keep-alive timeout and ``limit_concurrency`` (a 503 once a
request arrives), but nothing closes a connection that never sends a request, sends its headers a byte at a
time, or never finishes its body; and when ``accept`` runs out of descriptors asyncio logs a traceback for
every attempt.

- :class:`GuardedH11Protocol`: uvicorn's h11 protocol plus a header timer (from the connection's start, or
  from the first byte of a kept-alive connection's next request: not reset by each byte) and a body timer
  (from the end of the headers); on expiry 408 when some of a request came, then close;
- :class:`ConnectionRegistry`: at most ``max_connections`` open; at the cap a new connection replaces the
  oldest one without a request in progress, or gets 503 when every connection is busy;
- :class:`DescriptorWarning`: the event loop's exception handler; "too many open files" becomes one warning
  line per 10 s; :class:`CancelledAtShutdown`: one line, not a traceback, per request cut off at shutdown;
- :func:`run_server`: uvicorn with all of the above (and its keep-alive timeout).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import math
import resource
import sys
import time
from asyncio import constants as asyncio_constants
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from lmforge.config import LmforgeError
from lmforge.serve.schemas import error_body

log = logging.getLogger("lmforge.serve")

RESERVED_DESCRIPTORS = 64
"""Descriptors kept free of connections by the default cap (model files, logs, the engine's own)."""
ACCEPT_RETRY_S = 0.05
"""After ``accept`` ran out of descriptors, asyncio stops accepting for 1 s (``ACCEPT_RETRY_DELAY``): every new
client, ``/health`` included, then waits that long. The cap frees descriptors as soon as the accepted burst
is registered, so the server tries again much sooner."""


def default_max_connections() -> int:
    """The default cap: the process's descriptor limit less a reserve of a quarter (1024 -> 768). asyncio
    accepts a burst of waiting connections before the cap sees any of them; the reserve absorbs most."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft > 65536:
        soft = 65536
    return max(16, soft - max(RESERVED_DESCRIPTORS, soft // 4))


@dataclass
class ConnectionLimits:
    """The connection flags of ``lmforge serve``."""

    header_timeout: float = 10.0
    """Seconds a request's line and headers may take to arrive (an idle new connection is closed after it)."""
    body_timeout: float = 30.0
    """Seconds a request body may take to arrive after its headers."""
    keep_alive: float = 5.0
    """Seconds an idle kept-alive connection stays open between requests."""
    max_connections: int = 0
    """Open connections at most; 0: :func:`default_max_connections`."""
    graceful_shutdown: float = 5.0
    """Seconds requests in flight get to finish when the server is told to stop."""

    def __post_init__(self) -> None:
        for name in ("header_timeout", "body_timeout", "keep_alive", "graceful_shutdown"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise LmforgeError(f"serve option {name} = {value}: must be a positive number of seconds")
        if self.max_connections < 0:
            raise LmforgeError(f"serve option max_connections = {self.max_connections}: must be >= 1 (0: automatic)")
        if self.max_connections == 0:
            self.max_connections = default_max_connections()


class RateLimitedWarning:
    """Logs a warning at most once per ``interval`` seconds, with the number of repeats it held back."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self.last = -math.inf
        self.held = 0

    def __call__(self, message: str) -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            self.held += 1
            return
        more = f" ({self.held} more like it in the last {self.interval:g} s)" if self.held else ""
        log.warning("%s%s", message, more)
        self.last, self.held = now, 0


class ConnectionRegistry:
    """The open connections, oldest first, and the cap on their number."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open: dict[GuardedH11Protocol, None] = {}
        self.warn = RateLimitedWarning()
        self.evicted = 0
        self.refused = 0

    def add(self, conn: GuardedH11Protocol) -> bool:
        """Register ``conn``; at the cap, close the oldest idle connection for it (False: none is idle)."""
        if len(self.open) >= self.limit:
            victim = next((c for c in self.open if c.idle), None)
            if victim is None:
                self.refused += 1
                self.warn(f"{len(self.open)} connections are open and busy (--max-connections): refusing new ones")
                return False
            self.evicted += 1
            self.warn(f"{len(self.open)} connections are open (--max-connections): closing the oldest idle ones")
            self.remove(victim)
            victim.transport.close()
        self.open[conn] = None
        return True

    def remove(self, conn: GuardedH11Protocol) -> None:
        self.open.pop(conn, None)


def _raw_response(status: int, reason: str, message: str, code: str) -> bytes:
    """A whole HTTP response with the OpenAI error body, for writing straight to a transport that is then
    closed (outside h11's state machine: the request may be half read)."""
    body = json.dumps(error_body(message, code=code)).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with header and body timers and a place in a :class:`ConnectionRegistry`.
    Subclassed per server by :func:`guarded_protocol`, which sets ``limits`` and ``registry``."""

    limits: ClassVar[ConnectionLimits]
    registry: ClassVar[ConnectionRegistry]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timer: asyncio.TimerHandle | None = None
        self.phase = ""
        """What the timer waits for: ``headers``, ``body`` or nothing."""

    @property
    def idle(self) -> bool:
        """No request in progress: waiting for one (a new or kept-alive connection)."""
        return self.cycle is None or self.cycle.response_complete

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]  # uvicorn types it as a Transport
        if not self.registry.add(self):
            msg = "The server has too many connections open; retry shortly"
            self.transport.write(_raw_response(503, "Service Unavailable", msg, "too_many_connections"))
            self.transport.close()
            return
        self.watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self.registry.remove(self)
        self.set_timer("")
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.watch()

    def watch(self) -> None:
        """Start or stop the timer for what the connection now waits for."""
        if self.transport.is_closing():
            self.set_timer("")
            return
        state = self.conn.their_state
        if state is h11.IDLE:
            # a new connection, or bytes of the next request on a kept-alive one (an idle kept-alive
            # connection is left to uvicorn's keep-alive timer)
            partial = bool(self.conn.trailing_data[0])
            self.set_timer("headers" if self.cycle is None or partial else "")
        elif state is h11.SEND_BODY:
            self.set_timer("body")
        else:
            self.set_timer("")

    def set_timer(self, phase: str) -> None:
        if phase == self.phase:
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.phase = phase
        if phase:
            delay = self.limits.header_timeout if phase == "headers" else self.limits.body_timeout
            self.timer = self.loop.call_later(delay, self.expire)

    def expire(self) -> None:
        phase, self.timer, self.phase = self.phase, None, ""
        if self.transport.is_closing():
            return
        started = self.cycle is not None and self.cycle.response_started
        if not started and (phase == "body" or self.conn.trailing_data[0]):  # some of a request came: say why
            if phase == "headers":
                msg = f"The request headers did not arrive within {self.limits.header_timeout:g} s (--header-timeout)"
            else:
                msg = f"The request body did not arrive within {self.limits.body_timeout:g} s (--body-timeout)"
            self.transport.write(_raw_response(408, "Request Timeout", msg, "request_timeout"))
        self.transport.close()


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    """A :class:`GuardedH11Protocol` class bound to ``limits`` and a fresh registry (one per server)."""
    registry = ConnectionRegistry(limits.max_connections)
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits, "registry": registry})


class DescriptorWarning:
    """An event-loop exception handler: running out of descriptors (EMFILE / ENFILE, e.g. in ``accept``)
    gives one warning line per 10 s instead of a traceback per attempt; anything else goes to the default
    handler."""

    def __init__(self) -> None:
        self.warn = RateLimitedWarning()

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        err = context.get("exception")
        if isinstance(err, OSError) and err.errno in (errno.EMFILE, errno.ENFILE):
            self.warn(
                f"out of file descriptors ({err.strerror}): new connections wait; raise the limit "
                "(ulimit -n) or lower --max-connections"
            )
            return
        loop.default_exception_handler(context)


class CancelledAtShutdown(logging.Filter):
    """uvicorn logs a traceback for every request it cancels when the graceful shutdown time runs out (a
    stream, a slow chat template); that is no error of the request: one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError):
            record.msg, record.args, record.exc_info, record.exc_text = (
                "a request still running at shutdown was cancelled (--graceful-shutdown)",
                (),
                None,
                None,
            )
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def run_server(app: Any, *, host: str, port: int, limits: ConnectionLimits, log_level: str = "info") -> None:
    """Serve ``app`` with uvicorn under ``limits`` until SIGINT / SIGTERM (or until an app that loads its
    model in the background reports, through ``app.state.on_load_failure``, that loading failed)."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=guarded_protocol(limits),
        timeout_keep_alive=max(1, math.ceil(limits.keep_alive)),
        timeout_graceful_shutdown=max(1, math.ceil(limits.graceful_shutdown)),
        access_log=False,  # lmforge.serve.access_log writes one JSON line per request instead
    )
    server = uvicorn.Server(config)  # (after uvicorn has configured its loggers)
    if hasattr(app, "state"):
        app.state.on_load_failure = lambda: setattr(server, "should_exit", True)
    logging.getLogger("uvicorn.error").addFilter(CancelledAtShutdown())
    lines = logging.StreamHandler(sys.stdout)
    lines.setFormatter(logging.Formatter("%(message)s"))
    for name in ("lmforge.access", "lmforge.serve"):  # the access log's JSON lines, the server's warnings
        logger = logging.getLogger(name)
        logger.setLevel(log_level.upper())
        logger.addHandler(lines)
        logger.propagate = False
    setattr(asyncio_constants, "ACCEPT_RETRY_DELAY", ACCEPT_RETRY_S)  # noqa: B010 (a Final constant to typeshed)

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(DescriptorWarning())
        await server.serve()

    asyncio.run(main())
