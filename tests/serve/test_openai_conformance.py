"""Conformance of the OpenAI-compatible API, through the official ``openai`` client against a live server:
streaming and not, ``n``, ``logprobs``, ``stop``, ``seed``, penalties, ``logit_bias``, structured output
(every reply validates), usage counts, for completions and chat. References are independent: an uncached
full forward of the same model (logprobs, penalised greedy decoding), the tokenizer's own counts, json and
jsonschema for structured replies."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from support.serve import LiveServer, make_checkpoint

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from lmforge.predict import GenerationConfig, generate_text  # noqa: E402
from lmforge.predict.generation_config import save_generation_defaults  # noqa: E402
from lmforge.runs import load_model  # noqa: E402
from lmforge.serve.app import load_app  # noqa: E402
from lmforge.serve.chat_template import PLAIN_CHAT_STOP  # noqa: E402

NAME = "tiny"
CHAT_PROMPT = "<|user|>\nHi\n<|assistant|>\n"
MESSAGES = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("conformance") / "tiny")


@pytest.fixture(scope="module")
def ref(ckpt):
    model, tok, _ = load_model(ckpt)
    return model.eval(), tok


@pytest.fixture(scope="module")
def live(ckpt):
    with LiveServer(load_app(ckpt, model_name=NAME)) as server:
        yield server


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def no_unk(ref):
    """``logit_bias`` that bans ``<unk>`` (whose text, "<unk>", would re-encode as 5 characters)."""
    return {str(ref[1].token_to_id("<unk>")): -100}


def greedy(ref, prompt: str, n: int, **kw) -> str:
    model, tok = ref
    return generate_text(model, tok, [prompt], GenerationConfig(max_new_tokens=n, **kw))[0][0]


def full_logprobs(ref, prompt: str, completion: list[int]) -> torch.Tensor:
    """(len(completion), V) log-probabilities from one uncached forward over prompt + completion."""
    model, tok = ref
    ids = tok.encode(prompt) + completion
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids[:-1]]))
    return logits[0, len(ids) - 1 - len(completion) :].float().log_softmax(-1)


def collect(stream) -> tuple[dict[int, str], dict[int, str], object]:
    """Streamed chunks -> (text per choice index, finish reason per index, usage)."""
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            piece = c.text if hasattr(c, "text") else (c.delta.content or "")
            texts[c.index] = texts.get(c.index, "") + piece
            if c.finish_reason is not None:
                reasons[c.index] = c.finish_reason
    return texts, reasons, usage


# ------------------------------------------------------------------------------- n, seed, usage
def test_n_seed_and_usage_completions(client, ref, no_unk):
    tok = ref[1]
    kw = dict(model=NAME, prompt="Once upon", max_tokens=12, temperature=1.0, n=3, seed=7, logit_bias=no_unk)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # same seed, same output
    other = client.completions.create(**{**kw, "seed": 8})
    assert [c.text for c in other.choices] != [c.text for c in a.choices]
    assert len({c.text for c in a.choices}) > 1  # n samples, not one repeated
    assert a.usage.prompt_tokens == len(tok.encode("Once upon"))
    assert a.usage.completion_tokens == sum(len(tok.encode(c.text)) for c in a.choices)
    assert a.usage.total_tokens == a.usage.prompt_tokens + a.usage.completion_tokens
    # streamed, with the usage chunk: the same texts and counts
    texts, reasons, usage = collect(
        client.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    assert [texts[i] for i in range(3)] == [c.text for c in a.choices]
    assert reasons == {i: c.finish_reason for i, c in enumerate(a.choices)}
    assert usage is not None and usage.model_dump() == a.usage.model_dump()


def test_n_seed_and_usage_chat(client, ref, no_unk):
    tok = ref[1]
    kw = dict(model=NAME, messages=MESSAGES, max_tokens=10, temperature=0.9, n=2, seed=3, logit_bias=no_unk)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.usage.prompt_tokens == len(tok.encode(CHAT_PROMPT))
    assert a.usage.completion_tokens >= sum(len(tok.encode(c.message.content)) for c in a.choices)
    texts, _, usage = collect(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert [texts[i] for i in range(2)] == [c.message.content for c in a.choices]
    assert usage is not None and usage.completion_tokens == a.usage.completion_tokens


def test_greedy_n_and_finish_reasons(client, ref):
    c = client.completions.create(model=NAME, prompt="abc", max_tokens=9, temperature=0, n=2)
    expect = greedy(ref, "abc", 9)
    assert [x.text for x in c.choices] == [expect, expect]
    assert {x.finish_reason for x in c.choices} == {"length"}


# ------------------------------------------------------------------------------------------- stop
@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_and_list(client, ref, stream):
    full = greedy(ref, "Hello", 20)
    stop = full[6:8]
    cut = full[: full.index(stop)]
    for value in (stop, ["\x00never", stop]):
        r = client.completions.create(
            model=NAME, prompt="Hello", max_tokens=20, temperature=0, stop=value, stream=stream
        )
        if stream:
            texts, reasons, _ = collect(r)
            text, reason = texts[0], reasons[0]
        else:
            text, reason = r.choices[0].text, r.choices[0].finish_reason
        assert (text, reason) == (cut, "stop")


# --------------------------------------------------------------------------------------- logprobs
@pytest.mark.parametrize("stream", [False, True])
def test_completion_logprobs_match_a_full_forward(client, ref, stream):
    tok = ref[1]
    kw = dict(model=NAME, prompt="The cat", max_tokens=8, temperature=0, logprobs=3)
    if stream:
        tokens, lps, tops = [], [], []
        for chunk in client.completions.create(**kw, stream=True):
            for c in chunk.choices:
                if c.logprobs is not None:
                    tokens += c.logprobs.tokens
                    lps += c.logprobs.token_logprobs
                    tops += c.logprobs.top_logprobs
        text = greedy(ref, "The cat", 8)
    else:
        r = client.completions.create(**kw)
        lp = r.choices[0].logprobs
        tokens, lps, tops, text = lp.tokens, lp.token_logprobs, lp.top_logprobs, r.choices[0].text
        assert lp.text_offset == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    assert "".join(tokens) == text
    ids = [tok.token_to_id(t) for t in tokens]
    expect = full_logprobs(ref, "The cat", ids)
    assert lps == pytest.approx(expect.gather(1, torch.tensor(ids)[:, None])[:, 0].tolist(), abs=1e-4)
    for top, row, chosen in zip(tops, expect, lps, strict=True):
        assert len(top) == 3
        best = row.topk(3)
        assert sorted(top.values(), reverse=True) == pytest.approx(best.values.tolist(), abs=1e-4)
        assert max(top.values()) == pytest.approx(chosen, abs=1e-4)  # greedy took the most likely token


def test_chat_logprobs(client, ref):
    tok = ref[1]
    r = client.chat.completions.create(
        model=NAME, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    assert "".join(c.token for c in content) == r.choices[0].message.content
    ids = [tok.token_to_id(c.token) for c in content]
    expect = full_logprobs(ref, CHAT_PROMPT, ids)
    for c, row, i in zip(content, expect, ids, strict=True):
        assert c.logprob == pytest.approx(float(row[i]), abs=1e-4)
        assert c.bytes == list(c.token.encode("utf-8"))
        assert [t.logprob for t in c.top_logprobs] == pytest.approx(row.topk(2).values.tolist(), abs=1e-4)
    plain = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=3, top_logprobs=2)
    assert err.value.body["param"] == "top_logprobs"


# -------------------------------------------------------------------------- penalties, logit_bias
def penalised_greedy(ref, prompt: str, n: int, presence: float, frequency: float) -> str:
    """Greedy decoding with OpenAI's penalty formula, one uncached forward per token."""
    model, tok = ref
    ids = tok.encode(prompt)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids + out]))[0][0, -1].float()
            for j in set(out):
                logits[j] -= out.count(j) * frequency + presence
            t = int(logits.argmax())
            if t == tok.eot_id:
                break
            out.append(t)
    return tok.decode(out)


