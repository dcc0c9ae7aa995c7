"""Task prediction: constrained classification and generative prediction against brute-force loops."""

from __future__ import annotations

import random

import pytest
import torch

from lmforge.config import RecurrentConfig, TransformerConfig
from lmforge.data.tasks import get_task
from lmforge.data.tokenizer import char_tokenizer
from lmforge.models import build_model
from lmforge.predict import GenerationConfig
from lmforge.predict.tasks import classify, predict_records, prompt_ids, score_candidates

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 .,:;!?()\n"


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer([ALPHABET])


def tiny(tok, family="transformer", max_seq_len=64):
    torch.manual_seed(0)
    if family == "transformer":
        cfg = TransformerConfig(n_layer=2, d_model=32, n_head=2, max_seq_len=max_seq_len, init_std=0.3)
    else:
        cfg = RecurrentConfig(family="gru", n_layer=1, d_model=32, init_std=0.3)
    return build_model(cfg, vocab_size=tok.vocab_size).eval()


@torch.no_grad()
def brute_logprob(model, prompt: list[int], cand: list[int], longest: int = 0) -> float:
    """Sum of log p(cand[j] | prompt + cand[:j]), one fresh forward pass per token; the prompt is cut from
    the left so that it fits the model together with the longest candidate (one shared context)."""
    max_len = model.max_seq_len
    room = max(longest, len(cand))
    if max_len is not None and len(prompt) + room > max_len:
        prompt = prompt[len(prompt) + room - max_len :]
    total = 0.0
    for j in range(len(cand)):
        ctx = torch.tensor([prompt + cand[:j]])
        logits, _ = model(ctx)
        total += float(torch.log_softmax(logits[0, -1].double(), -1)[cand[j]])
    return total


@pytest.mark.parametrize("family", ["transformer", "gru"])
def test_classification_picks_max_likelihood_label(tok, family):
    model = tiny(tok, family)
    task = get_task("classification")
    labels = ["pos", "neg", "neutral", "n"]  # "n" is a prefix of "neg"/"neutral": <eot> separates them
    rng = random.Random(0)
    texts = ["".join(rng.choice("abcdefgh ") for _ in range(rng.randint(3, 30))) for _ in range(6)]
    prompts = [prompt_ids(task, {"text": t, "label": "pos"}, tok) for t in texts]
    preds, scores = classify(model, tok, prompts, labels)
    for p, pred, sc in zip(prompts, preds, scores, strict=True):
        assert pred in labels
        brute = [brute_logprob(model, p, tok.encode(" " + lab) + [tok.eot_id]) for lab in labels]
        assert sc == pytest.approx(brute, abs=1e-4)
        assert pred == labels[max(range(len(labels)), key=lambda k: brute[k])]


def test_scoring_cuts_long_prompts_from_the_left(tok):
    model = tiny(tok, max_seq_len=16)
    prompt = tok.encode("a long prompt that does not fit the context of sixteen")
    cands = [tok.encode(" yes") + [tok.eot_id], tok.encode(" no") + [tok.eot_id]]
    got = score_candidates(model, prompt, cands)
    assert got == pytest.approx([brute_logprob(model, prompt, c, longest=5) for c in cands], abs=1e-4)


def test_classification_tie_goes_to_first_label(tok):
    class Uniform(torch.nn.Module):
        max_seq_len = None

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, idx, targets=None):
            return torch.zeros(*idx.shape, tok.vocab_size) + self.w, None

    preds, _ = classify(Uniform(), tok, [tok.encode("x")], ["bb", "aa"])
    assert preds == ["bb"]


@torch.no_grad()
def brute_greedy(model, tok, prompt: list[int], max_new: int, stop: str | None) -> str:
    ids: list[int] = []
    for _ in range(max_new):
        ctx = (prompt + ids)[-model.max_seq_len :]
        logits, _ = model(torch.tensor([ctx]))
        nxt = int(logits[0, -1].argmax())
        if nxt == tok.eot_id:
            break
        ids.append(nxt)
        if stop and stop in tok.decode(ids):
            break
    text = tok.decode(ids)
    if stop and stop in text:
        text = text[: text.index(stop)]
    return text.strip()


def test_generative_prediction_is_greedy_until_stop(tok):
    model = tiny(tok)
    for name, rec in [
        ("semantic-parsing", {"text": "add 3 and 4", "parse": "(add 3 4)"}),
        ("summarization", {"document": "the cat sat on the mat.", "summary": "cat sat"}),
    ]:
        task = get_task(name)
        preds, details = predict_records(model, tok, task, [rec, rec], config=GenerationConfig(max_new_tokens=12))
        stop = task.stop[0] if task.stop else None
        expected = brute_greedy(model, tok, prompt_ids(task, rec, tok), 12, stop)
        assert preds == [expected, expected]
        assert details[0]["finish_reason"] in ("eos", "length", "stop")
