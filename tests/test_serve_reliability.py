"""Reliability and security of a live server (issue #14): dropped streams free their slot, chat templates
cannot freeze the server, API key / Host allow-list / CORS, and idle or slow connections are closed."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import pytest

from test_serve_standins import LiveServer, SlowModel, make_checkpoint, wait_until

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from lmforge.runs import load_model  # noqa: E402
from lmforge.serve.app import create_app  # noqa: E402
from lmforge.serve.options import ServeOptions  # noqa: E402

NAME = "tiny"


@pytest.fixture(scope="module")
def gru(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    """A recurrent model (no context limit: streams of thousands of tokens) and its tokenizer."""
    model, tok, _ = load_model(make_checkpoint(tmp_path_factory.mktemp("rel") / "gru", family="gru"))
    return model.eval(), tok


class SlowDecode:
    """A tokenizer whose ``decode`` blocks its caller for ``delay`` seconds. The event loop detokenizes
    streamed text, so it falls behind the engine and a stream's events pile up in its queue, as on a
    loaded machine."""

    def __init__(self, inner: Any, delay: float) -> None:
        self.inner = inner
        self.delay = delay

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @property
    def vocab_size(self) -> int:
        return self.inner.vocab_size

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text)

    def decode(self, ids: list[int]) -> str:
        time.sleep(self.delay)
        return self.inner.decode(ids)


def raw_post(port: int, path: str, body: dict, *, rcvbuf: int | None = None, headers: str = "") -> socket.socket:
    raw = json.dumps(body).encode()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(("127.0.0.1", port))
    s.sendall(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{headers}"
        f"Content-Length: {len(raw)}\r\n\r\n".encode()
        + raw
    )
    return s


def reset(s: socket.socket) -> None:
    """Close with a TCP reset, as a client process that dies does."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()


# ------------------------------------------------------------------------------------ dropped streams
def test_dropped_stream_with_queued_events_frees_its_slot_at_once(gru):
    model, tok = gru
    slow = SlowModel(model, delay=0.001)
    options = ServeOptions(model_name=NAME, max_concurrency=1, max_tokens_limit=4000, timeout=300)
    app = create_app(slow, SlowDecode(tok, 0.004), options)
    server = app.state.server
    with LiveServer(app) as s, httpx.Client(base_url=s.url, timeout=60) as h:
        body = {"prompt": "Hello", "max_tokens": 4000, "temperature": 0, "stream": True}
        client = raw_post(s.port, "/v1/completions", body, rcvbuf=4096)
        seen = b""
        while seen.count(b"data: ") < 3:  # read three events, then stop reading
            seen += client.recv(256)
        # the engine runs ahead of the (slowed) event loop: events queue up for the stalled reader
        assert wait_until(lambda: slow.steps >= 400, timeout=60)
        at_drop = slow.steps
        reset(client)
        assert wait_until(lambda: server.slots.active == 0 and not server.batcher.running, timeout=120)
        after = slow.steps - at_drop
        print(f"DROPPED_STREAM engine_steps_after_disconnect={after} of 4000")
        assert after < 300, f"the engine ran {after} more steps after the client had gone"
        r = h.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200  # the slot is free again: not 429
