"""Task datasets: templates, loss masks, left truncation, padding, the seeded resumable example sampler."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.config import load_config
from lmforge.data.tasks import (
    TASKS,
    ExampleSampler,
    TaskDataError,
    collate,
    encode_example,
    get_task,
    parse_fields,
    prepare_task_data,
    read_task_records,
    truncate,
)
from lmforge.data.tokenizer import bpe_tokenizer, char_tokenizer
from lmforge.predict.tasks import prompt_ids

ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;!?()'\"-\n"


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer([ALPHABET])


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_summarization_mask_is_completion_only(tok):
    task = get_task("summarization")
    ex = encode_example(task, {"document": "The cat sat.", "summary": "cat sat"}, tok, block_size=64)
    x, y = ex.xy()
    full = tok.decode(ex.ids.tolist())
    assert full == "The cat sat.\nTL;DR: cat sat<|endoftext|>"
    # the targets are exactly the completion and the end of text; every prompt target is -100
    assert tok.decode([int(t) for t in y if t != -100]) == " cat sat<|endoftext|>"
    n_prompt = len(tok.encode("The cat sat.\nTL;DR:"))
    assert (y[: n_prompt - 1] == -100).all() and (y[n_prompt - 1 :] != -100).all()
    assert (x == ex.ids[:-1]).all()


def test_every_task_template(tok):
    recs = {
        "translation": {"source": "hello", "target": "ellohay"},
        "classification": {"text": "good film", "label": "pos"},
        "semantic-parsing": {"text": "add 3 and 4", "parse": "(add 3 4)"},
        "generation": {"prompt": "Once", "completion": " upon"},
    }
    for name, rec in recs.items():
        task = TASKS[name]
        ex = encode_example(task, rec, tok, 128)
        _, y = ex.xy()
        target = task.completion.format(**rec) + "<|endoftext|>"
        assert tok.decode([int(t) for t in y if t != -100]) == target, name
        assert tok.decode(ex.ids.tolist()) == task.format_prompt(rec) + target


def test_chat_loss_on_assistant_turns_only(tok):
    task = get_task("chat")
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Ciao"},
    ]
    ex = encode_example(task, {"messages": msgs}, tok, 256)
    text = tok.decode(ex.ids.tolist())
    assert text == "System: Be brief.\nUser: Hi\nAssistant: Hello<|endoftext|>\nUser: Bye\nAssistant: Ciao<|endoftext|>"
    trained = tok.decode([int(i) for i, m in zip(ex.ids, ex.trained, strict=True) if m])
    assert trained == " Hello<|endoftext|> Ciao<|endoftext|>"
    # prediction prompt = history up to the last assistant turn (its turns end in <eot>, as trained), then
    # "Assistant:"; as text it encodes to the ids the prediction path uses
    prompt = task.format_prompt({"messages": msgs})
    assert prompt == "System: Be brief.\nUser: Hi\nAssistant: Hello<|endoftext|>\nUser: Bye\nAssistant:"
    assert tok.encode(prompt) == prompt_ids(task, {"messages": msgs}, tok) == ex.ids.tolist()[: len(tok.encode(prompt))]
    assert task.reference({"messages": msgs}) == "Ciao"


def test_left_truncation_keeps_completion(tok):
    task = get_task("summarization")
    doc = "word " * 40
    rec = {"document": doc.strip(), "summary": "short"}
    full = encode_example(task, rec, tok, 1000)
    ex = encode_example(task, rec, tok, 32)
    assert len(ex.ids) == 33 and ex.truncated_prompt and not ex.truncated_completion
    # the kept tokens are the LAST 33 of the full sequence: the prompt lost its beginning
    assert ex.ids.tolist() == full.ids[-33:].tolist()
    _, y = ex.xy()
    assert tok.decode([int(t) for t in y if t != -100]) == " short<|endoftext|>"


def test_truncation_of_a_too_long_completion():
    ids = list(range(10))
    mask = [False] * 3 + [True] * 7
    out, m, cut_p, cut_c = truncate(ids, mask, 5)
    # one prompt token of context is kept, then the completion's end is cut
    assert out == [2, 3, 4, 5, 6] and m == [False, True, True, True, True] and cut_p and cut_c
    assert truncate(ids, mask, 10) == (ids, mask, False, False)


def test_bpe_prompt_and_completion_encoded_separately():
    tok = bpe_tokenizer(["the cat sat on the mat. " * 50], 300)
    task = get_task("summarization")
    rec = {"document": "the cat sat", "summary": "the mat"}
    ex = encode_example(task, rec, tok, 64)
    prompt = tok.encode(task.format_prompt(rec))
    assert ex.ids.tolist() == prompt + tok.encode(" the mat") + [tok.eot_id]


def test_collate_pads_right(tok):
    task = get_task("classification")
    a = encode_example(task, {"text": "good", "label": "pos"}, tok, 64)
    b = encode_example(task, {"text": "a much longer text", "label": "neg"}, tok, 64)
    x, y = collate([a, b], pad_id=tok.pad_id)
    assert x.shape == y.shape == (2, len(b.ids) - 1)
    na = len(a.ids) - 1
    assert (x[0, na:] == tok.pad_id).all() and (y[0, na:] == -100).all()
    assert torch.equal(x[0, :na], torch.from_numpy(a.ids[:-1]))


def make_examples(tok, n: int):
    task = get_task("classification")
    return [encode_example(task, {"text": f"text {i}", "label": str(i % 3)}, tok, 64) for i in range(n)]


def test_sampler_epochs_visit_each_example_once(tok):
    exs = make_examples(tok, 10)
    s = ExampleSampler(exs, batch_size=4, pad_id=0, seed=3)
    seen = []
    for _ in range(5):  # 20 examples = two epochs exactly
        seen += s.next_indices()
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:]  # a new order every epoch
    assert s.epoch == pytest.approx(2.0)
    other = ExampleSampler(exs, batch_size=4, pad_id=0, seed=4)
    assert [other.next_indices() for _ in range(3)] != [ExampleSampler(exs, 4, 0, 3).next_indices() for _ in range(3)]


def test_sampler_resume_equals_uninterrupted(tok):
    exs = make_examples(tok, 7)
    a = ExampleSampler(exs, batch_size=3, pad_id=0, seed=1)
    ref = [a.next_batch() for _ in range(8)]
    b = ExampleSampler(exs, batch_size=3, pad_id=0, seed=1)
    for _ in range(3):
        b.next_batch()
    state = json.loads(json.dumps(b.state_dict()))  # plain values only
    c = ExampleSampler(exs, batch_size=3, pad_id=0, seed=99)
    c.load_state_dict(state)
    for x_ref, y_ref in ref[3:]:
        x, y = c.next_batch()
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_read_records_fields_and_errors(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"article": "A b.", "highlights": "A"}, {"article": "C d.", "highlights": "C"}]
    )
    recs = read_task_records(str(path), "summarization", "document=article,summary=highlights")
    assert recs == [{"document": "A b.", "summary": "A"}, {"document": "C d.", "summary": "C"}]
    with pytest.raises(TaskDataError, match=r"d\.jsonl:1: no field 'document'.*--fields document=NAME"):
        read_task_records(str(path), "summarization")
    with pytest.raises(TaskDataError, match="ROLE=FIELD"):
        parse_fields("doc=article", get_task("summarization"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x", "label": "a"}\n{not json\n', encoding="utf-8")
    with pytest.raises(TaskDataError, match=r"bad\.jsonl:2: not valid JSON"):
        read_task_records(str(bad), "classification")
    txt = tmp_path / "train.txt"
    txt.write_text("plain", encoding="utf-8")
    with pytest.raises(TaskDataError, match="plain text is for --task lm"):
        read_task_records(str(txt), "classification")
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(TaskDataError, match="no assistant message"):
        read_task_records(str(chat), "chat")
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\ngood,pos\nbad,neg\n", encoding="utf-8")
    assert read_task_records(str(csv), "classification") == [
        {"text": "good", "label": "pos"},
        {"text": "bad", "label": "neg"},
    ]


def test_prepare_task_data_split_and_labels(tmp_path, tok):
    recs = [{"text": f"item {i}", "label": ["a", "b", "c"][i % 3]} for i in range(20)]
    path = write_jsonl(tmp_path / "cls.jsonl", recs)
    cfg = load_config(overrides=["--data.path", str(path), "--data.block_size", "32", "--data.val_fraction", "0.2"])
    td = prepare_task_data(cfg, "classification", tok)
    assert td.stats["train_examples"] == 16 and td.stats["val_examples"] == 4
    assert td.labels == ["a", "b", "c"]
    got = sorted(r["text"] for r in td.train_records + td.val_records)
    assert got == sorted(r["text"] for r in recs)
    assert set(r["text"] for r in td.train_records).isdisjoint(r["text"] for r in td.val_records)
    again = prepare_task_data(cfg, "classification", tok)
    assert [r["text"] for r in again.val_records] == [r["text"] for r in td.val_records]  # seeded split
    batches = td.val_batches(3, tok.pad_id)
    assert [b[0].shape[0] for b in batches] == [3, 1]
    assert all(np.asarray(e.ids).size <= 33 for e in td.train)