def test_penalties_and_logit_bias(client, ref):
    tok = ref[1]
    r = client.completions.create(
        model=NAME, prompt="aaaa", max_tokens=16, temperature=0, presence_penalty=1.5, frequency_penalty=0.8
    )
    assert r.choices[0].text == penalised_greedy(ref, "aaaa", 16, 1.5, 0.8)
    assert r.choices[0].text != greedy(ref, "aaaa", 16)
    forced = client.completions.create(
        model=NAME, prompt="x", max_tokens=5, temperature=0, logit_bias={str(tok.token_to_id("Q")): 100}
    )
    assert forced.choices[0].text == "QQQQQ"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=NAME, prompt="x", max_tokens=2, logit_bias={"999999": 1})
    assert err.value.body["param"] == "logit_bias" and "999999" in err.value.body["message"]


# ------------------------------------------------------------------------------ structured output
SCHEMA = {
    "type": "object",
    "properties": {"label": {"type": "string", "enum": ["spam", "ham"]}, "ok": {"type": "boolean"}},
    "required": ["label", "ok"],
    "additionalProperties": False,
}
"""The longest valid reply, {"label":"spam","ok":false}, is 29 characters: it always fits max_tokens=34."""


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_every_reply_validates(client, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA}}
    r = client.chat.completions.create(
        model=NAME, messages=MESSAGES, max_tokens=34, temperature=1.2, n=5, seed=1, response_format=fmt, stream=stream
    )
    if stream:
        texts, reasons, _ = collect(r)
    else:
        texts = {c.index: c.message.content for c in r.choices}
        reasons = {c.index: c.finish_reason for c in r.choices}
    assert sorted(texts) == list(range(5))
    for i, text in texts.items():
        assert reasons[i] == "stop"
        jsonschema.validate(json.loads(text), SCHEMA)
    # completions take it too (an lmforge extension there)
    c = client.completions.create(
        model=NAME, prompt="Verdict:", max_tokens=34, temperature=0, extra_body={"response_format": fmt}
    )
    jsonschema.validate(json.loads(c.choices[0].text), SCHEMA)


