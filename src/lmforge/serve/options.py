"""A server's limits and settings (the ``lmforge serve`` flags), checked once when the server is built.

Kept apart from the app so that the options can be built and validated without fastapi."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lmforge.config import LmforgeError


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
    """Decoding rows (prompts x sequences or beams) of the running batch (or of one batched generate call
    when batching per request), and of one request."""
    batching: str = "continuous"
    """``continuous``: requests join and leave the running batch at every decoding step; ``per-request``: the
    old path, compatible requests batched into one generate call that later requests wait for."""
    prefill_chunk_size: int = 256
    """Prompt tokens (padding included) prefilled per decoding step with continuous batching, so a long
    prompt does not stall the streams in flight."""
    chat_template: str | None = None
    """Jinja source of the chat template; None: the plain template."""
    template_timeout: float = 5.0
    """Seconds a chat template may take to render a request's messages."""
    api_key: str | None = None
    """Required as ``Authorization: Bearer KEY`` on every route but ``/health``; None: no key."""
    allowed_hosts: list[str] | None = None
    """Names the ``Host`` header may give (``*``: any); None: no check (``lmforge serve`` fills it in)."""
    cors_origins: list[str] = field(default_factory=list)
    """Origins browsers may call the API from; empty: no CORS headers at all."""

    def __post_init__(self) -> None:
        for name in (
            "max_concurrency",
            "max_tokens_limit",
            "default_chat_max_tokens",
            "max_body_bytes",
            "max_batch_rows",
            "prefill_chunk_size",
        ):
            if getattr(self, name) < 1:
                raise LmforgeError(f"serve option {name} = {getattr(self, name)}: must be at least 1")
        for name in ("timeout", "template_timeout"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise LmforgeError(f"serve option {name} = {value}: must be a positive number of seconds")
        if self.api_key is not None and (not self.api_key.strip() or any(c.isspace() for c in self.api_key)):
            raise LmforgeError("serve option api_key: must be non-empty and without spaces")
        if self.batching not in ("continuous", "per-request"):
            raise LmforgeError(f"serve option batching = {self.batching!r}: use continuous or per-request")
        if self.batch_wait_ms < 0:
            raise LmforgeError(f"serve option batch_wait_ms = {self.batch_wait_ms}: must be >= 0")
