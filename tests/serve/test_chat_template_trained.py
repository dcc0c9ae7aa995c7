"""A chat fine-tune served by ``lmforge serve`` answers in the format it was trained on (issue #12).

``lmforge finetune --task chat`` trains ``System: ..\\nUser: ..\\nAssistant: ..<eot>``; the run writes that
format as its chat template, ``lmforge serve`` renders chat requests with it, and the official ``openai``
client gets the memorised replies back. The rendered prompt (``/tokenize``) is checked against the ids that
training built (:func:`lmforge.data.tasks.encode_segments`)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import httpx
import pytest

from lmforge.cli import main
from lmforge.data.chat_template import CHAT_TEMPLATE
from lmforge.data.tasks import chat_segments, encode_segments
from lmforge.data.tokenizer import Tokenizer
from support.finetune import QUIET, write_jsonl
from support.serve import make_checkpoint, wait_until

SYSTEM = {"role": "system", "content": "Be brief."}
CHATS = [
    ([{"role": "user", "content": "color?"}], "blue"),
    ([{"role": "user", "content": "fruit?"}], "apple"),
    ([SYSTEM, {"role": "user", "content": "pet?"}], "dog"),
    (
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "day?"},
        ],
        "sun",
    ),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat")
    base = make_checkpoint(tmp / "base")
    data = write_jsonl(tmp / "chat.jsonl", [{"messages": [*m, {"role": "assistant", "content": a}]} for m, a in CHATS])
    out = tmp / "run"
    args = ["finetune", "--model", str(base), "--data", str(data), "--task", "chat", "--out", str(out)]
    args += ["--train.max_steps", "300", "--train.batch_size", "4", "--train.eval_interval", "300"]
    args += ["--optim.lr", "1e-2", "--optim.weight_decay", "0", "--schedule.warmup_steps", "10"]
    args += ["--data.val_fraction", "0", *QUIET, str(tmp / "cache")]
    assert main(args) == 0
    return out


def test_chat_run_writes_its_template(chat_run):
    import json

    assert json.loads((chat_run / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE


def test_served_chat_model_answers_in_its_trained_format(chat_run):
    openai = pytest.importorskip("openai")
    port = _free_port()
    cmd = [sys.executable, "-m", "lmforge", "serve", str(chat_run), "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(f"{url}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_until(up, timeout=120, interval=0.2), proc.stdout.read() if proc.poll() is not None else ""
        tok = Tokenizer.load(chat_run / "best")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        for messages, answer in CHATS:
            # the prompt the server renders is the one training built, token for token
            served = httpx.post(f"{url}/tokenize", json={"messages": messages}, timeout=30).json()["tokens"]
            trained, _ = encode_segments(chat_segments(messages, add_generation_prompt=True), tok)
            assert served == trained
            reply = client.chat.completions.create(model="run", messages=messages, temperature=0, max_tokens=12)
            assert reply.choices[0].message.content.strip() == answer, messages
            assert reply.choices[0].finish_reason == "stop"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_export_carries_the_trained_chat_template(chat_run, tmp_path):
    """``lmforge export`` of a chat run writes the trained template into the exported tokenizer_config.json,
    and transformers' own ``apply_chat_template`` renders the training format from it."""
    import json

    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    assert main(["export", str(chat_run), "--out", str(out)]) == 0
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    msgs = CHATS[2][0]
    rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered == "".join(s for s, _ in chat_segments(msgs, add_generation_prompt=True))