def test_json_object_and_a_budget_too_small(client):
    r = client.chat.completions.create(
        model=NAME,
        messages=MESSAGES,
        max_tokens=30,
        temperature=1.0,
        n=4,
        seed=2,
        response_format={"type": "json_object"},
    )
    for c in r.choices:
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.message.content), dict)
        else:
            assert c.finish_reason == "length" and c.message.content.startswith("{")
    # the schema's shortest reply is longer than 5 tokens: cut, with "length", and not (yet) JSON
    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA}}
    r = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=5, temperature=0, response_format=fmt)
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason == "length" and text == '{"lab'
    with pytest.raises(ValueError):
        json.loads(text)


def test_guided_choice(client):
    labels = ["positive", "negative", "neutral"]
    r = client.chat.completions.create(
        model=NAME, messages=MESSAGES, max_tokens=10, temperature=1.0, n=6, seed=0, extra_body={"guided_choice": labels}
    )
    assert {c.message.content for c in r.choices} <= set(labels)
    assert {c.finish_reason for c in r.choices} == {"stop"}
    # top_k acts among the allowed tokens: top_k=1 sampling is the constrained greedy reply (before the
    # mask it could keep only a forbidden token, and then nothing)
    greedy_label = client.chat.completions.create(
        model=NAME, messages=MESSAGES, max_tokens=10, temperature=0, extra_body={"guided_choice": labels}
    )
    top1 = client.chat.completions.create(
        model=NAME,
        messages=MESSAGES,
        max_tokens=10,
        temperature=0.7,
        n=3,
        seed=4,
        extra_body={"guided_choice": labels, "top_k": 1},
    )
    assert [c.message.content for c in top1.choices] == [greedy_label.choices[0].message.content] * 3
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=NAME,
            messages=MESSAGES,
            max_tokens=10,
            response_format={"type": "json_object"},
            extra_body={"guided_choice": labels},
        )
    assert err.value.body["param"] == "guided_choice"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=NAME,
            messages=MESSAGES,
            max_tokens=10,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
        )
    assert err.value.body["param"] == "response_format.json_schema.schema"


