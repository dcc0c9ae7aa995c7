"""Access control of a server exposed to a network: the ``Host`` header allow-list (against DNS rebinding)
and the API key (``Authorization: Bearer KEY``). Both are plain ASGI middleware that answer with the OpenAI
error object; CORS is Starlette's middleware, added by the app only when ``--cors-origins`` asks for it."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from lmforge.serve.http import send_json
from lmforge.serve.schemas import error_body

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
"""Names a server bound to this machine answers to by default (besides its bound address)."""
ANY_ADDRESS = ("0.0.0.0", "::", "")
OPEN_PATHS = frozenset({"/health"})
"""Paths served without the API key (load balancers and probes do not carry it)."""


def default_allowed_hosts(bound_host: str) -> list[str] | None:
    """The ``Host`` names a server bound to ``bound_host`` accepts by default: the bound address and the
    local names; None (any) when it listens on every address, where its public names are unknown."""
    if bound_host in ANY_ADDRESS:
        return None
    return list(dict.fromkeys([bound_host.strip("[]").lower(), *LOCAL_HOSTS]))


def host_name(header: str) -> str:
    """``example.com:8000`` -> ``example.com``; ``[::1]:8000`` -> ``::1`` (lower case)."""
    value = header.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class HostAllowList:
    """Refuses (400) a request whose ``Host`` header names no allowed host; ``*`` allows any."""

    def __init__(self, app: ASGIApp, allowed: list[str]) -> None:
        self.app = app
        self.allowed = {host_name(h) if h != "*" else "*" for h in allowed}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and "*" not in self.allowed:
            raw = dict(scope.get("headers") or []).get(b"host")
            host = host_name(raw.decode("latin-1")) if raw is not None else None
            if host not in self.allowed:
                shown = "no Host header" if host is None else f"Host header '{host}'"
                message = (
                    f"Invalid request: {shown} is not one of this server's names "
                    f"({', '.join(sorted(self.allowed))}); add it with --allowed-hosts"
                )
                await send_json(send, 400, error_body(message, code="invalid_host"))
                return
        await self.app(scope, receive, send)


class ApiKeyCheck:
    """Requires ``Authorization: Bearer KEY`` on every path but :data:`OPEN_PATHS` (401 otherwise; compared
    in constant time)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS and scope["method"] != "OPTIONS":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given.strip(), self.expected):
                what = "No API key provided" if not given else "Incorrect API key provided"
                message = f"{what}: send the server's key (--api-key) as 'Authorization: Bearer KEY'"
                body = error_body(message, code="invalid_api_key")
                await send_json(send, 401, body, headers=[(b"www-authenticate", b"Bearer")])
                return
        await self.app(scope, receive, send)
