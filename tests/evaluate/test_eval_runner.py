"""Evaluation runs: perplexity / bits per byte against a brute-force token loop, task reports."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.config import RecurrentConfig, TransformerConfig
from lmforge.data.tasks import encode_example, get_task
from lmforge.data.tokenizer import char_tokenizer
from lmforge.evaluate import evaluate_lm, evaluate_task
from lmforge.evaluate import metrics as M
from lmforge.models import build_model

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 .,:;!?()\n"


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer([ALPHABET])


def tiny(tok, family="transformer", ctx=16):
    torch.manual_seed(0)
    cfg = (
        TransformerConfig(n_layer=1, d_model=32, n_head=2, max_seq_len=ctx, init_std=0.2)
        if family == "transformer"
        else RecurrentConfig(family="lstm", n_layer=1, d_model=32, init_std=0.2)
    )
    return build_model(cfg, vocab_size=tok.vocab_size).eval()


@torch.no_grad()
def brute_nll(model, ids: list[int], block: int) -> float:
    """sum_t -log p(ids[t] | the tokens before t in its window); windows restart every ``block`` targets."""
    total = 0.0
    for t in range(1, len(ids)):
        start = ((t - 1) // block) * block
        logits, _ = model(torch.tensor([ids[start:t]]))
        total -= float(torch.log_softmax(logits[0, -1].double(), -1)[ids[t]])
    return total


@pytest.mark.parametrize("family", ["transformer", "lstm"])
def test_perplexity_is_exp_mean_nll(tok, family):
    model = tiny(tok, family)
    texts = ["the quick brown fox jumps over the lazy dog.", "hi", "a longer document, with some punctuation!"]
    block = 16
    report = evaluate_lm(model, tok, texts, block_size=block, batch_size=3)
    nll, n, nbytes = 0.0, 0, 0
    for i, text in enumerate(texts):
        ids = [tok.eot_id, *tok.encode(text), tok.eot_id]
        doc_nll = brute_nll(model, ids, block)
        assert report.examples[i]["nll"] == pytest.approx(doc_nll, rel=1e-4)
        assert report.examples[i]["tokens"] == len(ids) - 1
        nll, n, nbytes = nll + doc_nll, n + len(ids) - 1, nbytes + len(text.encode())
    assert report.metrics["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert report.metrics["bits_per_byte"] == pytest.approx(nll / math.log(2) / nbytes, rel=1e-4)
    assert report.metrics["tokens"] == n and report.metrics["bytes"] == nbytes
    # the batch size changes nothing
    again = evaluate_lm(model, tok, texts, block_size=block, batch_size=1)
    assert again.metrics["perplexity"] == pytest.approx(report.metrics["perplexity"], rel=1e-5)


def test_task_report_keeps_every_example(tok, tmp_path):
    model = tiny(tok, ctx=64)
    task = get_task("semantic-parsing")
    records = [{"text": f"add {i} and {i + 1}", "parse": f"(add {i} {i + 1})"} for i in range(3)]
    report = evaluate_task(model, tok, task, records, block_size=63)
    assert report.task == "semantic-parsing" and report.metrics["examples"] == 3
    preds = [e["prediction"] for e in report.examples]
    agg, _ = M.exact_match(preds, [r["parse"] for r in records])
    assert report.metrics["exact_match"] == agg["exact_match"]
    for e, r in zip(report.examples, records, strict=True):
        assert e["prompt"] == f"{r['text']}\nParse:" and e["reference"] == r["parse"]
        assert "exact_match" in e["scores"]
    # completion perplexity: brute force over the completion tokens only
    total, count = 0.0, 0
    for r in records:
        ex = encode_example(task, r, tok, 63)
        x, y = ex.xy()
        with torch.no_grad():
            logits, _ = model(torch.from_numpy(x)[None])
        logp = torch.log_softmax(logits[0].double(), -1)
        for t, target in enumerate(y.tolist()):
            if target != -100:
                total -= float(logp[t, target])
                count += 1
    assert report.metrics["completion_ppl"] == pytest.approx(math.exp(total / count), rel=1e-4)
    path = report.save(tmp_path / "r.json")
    assert path.read_text().count('"prediction"') == 3


def test_classification_report_uses_label_set(tok):
    model = tiny(tok, ctx=64)
    records = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}, {"text": "fine", "label": "pos"}]
    report = evaluate_task(model, tok, "classification", records, labels=["neg", "pos", "neutral"])
    assert all(e["prediction"] in {"neg", "pos", "neutral"} for e in report.examples)
    assert set(report.examples[0]["label_scores"]) == {"neg", "pos", "neutral"}
    assert report.info["labels"] == ["neg", "pos", "neutral"]
    with pytest.raises(Exception, match="not in the label set"):
        evaluate_task(model, tok, "classification", records, labels=["neg"])
