"""The OpenAI-compatible app through FastAPI's TestClient: outputs against the generation engine called
directly (on a separately loaded copy of the model), batching, streaming, validation and a fuzz test."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support.serve import CONTEXT, make_checkpoint

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from lmforge.predict import GenerationConfig, generate_text  # noqa: E402
from lmforge.runs import load_model  # noqa: E402
from lmforge.serve.app import create_app, load_app  # noqa: E402
from lmforge.serve.chat_template import PLAIN_CHAT_STOP  # noqa: E402
from lmforge.serve.options import ServeOptions  # noqa: E402

NAME = "tiny"


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="session")
def ref(ckpt):
    """The reference: an independently loaded model and tokenizer, used with generate_text directly."""
    model, tok, _ = load_model(ckpt)
    return model.eval(), tok


@pytest.fixture(scope="session")
def client(ckpt):
    app = load_app(ckpt, model_name=NAME)
    with TestClient(app) as c:
        yield c


def greedy(ref, prompt: str, n: int, **kw) -> str:
    model, tok = ref
    return generate_text(model, tok, [prompt], GenerationConfig(max_new_tokens=n, **kw))[0][0]


def sse_events(text: str) -> list:
    out = []
    for block in text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            data = block[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# ------------------------------------------------------------------------------------ completions
def test_greedy_completion_equals_generate_text(client, ref):
    r = client.post(
        "/v1/completions", json={"model": NAME, "prompt": "Hello there", "max_tokens": 20, "temperature": 0}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == NAME
    (choice,) = body["choices"]
    assert choice["text"] == greedy(ref, "Hello there", 20)
    assert choice["finish_reason"] == "length" and choice["index"] == 0
    assert body["usage"] == {"prompt_tokens": 11, "completion_tokens": 20, "total_tokens": 31}


def test_several_prompts_token_ids_echo_and_n(client, ref):
    _, tok = ref
    prompts = ["abc", "The cat", "x"]
    r = client.post("/v1/completions", json={"prompt": prompts, "max_tokens": 7, "temperature": 0, "n": 2})
    texts = [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
    expect = [greedy(ref, p, 7) for p in prompts]
    assert texts == [e for e in expect for _ in range(2)]  # greedy n=2: the same completion twice, per prompt
    r = client.post(
        "/v1/completions", json={"prompt": [tok.encode(p) for p in prompts], "max_tokens": 7, "temperature": 0}
    )
    assert [c["text"] for c in r.json()["choices"]] == expect
    r = client.post(
        "/v1/completions", json={"prompt": tok.encode("abc"), "max_tokens": 7, "temperature": 0, "echo": True}
    )
    assert r.json()["choices"][0]["text"] == "abc" + expect[0]


def test_sampling_with_seed_equals_engine(client, ref):
    model, tok = ref
    body = {"prompt": "Once", "max_tokens": 12, "temperature": 0.9, "top_p": 0.8, "top_k": 20, "seed": 7, "n": 3}
    r = client.post("/v1/completions", json=body)
    texts = [c["text"] for c in r.json()["choices"]]
    cfg = GenerationConfig(
        max_new_tokens=12, do_sample=True, temperature=0.9, top_p=0.8, top_k=20, seed=7, num_return_sequences=3
    )
    assert texts == generate_text(model, tok, ["Once"], cfg)[0]
    assert len(set(texts)) > 1


def test_beam_search_and_stop_strings(client, ref):
    model, tok = ref
    r = client.post(
        "/v1/completions", json={"prompt": "abc", "max_tokens": 10, "temperature": 0, "num_beams": 3, "n": 2}
    )
    expect = generate_text(
        model, tok, ["abc"], GenerationConfig(max_new_tokens=10, num_beams=3, num_return_sequences=2)
    )[0]
    assert [c["text"] for c in r.json()["choices"]] == expect
    # a stop string the greedy completion contains: the text is cut before it, finish_reason "stop"
    full = greedy(ref, "Hello", 20)
    stop = full[5:7]
    r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 20, "temperature": 0, "stop": [stop]})
    choice = r.json()["choices"][0]
    assert choice["text"] == greedy(ref, "Hello", 20, stop_strings=[stop]) == full[: full.index(stop)]
    assert choice["finish_reason"] == "stop"


def test_streaming_matches_non_streaming(client, ref):
    full = greedy(ref, "Hello", 20)
    stop = full[8:10]
    body = {
        "prompt": "Hello",
        "max_tokens": 20,
        "temperature": 0,
        "stream": True,
        "stop": stop,
        "stream_options": {"include_usage": True},
    }
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["prompt_tokens"] == 5
    chunks = events[:-2]
    assert len(chunks) > 3  # token by token, not one piece
    assert "".join(c["choices"][0]["text"] for c in chunks) == full[: full.index(stop)]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


# ------------------------------------------------------------------------------------------- chat
def test_chat_plain_template(client, ref):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    prompt = "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"  # the documented plain template
    expect = greedy(ref, prompt, 12, stop_strings=PLAIN_CHAT_STOP)
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expect}
    assert body["usage"]["prompt_tokens"] == len(prompt)  # one character, one token
    # streamed: the role first, then the content in pieces, then the finish reason
    r = client.post(
        "/v1/chat/completions", json={"messages": messages, "max_tokens": 12, "temperature": 0, "stream": True}
    )
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content", "") for d in deltas) == expect
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_chat_template_from_tokenizer_config(ckpt, ref, tmp_path):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    model, tok = ref
    from lmforge.serve.chat_template import find_chat_template

    found = find_chat_template(tmp_path)
    assert found == template
    app = create_app(model, tok, ServeOptions(model_name=NAME, chat_template=found))
    with TestClient(app) as c:
        r = c.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": 0},
        )
    prompt = "[user] Hi\n[assistant] "
    assert r.json()["choices"][0]["message"]["content"] == greedy(ref, prompt, 8)
    assert r.json()["usage"]["prompt_tokens"] == len(prompt)


def test_recurrent_model_without_context_limit(tmp_path):
    ckpt = make_checkpoint(tmp_path / "gru", family="gru")
    model, tok, _ = load_model(ckpt)
    app = load_app(ckpt, model_name=NAME, default_chat_max_tokens=9, max_tokens_limit=200)
    with TestClient(app) as c:
        assert c.get("/v1/models").json()["data"][0]["max_model_len"] is None
        r = c.post("/v1/completions", json={"prompt": "a" * 100, "max_tokens": 120, "temperature": 0})
        assert r.status_code == 200, r.text  # beyond 64 tokens: a recurrent model has no context limit
        assert r.json()["choices"][0]["text"] == greedy((model, tok), "a" * 100, 120)
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "temperature": 0})
        assert r.json()["usage"]["completion_tokens"] <= 9  # the server's default for chat
        r = c.post("/v1/completions", json={"prompt": "a", "max_tokens": 201})
        assert r.status_code == 400 and "200" in r.json()["error"]["message"]


# --------------------------------------------------------------------------------------- batching
def test_concurrent_requests_are_batched_and_equal_alone(ref):
    model, tok = ref
    app = create_app(model, tok, ServeOptions(model_name=NAME, batch_wait_ms=300))
    prompts = ["a", "Hello world", "xyz", "The quick brown fox", "0123", "q"]
    with TestClient(app) as c:
        server = app.state.server

        def ask(p: str) -> str:
            r = c.post("/v1/completions", json={"prompt": p, "max_tokens": 10, "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        with ThreadPoolExecutor(len(prompts)) as pool:
            got = list(pool.map(ask, prompts))
        assert server.batcher.jobs_run == len(prompts)
        assert server.batcher.batches_run <= 2  # all six arrive within the batching window
    assert got == [greedy(ref, p, 10) for p in prompts]


# ------------------------------------------------------------------------------------- validation
BAD = [
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [[1, 2], []]}, 400, "prompt"),
    ({"prompt": [100000]}, 400, "prompt"),
    ({"prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**12}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 5000}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": "16"}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 2.5}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ({"prompt": "x", "temperature": 3}, 400, "temperature"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "n": 3, "num_beams": 2}, 400, "n"),
    ({"prompt": "x", "num_beams": 99}, 400, "num_beams"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": "x", "stop": ""}, 400, "stop"),
    ({"prompt": "x", "seed": -1}, 400, "seed"),
    ({"prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ({"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ({"prompt": "x", "logprobs": 2, "echo": True}, 400, "echo"),
    ({"prompt": "x", "logprobs": 0, "num_beams": 2}, 400, "logprobs"),
    ({"prompt": "x", "guided_choice": []}, 400, "guided_choice"),
    ({"prompt": "x", "response_format": {"type": "json_schema"}}, 400, "response_format"),
    ({"prompt": "x", "logit_bias": {"100000": 1}}, 400, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"1": 101}}, 400, "logit_bias.1"),
    ({"prompt": "x", "logit_bias": {"²": 1}}, 400, "logit_bias"),
    ({"prompt": "x", "max_token": 5}, 400, "max_token"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ({"max_tokens": 5}, 400, "prompt"),
]


@pytest.mark.parametrize("body,status,param", BAD, ids=[json.dumps(b)[:40] for b, _, _ in BAD])
def test_bad_completion_requests(client, body, status, param):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param
    assert param in err["message"]


def test_nan_and_context_messages(client):
    r = client.post(
        "/v1/completions", content=b'{"prompt": "x", "temperature": NaN}', headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = client.post("/v1/completions", json={"prompt": "a" * 40, "max_tokens": 30})
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert str(CONTEXT) in msg and "40" in msg and "30" in msg  # the context, the prompt and max_tokens
    assert r.json()["error"]["code"] == "context_length_exceeded"


BAD_CHAT = [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": ""}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 500}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
]


@pytest.mark.parametrize("body,param", BAD_CHAT, ids=[json.dumps(b)[:40] for b, _ in BAD_CHAT])
def test_bad_chat_requests(client, body, param):
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_malformed_bodies(client):
    cases = [
        (b"{not json", "application/json", 400),
        (b"[1, 2]", "application/json", 400),
        (b'{"prompt": "x"}', "text/plain", 400),
        (b"\xff\xfe\x00", "application/json", 400),
        (b"", "application/json", 400),
        (b'{"prompt": "ab\\ud800"}', "application/json", 400),  # a lone surrogate: not encodable text
        (b'{"prompt": "x", "model": "\\udfff"}', "application/json", 404),
    ]
    for data, ctype, status in cases:
        r = client.post("/v1/completions", content=data, headers={"content-type": ctype})
        assert r.status_code == status, (data, r.text)
        assert "error" in r.json()
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert "not valid JSON" in r.json()["error"]["message"]


def test_oversized_bodies(client):
    big = json.dumps({"prompt": "x" * 1_100_000}).encode()
    r = client.post("/v1/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "1000000" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: counted while it arrives
        for _ in range(20):
            yield b"x" * 100_000

    r = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert client.get("/health").json()["active"] == 0


def test_models_health_openapi_and_404(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [NAME]
    assert models["data"][0]["max_model_len"] == CONTEXT
    assert client.get(f"/v1/models/{NAME}").json()["id"] == NAME
    assert client.get("/v1/models/other").status_code == 404
    assert client.get("/health").json()["status"] == "ok"
    spec = client.get("/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"} <= set(spec["paths"])
    assert "CompletionRequest" in spec["components"]["schemas"]
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert client.get("/v1/completions").status_code == 405
    page = client.get("/")
    assert page.status_code == 200 and "<textarea" in page.text and "http" not in page.text.split("<script>")[1]


# ------------------------------------------------------------------------------------------- fuzz
GOOD_COMPLETION = {"model": NAME, "prompt": "Hello", "max_tokens": 6, "temperature": 0}
GOOD_CHAT = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0}
KNOWN = {
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "n",
    "num_beams",
    "stream",
    "stream_options",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "user",
    "echo",
    "logprobs",
    "best_of",
    "suffix",
    "top_logprobs",
    "response_format",
    "guided_choice",
    "tools",
    "tool_choice",
}

surrogate = st.characters(categories=["Cs"])  # a lone surrogate: valid as a JSON escape, not as UTF-8
with_surrogate = st.tuples(st.text(max_size=4), surrogate, st.text(max_size=4)).map("".join)
not_a_number = st.one_of(
    st.text(max_size=8),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
not_an_int = st.one_of(not_a_number, st.floats(allow_nan=True, allow_infinity=True))
bad_float = st.one_of(not_a_number, st.sampled_from([math.nan, math.inf, -math.inf]))
BAD_VALUES = {
    "temperature": st.one_of(bad_float, st.floats(max_value=-1e-6), st.floats(min_value=2.000001)),
    "top_p": st.one_of(bad_float, st.floats(max_value=0), st.floats(min_value=1.000001)),
    "max_tokens": st.one_of(not_an_int, st.integers(max_value=0), st.integers(min_value=CONTEXT + 1)),
    "n": st.one_of(not_an_int, st.integers(max_value=0), st.integers(min_value=17)),
    "num_beams": st.one_of(not_an_int, st.integers(max_value=0), st.integers(min_value=17)),
    "top_k": st.one_of(not_an_int, st.integers(max_value=-1)),
    "seed": st.one_of(not_an_int, st.integers(max_value=-1), st.integers(min_value=2**63)),
    "stream": st.one_of(st.text(max_size=4), st.integers(), st.floats()),
    "stop": st.one_of(
        with_surrogate,
        st.just(""),
        st.integers(),
        st.lists(st.text(min_size=1, max_size=3), min_size=5, max_size=6),
        st.lists(st.just(""), min_size=1, max_size=3),
        st.text(min_size=257, max_size=300),
    ),
    "model": st.one_of(st.text(max_size=10).filter(lambda s: s != NAME), with_surrogate, st.integers()),
    "presence_penalty": st.one_of(bad_float, st.floats(max_value=-2.01), st.floats(min_value=2.01)),
    "logit_bias": st.one_of(
        st.dictionaries(
            st.text(min_size=1, max_size=3).filter(lambda k: not (k.strip().isascii() and k.strip().isdigit())),
            st.floats(-5, 5),
            min_size=1,
            max_size=2,
        ),
        st.integers(),
    ),
    "stream_options": st.one_of(st.integers(), st.text(max_size=3), st.just({"include_usage": "no"})),
}
BAD_PROMPT = st.one_of(
    st.just(""),
    with_surrogate,
    st.lists(with_surrogate, min_size=1, max_size=2),
    st.just([]),
    st.integers(),
    st.floats(),
    st.booleans(),
    st.lists(st.integers(max_value=-1), min_size=1, max_size=3),
    st.lists(st.integers(min_value=102, max_value=10**9), min_size=1, max_size=3),
    st.lists(st.one_of(st.none(), st.floats()), min_size=1, max_size=3),
    st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
)
BAD_MESSAGES = st.one_of(
    st.just([]),
    st.text(max_size=5),
    st.integers(),
    st.lists(
        st.fixed_dictionaries(
            {
                "role": st.text(max_size=6).filter(lambda r: r not in ("system", "user", "assistant", "developer")),
                "content": st.text(max_size=5),
            }
        ),
        min_size=1,
        max_size=2,
    ),
    st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": with_surrogate}), min_size=1, max_size=2),
    st.just([{"role": "user"}]),
    st.just([{"role": "user", "content": ""}]),
    st.just([{"role": "user", "content": [{"type": "image", "url": "x"}]}]),
)


@st.composite
def malformed(draw):
    """(path, raw body bytes, content type) of a request that must be refused with a 4xx."""
    chat = draw(st.booleans())
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = dict(GOOD_CHAT if chat else GOOD_COMPLETION)
    # one main fault (mostly a bad field value), sometimes with more bad field values
    kinds = [
        draw(
            st.sampled_from(["field"] * 6 + ["main"] * 3 + ["unknown", "missing", "json", "toplevel", "bytes", "ctype"])
        )
    ]
    kinds += ["field"] * draw(st.integers(0, 2))
    ctype = "application/json"
    raw = None
    for kind in kinds:
        if kind == "field":
            name = draw(st.sampled_from(sorted(BAD_VALUES)))
            body[name] = draw(BAD_VALUES[name])
        elif kind == "main":
            body["messages" if chat else "prompt"] = draw(BAD_MESSAGES if chat else BAD_PROMPT)
        elif kind == "unknown":
            key = draw(st.one_of(st.text(min_size=1, max_size=12), with_surrogate).filter(lambda k: k not in KNOWN))
            body[key] = draw(not_an_int)
        elif kind == "missing":
            body.pop("messages" if chat else "prompt", None)
        elif kind == "json":
            text = json.dumps(body)
            raw = text[: draw(st.integers(0, len(text) - 1))].encode()  # cut short: never a whole object
        elif kind == "toplevel":
            raw = json.dumps(
                draw(st.one_of(st.lists(st.integers(), max_size=3), st.integers(), st.text(max_size=5), st.none()))
            ).encode()
        elif kind == "bytes":
            raw = draw(st.binary(max_size=40))
        else:
            ctype = draw(st.sampled_from(["text/plain", "application/x-www-form-urlencoded", ""]))
    if raw is None:
        raw = json.dumps(body).encode()  # NaN / Infinity are written as JSON5-style literals, as clients may
    return path, raw, ctype


def test_fuzz_malformed_requests_get_4xx_and_server_unchanged(client, ref):
    good = client.post("/v1/completions", json=GOOD_COMPLETION).json()["choices"][0]["text"]
    assert good == greedy(ref, "Hello", 6)

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
    @given(case=malformed())
    def check(case):
        path, raw, ctype = case
        headers = {"content-type": ctype} if ctype else {}
        r = client.post(path, content=raw, headers=headers)  # TestClient re-raises any server exception
        assert 400 <= r.status_code < 500, (path, raw[:200], r.status_code, r.text[:300])
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"]

    check()
    for _ in range(2):  # the server still answers a known-good request, identically
        r = client.post("/v1/completions", json=GOOD_COMPLETION)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == good
    assert client.get("/health").json()["active"] == 0
