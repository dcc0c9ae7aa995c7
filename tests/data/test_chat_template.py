"""The chat template a ``--task chat`` fine-tune writes renders exactly lmforge's chat training format."""

from __future__ import annotations

import asyncio
import json

import pytest

from lmforge.data.chat_template import CHAT_TEMPLATE, write_chat_template
from lmforge.data.tasks import EOT, chat_segments, encode_segments
from lmforge.data.tokenizer import bpe_tokenizer, byte_tokenizer
from lmforge.serve.chat_template import ChatTemplate, find_chat_template
from lmforge.serve.schemas import ApiError

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ],
    [
        {"role": "system", "content": "Answer in German.\nBe brief."},
        {"role": "user", "content": "Good morning: {{ not jinja }} 'quotes' \"double\""},
        {"role": "assistant", "content": "Guten Morgen!"},
        {"role": "user", "content": "  spaced  "},
        {"role": "assistant", "content": "ok"},
    ],
    [{"role": "assistant", "content": "I start."}, {"role": "user", "content": "fine"}],
]
EOS = "<|endoftext|>"


def reference(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """data/tasks.py's training sequence as text, its end-of-text id written as ``EOS``."""
    segs = chat_segments(messages, add_generation_prompt=add_generation_prompt)
    return "".join(EOS if s is EOT else s for s, _ in segs)


def jinja_render(messages: list[dict[str, str]], add_generation_prompt: bool, **env: bool) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    tpl = ImmutableSandboxedEnvironment(**env).from_string(CHAT_TEMPLATE)
    return tpl.render(messages=messages, add_generation_prompt=add_generation_prompt, eos_token=EOS)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("env", [{}, {"trim_blocks": True, "lstrip_blocks": True}])
def test_jinja_rendering_equals_training_format(add_generation_prompt, env):
    for messages in CONVERSATIONS:
        assert jinja_render(messages, add_generation_prompt, **env) == reference(messages, add_generation_prompt)
    assert jinja_render(CONVERSATIONS[2], True).endswith("User: And 3+3?\nAssistant:")


def test_rendered_prompt_encodes_to_the_training_ids():
    """Tokenizing the rendered text gives the ids training built from segments (eot text -> eot id)."""
    text = "\n".join(m["content"] for c in CONVERSATIONS for m in c) + " System User Assistant"
    for tok in (byte_tokenizer(), bpe_tokenizer([text * 5], vocab_size=300)):
        for messages in CONVERSATIONS:
            ids, _ = encode_segments(chat_segments(messages, add_generation_prompt=True), tok)
            rendered = jinja_render(messages, True, trim_blocks=True, lstrip_blocks=True).replace(EOS, tok.eot_token)
            assert tok.encode(rendered) == ids, (tok.kind, messages)


def test_transformers_apply_chat_template_agrees(tmp_path):
    """Hugging Face's own renderer, given the written tokenizer_config.json, builds the same prompt."""
    transformers = pytest.importorskip("transformers")
    tok = byte_tokenizer()
    tok.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "model_max_length": 64})
    )
    write_chat_template(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for messages in CONVERSATIONS:
        got = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert got == reference(messages, True)


def test_serve_renders_developer_as_system_and_refuses_unknown_roles():
    tpl = ChatTemplate(CHAT_TEMPLATE, eos_token=EOS)
    got = asyncio.run(tpl.render([{"role": "developer", "content": "d"}, {"role": "user", "content": "u"}]))
    assert got == reference([{"role": "system", "content": "d"}, {"role": "user", "content": "u"}], True)
    with pytest.raises(ApiError, match="unknown role tool"):
        asyncio.run(tpl.render([{"role": "tool", "content": "x"}]))


def test_write_keeps_other_fields_and_serve_finds_it_from_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    (run / "checkpoints" / "step-0000004").mkdir(parents=True)
    (run / "task.json").write_text('{"task": "chat"}')
    (run / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}))
    write_chat_template(run)
    cfg = json.loads((run / "tokenizer_config.json").read_text())
    assert cfg == {"eos_token": EOS, "chat_template": CHAT_TEMPLATE}
    for checkpoint in (run / "best", run / "checkpoints" / "step-0000004", run):
        assert find_chat_template(checkpoint) == CHAT_TEMPLATE
    # the checkpoint's own template wins over its run's; a folder outside any run finds none
    (run / "best" / "chat_template.jinja").write_text("{{ 'own' }}")
    assert find_chat_template(run / "best") == "{{ 'own' }}"
    (tmp_path / "alone").mkdir()
    assert find_chat_template(tmp_path / "alone") is None


def test_write_task_file_writes_the_template_for_chat_only(tmp_path):
    from lmforge.runs import write_task_file

    write_task_file(tmp_path / "chat", {"task": "chat", "fields": {"messages": "messages"}})
    write_task_file(tmp_path / "summ", {"task": "summarization"})
    assert find_chat_template(tmp_path / "chat") == CHAT_TEMPLATE
    assert not (tmp_path / "summ" / "tokenizer_config.json").exists()
