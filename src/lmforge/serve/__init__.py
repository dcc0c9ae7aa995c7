"""lmforge.serve: an OpenAI-compatible HTTP server for a model (``lmforge serve MODEL_DIR``).

Needs the ``serve`` extra (``pip install 'lmforge[serve]'``: fastapi, uvicorn); importing this package does
not import them, :func:`create_app` and :func:`load_app` do.

- :mod:`lmforge.serve.options`: :class:`ServeOptions`, the server's limits and settings;
- :mod:`lmforge.serve.schemas`: request/response bodies and the OpenAI error object (pydantic only);
- :mod:`lmforge.serve.validation`: pydantic errors and non-UTF-8 text -> OpenAI-style error messages;
- :mod:`lmforge.serve.chat_template`: chat messages -> one prompt (the model's Jinja template or the plain one);
- :mod:`lmforge.serve.prepare`: a request checked against the model and the limits -> prompts + engine config;
- :mod:`lmforge.serve.batcher`: batches concurrent requests into one generate call in a worker thread;
- :mod:`lmforge.serve.responses`: engine output -> JSON bodies and server-sent-event chunks;
- :mod:`lmforge.serve.http`: body-size limit, concurrency slots, the event-stream and error responses;
- :mod:`lmforge.serve.security`: the ``Host`` allow-list and the API key (middleware);
- :mod:`lmforge.serve.access_log`: request ids and one JSON access-log line per request (middleware);
- :mod:`lmforge.serve.handler`: the :class:`~lmforge.serve.handler.Server` and one request's path through it;
- :mod:`lmforge.serve.app`: the FastAPI app (routes, error handlers), :func:`load_app` / :func:`loading_app`
  (``/health`` 503 while the model loads) and the playground page;
- :mod:`lmforge.serve.connections`: below the app: read timeouts, the connection cap, descriptor warnings,
  :func:`~lmforge.serve.connections.run_server` (uvicorn).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmforge.serve.options import ServeOptions

if TYPE_CHECKING:
    from lmforge.serve.app import create_app, load_app

__all__ = ["ServeOptions", "create_app", "load_app"]


def __getattr__(name: str) -> Any:
    # create_app and load_app need fastapi (the optional 'serve' extra): imported on first use only
    if name in ("create_app", "load_app"):
        from lmforge.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'lmforge.serve' has no attribute {name!r}")