# ------------------------------------------------------------------------------------------ metrics
def metric(url: str, name: str, **labels: str) -> float:
    import httpx

    text = httpx.get(f"{url}/metrics").text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def test_metrics_count_requests_and_rejections(live, client):
    before = metric(live.url, "lmforge_request_latency_seconds_count", endpoint="completions")
    rejected = metric(live.url, "lmforge_requests_rejected_total", status="400")
    tokens = metric(live.url, "lmforge_generation_tokens_total")
    client.completions.create(model=NAME, prompt="abc", max_tokens=5, temperature=0)
    list(client.completions.create(model=NAME, prompt="abc", max_tokens=5, temperature=0, stream=True))
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt="abc", max_tokens=5, presence_penalty=5)
    assert metric(live.url, "lmforge_request_latency_seconds_count", endpoint="completions") == before + 2
    assert metric(live.url, "lmforge_requests_rejected_total", status="400") == rejected + 1
    assert metric(live.url, "lmforge_generation_tokens_total") == tokens + 10
    assert metric(live.url, "lmforge_time_to_first_token_seconds_count") >= 2
    assert metric(live.url, "lmforge_tokens_per_second_count") >= 2
    assert metric(live.url, "lmforge_requests_running") == 0
    assert metric(live.url, "lmforge_requests_waiting") == 0


# ---------------------------------------------------------------------------- the model's defaults
def test_generation_config_defaults_and_request_overrides(ckpt, ref, tmp_path):
    model_dir = tmp_path / "with-defaults"
    shutil.copytree(ckpt, model_dir)
    save_generation_defaults(model_dir, {"max_new_tokens": 7, "do_sample": False, "repetition_penalty": 1.5})
    with LiveServer(load_app(model_dir, model_name=NAME)) as server:
        c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)
        # no max_tokens, no temperature: the model's 7 tokens, greedy, with its repetition penalty
        r = c.completions.create(model=NAME, prompt="Hello")
        assert r.choices[0].text == greedy(ref, "Hello", 7, repetition_penalty=1.5)
        assert r.usage.completion_tokens == 7
        # a request field wins over the model's default
        r = c.completions.create(model=NAME, prompt="Hello", max_tokens=3)
        assert r.choices[0].text == greedy(ref, "Hello", 3, repetition_penalty=1.5)
        r = c.completions.create(model=NAME, prompt="Hello", temperature=1.0, seed=5, n=2, max_tokens=7)
        sampled = generate_text(
            ref[0],
            ref[1],
            ["Hello"],
            GenerationConfig(max_new_tokens=7, do_sample=True, seed=5, num_return_sequences=2, repetition_penalty=1.5),
        )[0]
        assert [x.text for x in r.choices] == sampled
        chat = c.chat.completions.create(model=NAME, messages=MESSAGES)
        expect = greedy(ref, CHAT_PROMPT, 7, repetition_penalty=1.5, stop_strings=PLAIN_CHAT_STOP)
        assert chat.choices[0].message.content == expect


def test_copy_mechanism_default_is_served(ckpt, ref, tmp_path):
    """A copy bias chosen by ``lmforge tune --task`` (generation_config.json, greedy as tune writes it)
    applies to served completions."""
    model_dir = tmp_path / "copying"
    shutil.copytree(ckpt, model_dir)
    save_generation_defaults(model_dir, {"max_new_tokens": 8, "do_sample": False, "copy_bias": 4.0, "source_bias": 1.0})
    prompt = "the cat sat on the mat, the cat"
    expect = greedy(ref, prompt, 8, copy_bias=4.0, source_bias=1.0)
    assert expect != greedy(ref, prompt, 8)  # the mechanism changes this completion
    with LiveServer(load_app(model_dir, model_name=NAME)) as server:
        c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)
        assert c.completions.create(model=NAME, prompt=prompt).choices[0].text == expect
