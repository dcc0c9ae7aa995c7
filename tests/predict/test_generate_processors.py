"""Logits processors against straightforward reference implementations and HF transformers' own processors."""

from __future__ import annotations

import pytest
import torch

from lmforge.predict import GenerationConfig, generate
from lmforge.predict.processors import (
    LogitsProcessorList,
    NoRepeatNGramProcessor,
    RepetitionPenaltyProcessor,
    TemperatureProcessor,
    TopKProcessor,
    TopPProcessor,
    build_processors,
)
from support.generate import TinyGRU, uncached_greedy


def _scores(B: int = 3, V: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, V, generator=g) * 3


def ref_repetition(ids: list[list[int]], scores: torch.Tensor, penalty: float) -> torch.Tensor:
    out = scores.clone()
    for b, row in enumerate(ids):
        for t in {t for t in row if t >= 0}:
            s = float(scores[b, t])
            out[b, t] = s * penalty if s < 0 else s / penalty
    return out


def ref_no_repeat(ids: list[list[int]], scores: torch.Tensor, n: int) -> torch.Tensor:
    out = scores.clone()
    for b, row in enumerate(ids):
        row = [t for t in row if t >= 0]  # padding is left padding: the real tokens are contiguous
        if len(row) < n - 1:
            continue
        prefix = tuple(row[len(row) - n + 1 :]) if n > 1 else ()
        for i in range(len(row) - n + 1):
            if tuple(row[i : i + n - 1]) == prefix:
                out[b, row[i + n - 1]] = float("-inf")
    return out


IDS = [[-1, -1, 3, 5, 3, 5, 7, 3], [1, 2, 1, 2, 1, 2, 1, 2], [-1, -1, -1, -1, -1, 0, 4, 0]]


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_reference(penalty):
    scores = _scores()
    got = RepetitionPenaltyProcessor(penalty)(torch.tensor(IDS), scores)
    assert torch.allclose(got, ref_repetition(IDS, scores, penalty), rtol=1e-6, atol=0)
    assert torch.equal(scores, _scores())  # input left alone


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeat_ngram_matches_reference(n):
    scores = _scores()
    got = NoRepeatNGramProcessor(n)(torch.tensor(IDS), scores)
    assert torch.equal(got, ref_no_repeat(IDS, scores, n))


def test_top_k_top_p_temperature_reference():
    scores = _scores(B=4, V=20)
    ids = torch.zeros(4, 0, dtype=torch.long)
    got = TopKProcessor(5)(ids, scores)
    for b in range(4):
        kth = sorted(scores[b].tolist(), reverse=True)[4]
        keep = scores[b] >= kth
        assert torch.equal(torch.isfinite(got[b]), keep)
        assert torch.equal(got[b][keep], scores[b][keep])
    p = 0.7
    got = TopPProcessor(p)(ids, scores)
    for b in range(4):
        probs = scores[b].softmax(-1)
        order = probs.argsort(descending=True).tolist()
        kept, mass = set(), 0.0
        for i in order:  # the smallest prefix of the most likely tokens with mass >= p
            kept.add(i)
            mass += float(probs[i])
            if mass >= p:
                break
        assert {i for i in range(20) if torch.isfinite(got[b, i])} == kept
    assert torch.allclose(TemperatureProcessor(0.5)(ids, scores), scores * 2)


def test_processors_match_hf_transformers():
    tr = pytest.importorskip("transformers.generation.logits_process")
    ids = torch.tensor([[3, 5, 3, 5, 7, 3], [1, 2, 1, 2, 1, 2]])  # HF has no padding convention: none here
    scores = _scores(B=2, V=12)
    pairs = [
        (RepetitionPenaltyProcessor(1.5), tr.RepetitionPenaltyLogitsProcessor(1.5)),
        (NoRepeatNGramProcessor(2), tr.NoRepeatNGramLogitsProcessor(2)),
        (NoRepeatNGramProcessor(3), tr.NoRepeatNGramLogitsProcessor(3)),
        (TemperatureProcessor(0.7), tr.TemperatureLogitsWarper(0.7)),
        (TopKProcessor(4), tr.TopKLogitsWarper(4)),
        (TopPProcessor(0.6), tr.TopPLogitsWarper(0.6)),
    ]
    for ours, theirs in pairs:
        assert torch.equal(ours(ids, scores), theirs(ids, scores.clone())), type(ours).__name__


def test_build_processors_hf_order_and_only_enabled():
    assert len(build_processors(GenerationConfig())) == 0
    cfg = GenerationConfig(
        do_sample=True, temperature=0.5, top_k=3, top_p=0.9, repetition_penalty=1.2, no_repeat_ngram_size=2
    )
    kinds = [type(p) for p in build_processors(cfg)]
    assert kinds == [
        RepetitionPenaltyProcessor,
        NoRepeatNGramProcessor,
        TemperatureProcessor,
        TopKProcessor,
        TopPProcessor,
    ]
    # warpers only when sampling
    assert [type(p) for p in build_processors(GenerationConfig(top_k=3, temperature=0.5))] == []
    assert not LogitsProcessorList([TemperatureProcessor(2.0)]).needs_history


def _uncached_greedy_with(model, prompt, n, proc):
    seq = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([seq]))[0][:, -1].float()
        seq.append(int(proc(torch.tensor([seq]), logits).argmax()))
    return seq[len(prompt) :]


@pytest.mark.parametrize(
    "kw, proc",
    [
        ({"repetition_penalty": 1.8}, RepetitionPenaltyProcessor(1.8)),
        ({"no_repeat_ngram_size": 2}, NoRepeatNGramProcessor(2)),
    ],
    ids=["repetition", "ngram"],
)
def test_engine_applies_processors_in_batches(kw, proc):
    model = TinyGRU(seed=1).eval()
    prompts = [[1, 2, 1, 2], [5], [3, 4, 3]]
    out = generate(model, prompts, GenerationConfig(max_new_tokens=12, eos_token_id=[], **kw))
    for i, p in enumerate(prompts):
        assert out.sequences[i] == [_uncached_greedy_with(model, p, 12, proc)]
    # it changes something compared to plain greedy
    assert any(out.sequences[i][0] != uncached_greedy(model, p, 12)[0] for i, p in enumerate(prompts))


def test_ngram_ban_holds_in_output():
    model = TinyGRU(seed=1).eval()
    out = generate(model, [[1, 2, 1, 2]], GenerationConfig(max_new_tokens=20, eos_token_id=[], no_repeat_ngram_size=3))
    seq = [1, 2, 1, 2] + out.sequences[0][0]
    grams = [tuple(seq[i : i + 3]) for i in range(len(seq) - 2)]
    assert len(grams[2:]) == len(set(grams[2:]))  # new 3-grams never repeat an earlier 3-gram
    assert not set(grams[2:]) & set(grams[:2])
