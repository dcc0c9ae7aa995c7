"""Operations (issue #15): request ids and the JSON access log, /tokenize and /detokenize, usage."""

from __future__ import annotations

import json
import logging
import threading

import pytest

from support.serve import LiveServer, make_checkpoint, wait_until

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from lmforge.cli import main  # noqa: E402
from lmforge.config import LmforgeError  # noqa: E402
from lmforge.runs import load_model  # noqa: E402
from lmforge.serve.app import build_app, load_app, load_server  # noqa: E402
from lmforge.serve.options import ServeOptions  # noqa: E402

NAME = "tiny"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ops") / "tiny")


@pytest.fixture(scope="module")
def tok(ckpt):
    return load_model(ckpt)[1]


@pytest.fixture(scope="module")
def client(ckpt):
    with TestClient(load_app(ckpt, model_name=NAME)) as c:
        yield c


def access_lines(caplog) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "lmforge.access"]


def test_request_ids_and_one_json_access_line_per_request(client, caplog):
    with caplog.at_level(logging.INFO, logger="lmforge.access"):
        r = client.get("/health", headers={"X-Request-Id": "probe-7"})
        assert r.headers["x-request-id"] == "probe-7"  # echoed
        r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "temperature": 0})
        generated = r.headers["x-request-id"]
        assert len(generated) == 32 and generated != "probe-7"
        r = client.get("/health", headers={"X-Request-Id": "bad id\twith spaces"})
        assert r.headers["x-request-id"] not in ("bad id\twith spaces", "")  # not echoed: replaced
        r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "stream": True})
        assert r.text.endswith("data: [DONE]\n\n") and r.headers["x-request-id"]
        assert client.post("/v1/completions", json={"prompt": 5}).status_code == 400
    lines = access_lines(caplog)
    assert [(x["path"], x["status"]) for x in lines] == [
        ("/health", 200),
        ("/v1/completions", 200),
        ("/health", 200),
        ("/v1/completions", 200),
        ("/v1/completions", 400),
    ]
    assert lines[0]["id"] == "probe-7" and lines[1]["id"] == generated
    assert all(x["ms"] >= 0 and x["method"] in ("GET", "POST") for x in lines)
    assert lines[3]["bytes"] == len(r.content) or lines[3]["bytes"] > 0


def test_tokenize_and_detokenize(client, tok):
    r = client.post("/tokenize", json={"model": NAME, "prompt": "Hello"})
    assert r.status_code == 200, r.text
    assert r.json() == {"tokens": tok.encode("Hello"), "count": 5, "max_model_len": 64}
    r = client.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]})
    assert r.json()["tokens"] == tok.encode("<|user|>\nHi\n<|assistant|>\n")  # as the chat template renders it
    r = client.post("/detokenize", json={"tokens": tok.encode("Hello there")})
    assert r.json() == {"prompt": "Hello there"}
    # the prompt a completion reports is the one /tokenize counts
    usage = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2}).json()["usage"]
    assert usage["prompt_tokens"] == 5
    for body, param in (
        ({"prompt": "a", "messages": [{"role": "user", "content": "x"}]}, "give exactly one"),
        ({}, "give exactly one"),
        ({"tokens": [10**6]}, "outside the model's vocabulary"),
        ({"tokens": [-1]}, "tokens"),
        ({"tokens": ["a"]}, "tokens"),
    ):
        path = "/detokenize" if "tokens" in body else "/tokenize"
        r = client.post(path, json=body)
        assert r.status_code == 400 and param in r.json()["error"]["message"], (body, r.text)
    assert client.post("/tokenize", json={"model": "gpt-4", "prompt": "a"}).status_code == 404


# ------------------------------------------------------------------------------------------- loading
def test_health_is_503_while_loading_and_200_when_ready(ckpt):

    release = threading.Event()

    def load():
        release.wait(60)
        return load_server(ckpt, model_name=NAME)

    app = build_app(ServeOptions(model_name=NAME), load=load)
    with LiveServer(app) as s, httpx.Client(base_url=s.url, timeout=30) as h:
        r = h.get("/health")
        assert r.status_code == 503 and r.json() == {"status": "loading", "model": NAME, "error": None}
        r = h.post("/v1/completions", json={"prompt": "a", "max_tokens": 1})
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        release.set()
        assert wait_until(lambda: h.get("/health").status_code == 200, timeout=60)
        assert h.post("/v1/completions", json={"prompt": "a", "max_tokens": 1}).status_code == 200


def test_a_model_that_fails_to_load_reports_it(tmp_path):

    def load():
        raise LmforgeError(f"{tmp_path}: not a checkpoint")

    failed = threading.Event()
    app = build_app(ServeOptions(model_name=NAME), load=load)
    with LiveServer(app) as s, httpx.Client(base_url=s.url, timeout=30) as h:
        app.state.on_load_failure = failed.set
        assert wait_until(lambda: h.get("/health").json()["status"] == "failed", timeout=30)
        r = h.get("/health")
        assert r.status_code == 503 and r.json()["error"] == f"{tmp_path}: not a checkpoint"
        assert "not a checkpoint" in h.get("/v1/models").json()["error"]["message"]


def test_cli_serve_exits_with_one_line_when_loading_fails(tmp_path, capsys):
    (tmp_path / "junk.txt").write_text("not a model")
    assert main(["serve", str(tmp_path), "--port", "0", "--log-level", "critical"]) == 2
    err = capsys.readouterr().err
    assert "loading the model failed" in err and "Traceback" not in err
