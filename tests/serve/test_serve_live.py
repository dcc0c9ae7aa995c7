"""A live server on 127.0.0.1: the official ``openai`` client, the ``lmforge serve`` command, the concurrency
limit (429), the time limit (504), disconnecting clients, and the playground page in headless Chromium."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from support.serve import LiveServer, SlowModel, make_checkpoint, wait_until

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from lmforge.predict import GenerationConfig, generate_text  # noqa: E402
from lmforge.runs import load_model  # noqa: E402
from lmforge.serve.app import create_app, load_app  # noqa: E402
from lmforge.serve.chat_template import PLAIN_CHAT_STOP  # noqa: E402
from lmforge.serve.options import ServeOptions  # noqa: E402

NAME = "tiny"
ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve-live") / "tiny")


@pytest.fixture(scope="module")
def ref(ckpt):
    model, tok, _ = load_model(ckpt)
    return model.eval(), tok


@pytest.fixture(scope="module")
def live(ckpt):
    with LiveServer(load_app(ckpt, model_name=NAME)) as server:
        yield server


def greedy(ref, prompt: str, n: int, **kw) -> str:
    model, tok = ref
    return generate_text(model, tok, [prompt], GenerationConfig(max_new_tokens=n, **kw))[0][0]


def slow_app(ref, delay: float, **options) -> object:
    """An app whose model sleeps ``delay`` seconds per decoding step (a separate model copy is not needed:
    the wrapper only reads the reference model)."""
    model, tok = ref
    return create_app(SlowModel(model, delay), tok, ServeOptions(model_name=NAME, **options))


# ---------------------------------------------------------------------------------- openai client
def test_openai_client_completions_chat_and_streaming(live, ref):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="x", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == [NAME]

    c = client.completions.create(model=NAME, prompt="Hello there", max_tokens=15, temperature=0)
    assert c.choices[0].text == greedy(ref, "Hello there", 15)
    assert c.choices[0].finish_reason == "length" and c.usage.completion_tokens == 15

    chunks = list(
        client.completions.create(model=NAME, prompt="Hello there", max_tokens=15, temperature=0, stream=True)
    )
    assert len(chunks) > 2 and "".join(ch.choices[0].text for ch in chunks) == c.choices[0].text

    messages = [{"role": "user", "content": "Hi"}]
    prompt = "<|user|>\nHi\n<|assistant|>\n"
    expect = greedy(ref, prompt, 10, stop_strings=PLAIN_CHAT_STOP)
    chat = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content == expect
    stream = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    parts, usage = [], None
    for ch in stream:
        if ch.usage is not None:
            usage = ch.usage
        if ch.choices:
            parts.append(ch.choices[0].delta.content or "")
    assert "".join(parts) == expect and usage.prompt_tokens == len(prompt)

    beam = client.completions.create(
        model=NAME, prompt="abc", max_tokens=8, temperature=0, n=2, extra_body={"num_beams": 3}
    )
    model, tok = ref
    cfg = GenerationConfig(max_new_tokens=8, num_beams=3, num_return_sequences=2)
    assert [ch.text for ch in beam.choices] == generate_text(model, tok, ["abc"], cfg)[0]

    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=NAME, prompt="Hello", max_tokens=100)
    assert err.value.body["param"] == "max_tokens" and "64" in err.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="Hello", max_tokens=1)


# ------------------------------------------------------------------------------------ the command
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve(ckpt, ref):
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "lmforge",
        "serve",
        str(ckpt),
        "--port",
        str(port),
        "--model-name",
        "cli-model",
        "--max-concurrency",
        "3",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(f"{url}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_until(up, timeout=60, interval=0.2), proc.stdout.read() if proc.poll() is not None else ""
        health = httpx.get(f"{url}/health").json()
        assert health["model"] == "cli-model" and health["max_concurrency"] == 3
        r = httpx.post(
            f"{url}/v1/completions",
            json={"model": "cli-model", "prompt": "Hello", "max_tokens": 12, "temperature": 0},
            timeout=30,
        )
        assert r.json()["choices"][0]["text"] == greedy(ref, "Hello", 12)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_cli_serve_errors(tmp_path, monkeypatch, capsys):
    from lmforge.cli import main

    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if the 'serve' extra were not installed
    assert main(["serve", str(tmp_path)]) == 2
    assert "pip install 'lmforge[serve]'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ limits
SLOW = {"prompt": "Hello", "max_tokens": 50, "temperature": 0}


def test_429_when_all_slots_are_taken(ref):
    app = slow_app(ref, delay=0.04, max_concurrency=2, timeout=30)
    with LiveServer(app) as s, httpx.Client(base_url=s.url, timeout=30) as h, ThreadPoolExecutor(2) as pool:
        # two slow requests hold both slots (running, or queued behind the running batch)
        holders = [
            pool.submit(h.post, "/v1/completions", json={**SLOW, "max_tokens": 25, "stream": stream})
            for stream in (False, True)
        ]
        assert wait_until(lambda: h.get("/health").json()["active"] == 2)
        r = h.post("/v1/completions", json={**SLOW, "max_tokens": 1})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        assert h.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}).status_code == 429
        done = [f.result() for f in holders]
        assert [r.status_code for r in done] == [200, 200]
        assert done[1].text.endswith("data: [DONE]\n\n")
        assert wait_until(lambda: h.get("/health").json()["active"] == 0)
        assert h.post("/v1/completions", json={**SLOW, "max_tokens": 2}).status_code == 200


def test_504_after_the_time_limit_frees_the_slot_and_stops_the_engine(ref):
    app = slow_app(ref, delay=0.05, max_concurrency=1, timeout=0.6)
    server = app.state.server
    with LiveServer(app) as s, httpx.Client(base_url=s.url, timeout=30) as h:
        t0 = time.monotonic()
        r = h.post("/v1/completions", json=SLOW)  # 50 tokens x 0.05 s: far beyond 0.6 s
        assert r.status_code == 504 and time.monotonic() - t0 < 2.5
        err = r.json()["error"]
        assert err["code"] == "timeout" and "0.6" in err["message"]
        assert h.get("/health").json()["active"] == 0
        assert wait_until(lambda: not server.batcher.running, timeout=2)  # cancelled between two tokens
        assert server.model.steps < 40
        # streamed: the response has started, so the time limit arrives as an error event
        with h.stream("POST", "/v1/completions", json={**SLOW, "stream": True}) as resp:
            events = [line for line in resp.iter_lines() if line.startswith("data: ")]
        assert json.loads(events[-1][6:])["error"]["code"] == "timeout" and "data: [DONE]" not in events
        assert wait_until(lambda: h.get("/health").json()["active"] == 0)
        assert h.post("/v1/completions", json={**SLOW, "max_tokens": 2}).status_code == 200


def test_disconnect_frees_the_slot_and_stops_the_engine(ref):
    app = slow_app(ref, delay=0.05, max_concurrency=1, timeout=60)
    server = app.state.server
    with LiveServer(app) as s, httpx.Client(base_url=s.url, timeout=30) as h:
        # a streaming client reads one chunk and goes away
        with (
            httpx.Client(base_url=s.url, timeout=30) as gone,
            gone.stream("POST", "/v1/completions", json={**SLOW, "stream": True}) as resp,
        ):
            lines = resp.iter_lines()  # kept: dropping the iterator would close the connection already
            first = next(lines)
            assert first.startswith("data: ") and "error" not in first, first
            assert h.get("/health").json()["active"] == 1
        assert wait_until(lambda: h.get("/health").json()["active"] == 0, timeout=3)
        assert wait_until(lambda: not server.batcher.running, timeout=2)
        steps = server.model.steps
        assert steps < 45
        # a non-streaming client closes its socket while waiting
        body = json.dumps(SLOW).encode()
        with socket.create_connection(("127.0.0.1", s.port)) as raw:
            raw.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            assert wait_until(lambda: h.get("/health").json()["active"] == 1, timeout=3)
            time.sleep(0.2)
        assert wait_until(lambda: h.get("/health").json()["active"] == 0, timeout=3)
        assert wait_until(lambda: not server.batcher.running, timeout=2)
        assert server.model.steps - steps < 45
        r = h.post("/v1/completions", json={**SLOW, "max_tokens": 3})  # the slot is free again: not 429
        assert r.status_code == 200


# -------------------------------------------------------------------------------------- playground
def test_playground_in_headless_chromium(ref):
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):  # .ci/run installs it: a CI run must exercise the playground, not skip it
            pytest.fail(f"{CHROMIUM} is not installed under CI (.ci/run installs it with apt-get)")
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    app = slow_app(ref, delay=0.02, timeout=60)
    expect = greedy(ref, "Hello there", 30)
    ARTIFACTS.mkdir(exist_ok=True)
    with LiveServer(app) as s, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            page.goto(s.url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('tiny')")
            page.fill("#prompt", "Hello there")
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "30")
            # count the updates of the completion: streamed text arrives in many pieces
            page.evaluate("""() => { window.updates = 0; new MutationObserver(() => window.updates++)
                .observe(document.getElementById('output'), {subtree: true, childList: true, characterData: true}); }""")
            page.click("#generate")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('done')", timeout=30000)
            assert page.text_content("#completion") == expect
            assert page.evaluate("window.updates") > 5
            assert "finish: length" in page.text_content("#status")
            page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)
        finally:
            browser.close()
    assert (ARTIFACTS / "playground.png").stat().st_size > 1000
