"""The request id and the access log: every request gets an id (the client's ``X-Request-Id`` when it sends a
sensible one, a new one otherwise), returned as the ``X-Request-Id`` response header, and one JSON line on the
``lmforge.access`` logger when its response ends (streams included: the line comes at the stream's end)."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

access_log = logging.getLogger("lmforge.access")

REQUEST_ID_HEADER = b"x-request-id"
_GOOD_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
"""A client's id is echoed only when it is short and plain (it goes into headers and logs)."""


def request_id(scope: Scope) -> str:
    """The request's id: the client's ``X-Request-Id`` if plain, otherwise a new random one."""
    given = dict(scope.get("headers") or []).get(REQUEST_ID_HEADER)
    if given is not None:
        text = given.decode("latin-1").strip()
        if _GOOD_ID.fullmatch(text):
            return text
    return uuid.uuid4().hex


class AccessLog:
    """Outermost middleware: sets ``scope["state"]["request_id"]``, adds the response header and logs the
    JSON line (``id``, ``method``, ``path``, ``status``, ``ms``, ``bytes``, ``client``; status 499: the
    client went away before an answer)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(scope)
        scope.setdefault("state", {})["request_id"] = rid
        start = time.monotonic()
        status = 499
        sent = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (REQUEST_ID_HEADER, rid.encode())]}
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            status = 500 if status == 499 else status
            raise
        finally:
            client = scope.get("client")
            line = {
                "id": rid,
                "method": scope["method"],
                "path": scope["path"],
                "status": status,
                "ms": round((time.monotonic() - start) * 1000, 1),
                "bytes": sent,
                "client": f"{client[0]}:{client[1]}" if client else None,
            }
            access_log.info(json.dumps(line, separators=(",", ":")))
