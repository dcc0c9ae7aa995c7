"""lmforge.serve: an OpenAI-compatible HTTP server for a model (``lmforge serve MODEL_DIR``).

Needs the ``serve`` extra (``pip install 'lmforge[serve]'``: fastapi, uvicorn); importing this package does
not import them, :func:`create_app` and :func:`load_app` do.

- :mod:`lmforge.serve.schemas`: request/response bodies and the OpenAI error object (pydantic only);
- :mod:`lmforge.serve.batcher`: batches concurrent requests into one generate call in a worker thread;
- :mod:`lmforge.serve.app`: the FastAPI app (routes, validation, limits, streaming) and the playground page.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmforge.serve.app import ServeOptions, create_app, load_app

__all__ = ["ServeOptions", "create_app", "load_app"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from lmforge.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'lmforge.serve' has no attribute {name!r}")
