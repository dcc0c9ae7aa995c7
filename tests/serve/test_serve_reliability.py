"""Reliability and security of a live server (issue #14): dropped streams free their slot, chat templates
cannot freeze the server, API key / Host allow-list / CORS, and idle or slow connections are closed."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from support.serve import LiveServer, SlowModel, make_checkpoint, wait_until

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from lmforge.config import LmforgeError  # noqa: E402
from lmforge.runs import load_model  # noqa: E402
from lmforge.serve.app import create_app  # noqa: E402
from lmforge.serve.connections import ConnectionLimits, DescriptorWarning, guarded_protocol  # noqa: E402
from lmforge.serve.options import ServeOptions  # noqa: E402
from lmforge.serve.security import default_allowed_hosts, host_name  # noqa: E402

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


def test_a_reader_that_stalls_for_ever_loses_its_slot_after_the_time_limit(gru):
    model, tok = gru
    slow = SlowModel(model, delay=0.001)
    options = ServeOptions(model_name=NAME, max_concurrency=1, max_tokens_limit=4000, timeout=2.0)
    app = create_app(slow, tok, options)
    server = app.state.server
    live = LiveServer(app)
    live.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # accepted sockets inherit it
    with live as s:
        body = {"prompt": "Hello", "max_tokens": 4000, "temperature": 0, "stream": True}
        client = raw_post(s.port, "/v1/completions", body, rcvbuf=4096)  # and never read
        try:
            assert wait_until(lambda: server.slots.active == 1, timeout=30)
            # the time limit (2 s) plus the grace for a stalled writer (5 s); a hang fails the bound
            assert wait_until(lambda: server.slots.active == 0 and not server.batcher.running, timeout=60)
            assert slow.steps < 4000  # stopped, not run to the end
        finally:
            client.close()


# --------------------------------------------------------------------------------------- chat templates
HANG = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}hi"
"""10^10 loop iterations: a template that would hold a render for hours."""


def template_threads() -> int:
    return sum(t.name == "lmforge-chat-template" for t in threading.enumerate())


def test_a_hanging_chat_template_gets_an_error_and_leaves_the_server_free(gru):
    model, tok = gru
    app = create_app(model, tok, ServeOptions(model_name=NAME, chat_template=HANG, template_timeout=1.0))
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    with LiveServer(app) as s, httpx.Client(base_url=s.url, timeout=60) as h, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(h.post, "/v1/chat/completions", json=chat)
        assert wait_until(lambda: template_threads() == 1, timeout=10)
        health = h.get("/health", timeout=5)  # answered while the render runs: the event loop is free
        assert health.status_code == 200 and not pending.done()
        r = pending.result()
        assert r.status_code == 500, r.text
        err = r.json()["error"]
        assert err["code"] == "chat_template_timeout" and "--template-timeout" in err["message"]
        assert wait_until(lambda: template_threads() == 0, timeout=30)  # the render was told to stop


def test_a_failing_chat_template_gets_a_one_line_error(gru):
    model, tok = gru
    big = "{% for i in range(10**9) %}x{% endfor %}"  # the sandbox refuses ranges over 100,000 items
    app = create_app(model, tok, ServeOptions(model_name=NAME, chat_template=big))
    with LiveServer(app) as s, httpx.Client(base_url=s.url, timeout=60) as h:
        r = h.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        assert r.status_code == 400, r.text
        message = r.json()["error"]["message"]
        assert "chat template failed: OverflowError" in message and "\n" not in message


# ---------------------------------------------------------------------------- API key, hosts, CORS
KEY = "sk-test-0123456789"


def test_api_key_host_allow_list_and_cors(gru):
    openai = pytest.importorskip("openai")
    model, tok = gru
    options = ServeOptions(model_name=NAME, api_key=KEY, allowed_hosts=default_allowed_hosts("127.0.0.1"))
    with LiveServer(create_app(model, tok, options)) as s, httpx.Client(base_url=s.url, timeout=60) as h:
        good = openai.OpenAI(base_url=f"{s.url}/v1", api_key=KEY, max_retries=0, timeout=60)
        c = good.completions.create(model=NAME, prompt="Hi", max_tokens=3, temperature=0)
        assert c.usage.completion_tokens == 3
        bad = openai.OpenAI(base_url=f"{s.url}/v1", api_key="sk-wrong", max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError) as err:
            bad.models.list()
        assert err.value.body["code"] == "invalid_api_key"
        r = h.get("/v1/models")  # no key at all
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["message"].startswith("No API key provided")
        assert h.post("/v1/completions", json={"prompt": "a"}, headers={"Authorization": KEY}).status_code == 401
        assert h.get("/").status_code == 401  # the playground page too
        assert h.get("/health").status_code == 200  # probes need no key
        # DNS rebinding: a page of evil.example that resolves to 127.0.0.1 sends its own Host
        auth = {"Authorization": f"Bearer {KEY}"}
        r = h.get("/v1/models", headers={**auth, "Host": f"evil.example:{s.port}"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host"
        assert "evil.example" in r.json()["error"]["message"]
        for host in (f"localhost:{s.port}", f"127.0.0.1:{s.port}", f"[::1]:{s.port}"):
            assert h.get("/v1/models", headers={**auth, "Host": host}).status_code == 200, host
        # CORS is off unless asked for
        preflight = {"Origin": "http://ui.example", "Access-Control-Request-Method": "POST"}
        r = h.options("/v1/completions", headers=preflight)
        assert "access-control-allow-origin" not in r.headers
        r = h.get("/v1/models", headers={**auth, "Origin": "http://ui.example"})
        assert "access-control-allow-origin" not in r.headers

    options = ServeOptions(model_name=NAME, api_key=KEY, cors_origins=["http://ui.example"])
    with LiveServer(create_app(model, tok, options)) as s, httpx.Client(base_url=s.url, timeout=60) as h:
        r = h.options("/v1/completions", headers={**preflight, "Access-Control-Request-Headers": "authorization"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://ui.example"
        r = h.get("/v1/models", headers={"Origin": "http://ui.example"})  # an error a page can read
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "http://ui.example"


def test_host_names_and_defaults():
    assert host_name("Example.COM:8000") == "example.com" and host_name("[::1]:80") == "::1"
    assert host_name("localhost") == "localhost"
    assert default_allowed_hosts("127.0.0.1") == ["127.0.0.1", "localhost", "::1"]
    assert default_allowed_hosts("0.0.0.0") is None
    with pytest.raises(LmforgeError, match="api_key"):
        ServeOptions(api_key=" ")


# ---------------------------------------------------------------------------------------- connections
def guarded_server(app: Any, **limits: Any) -> LiveServer:
    conn = ConnectionLimits(**{"header_timeout": 0.5, "body_timeout": 0.5, "keep_alive": 0.5, **limits})
    return LiveServer(app, http=guarded_protocol(conn), timeout_keep_alive=1)


def read_all(s: socket.socket, timeout: float = 20.0) -> bytes:
    """Everything the server sends until it closes the connection (a hang fails on the timeout)."""
    s.settimeout(timeout)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_idle_partial_header_and_slow_body_connections_are_closed(gru):
    model, tok = gru
    with guarded_server(create_app(model, tok, ServeOptions(model_name=NAME))) as s:
        idle = socket.create_connection(("127.0.0.1", s.port))
        assert read_all(idle) == b""  # sent nothing: closed without a word
        partial = socket.create_connection(("127.0.0.1", s.port))
        partial.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        answer = read_all(partial)
        assert answer.startswith(b"HTTP/1.1 408") and b"--header-timeout" in answer
        drip = socket.create_connection(("127.0.0.1", s.port))  # a byte at a time does not reset the timer
        closed = False
        for byte in b"GET /health HTTP/1.1\r\nX-Slow: " + b"a" * 400:
            try:
                drip.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            if select.select([drip], [], [], 0.05)[0]:  # answered (408) or closed
                closed = True
                break
        assert closed
        body = json.dumps({"prompt": "a", "max_tokens": 1}).encode()
        slow = socket.create_connection(("127.0.0.1", s.port))
        slow.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[:5]
        )
        answer = read_all(slow)
        assert answer.startswith(b"HTTP/1.1 408") and b"--body-timeout" in answer
        # a kept-alive connection is closed after its idle time
        kept = socket.create_connection(("127.0.0.1", s.port))
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = read_all(kept)
        assert answer.startswith(b"HTTP/1.1 200") and answer.count(b"HTTP/1.1") == 1
        for sock in (idle, partial, drip, slow, kept):
            sock.close()


def test_long_streams_outlive_the_read_timeouts(gru):
    model, tok = gru
    app = create_app(SlowModel(model, delay=0.02), tok, ServeOptions(model_name=NAME))
    with guarded_server(app) as s, httpx.Client(base_url=s.url, timeout=60) as h:
        body = {"prompt": "Hi", "max_tokens": 100, "temperature": 0, "stream": True}  # >= 2 s, timeouts 0.5 s
        r = h.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")


def test_the_connection_cap_closes_the_oldest_idle_connections(gru):
    model, tok = gru
    app = create_app(model, tok, ServeOptions(model_name=NAME))
    with guarded_server(app, header_timeout=60, max_connections=10) as s:
        idle = [socket.create_connection(("127.0.0.1", s.port)) for _ in range(10)]
        time.sleep(0.2)
        with httpx.Client(base_url=s.url, timeout=20) as h:
            assert h.get("/health").status_code == 200  # makes room by closing the oldest idle one
        assert read_all(idle[0], timeout=20) == b""
        registry = s.server.config.http_protocol_class.registry
        assert registry.evicted >= 1 and len(registry.open) <= 10
        for sock in idle:
            sock.close()


def test_running_out_of_descriptors_logs_one_line(caplog):
    handler = DescriptorWarning()
    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level(logging.WARNING, logger="lmforge.serve"):
            for _ in range(500):
                handler(loop, {"message": "socket.accept() out of system resource", "exception": OSError(24, "x")})
        assert len(caplog.records) == 1 and "\n" not in caplog.records[0].getMessage()
        assert "ulimit -n" in caplog.records[0].getMessage()
    finally:
        loop.close()


# ------------------------------------------------------------------------------------------ the command
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_stops_on_sigterm_while_a_template_hangs(tmp_path):
    ckpt = make_checkpoint(tmp_path / "tiny")
    template = tmp_path / "hang.jinja"
    template.write_text(HANG)
    port = _free_port()
    cmd = [sys.executable, "-m", "lmforge", "serve", str(ckpt), "--port", str(port), "--model-name", NAME]
    cmd += ["--chat-template", str(template), "--template-timeout", "600", "--header-timeout", "1"]
    env = {**os.environ, "LMFORGE_API_KEY": KEY, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {KEY}"}
    try:

        def up() -> bool:
            try:
                return httpx.get(f"{url}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_until(up, timeout=90, interval=0.2), proc.stdout.read() if proc.poll() is not None else ""
        assert httpx.get(f"{url}/v1/models").status_code == 401  # the key came from LMFORGE_API_KEY
        assert httpx.get(f"{url}/v1/models", headers=auth).status_code == 200
        evil = httpx.get(f"{url}/v1/models", headers={**auth, "Host": "evil.example"})
        assert evil.status_code == 400  # bound to 127.0.0.1: only local names by default
        idle = socket.create_connection(("127.0.0.1", port))
        assert read_all(idle) == b""  # --header-timeout 1
        idle.close()
        chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=chat, headers=auth, timeout=120)
            time.sleep(0.5)
            assert httpx.get(f"{url}/health", timeout=10).status_code == 200  # while the render hangs
            assert not pending.done()
            proc.send_signal(signal.SIGTERM)
            # a hang fails here; uvicorn re-raises the SIGTERM after its graceful shutdown
            assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
            with pytest.raises(httpx.HTTPError):
                pending.result().raise_for_status()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = proc.stdout.read()
    assert "Finished server process" in out and "Traceback" not in out, out
