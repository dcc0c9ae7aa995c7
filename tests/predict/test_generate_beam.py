"""Beam search: exhaustive search on a tiny vocabulary, a plain per-prompt reference, greedy equivalence."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from lmforge.predict import GenerationConfig, generate
from support.generate import (
    CHAR_PIECES,
    TinyAttention,
    TinyGRU,
    ToyTokenizer,
    brute_force,
    uncached_greedy,
)

engine = importlib.import_module("lmforge.predict.engine")




@pytest.mark.parametrize("early_stopping", [False, True, "never"])
@pytest.mark.parametrize("length_penalty", [-0.5, 0.0, 1.0, 2.0])
@pytest.mark.parametrize("cls", [TinyGRU, TinyAttention], ids=lambda c: c.__name__)
def test_beam_search_is_exact_with_enough_beams(cls, length_penalty, early_stopping):
    V, steps, eos = 5, 3, 0
    model = cls(vocab_size=V, seed=4).eval()
    prompts = [[1, 2], [3]]
    K = V ** (steps - 1)  # every prefix fits in the beam: beam search must equal exhaustive search
    cfg = GenerationConfig(
        max_new_tokens=steps,
        num_beams=K,
        num_return_sequences=6,
        eos_token_id=eos,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
    )
    out = generate(model, prompts, cfg)
    for i, p in enumerate(prompts):
        ref = brute_force(model, p, V, steps, eos, length_penalty)[:6]
        assert out.sequences[i] == [r[1] for r in ref]
        assert out.finish_reasons[i] == [r[2] for r in ref]
        assert out.scores[i] == pytest.approx([r[0] for r in ref], abs=1e-4)


def test_beam_search_exact_deeper():
    V, steps, eos = 3, 4, 2
    model = TinyGRU(vocab_size=V, seed=7, sharpness=1.0).eval()
    out = generate(
        model,
        [[0, 1]],
        GenerationConfig(max_new_tokens=steps, num_beams=V ** (steps - 1), num_return_sequences=8, eos_token_id=eos),
    )
    ref = brute_force(model, [0, 1], V, steps, eos, 1.0)[:8]
    assert out.sequences[0] == [r[1] for r in ref]
    assert out.scores[0] == pytest.approx([r[0] for r in ref], abs=1e-4)


def reference_beam(model, prompt, K, R, budget, eos, lp, early_stopping, vocab, ends=None):
    """Plain per-prompt beam search with HF's rules, recomputing every sequence with ``forward``: the best
    2K continuations per step; those among the first K that end (eos / budget / ``ends``) become finished
    hypotheses scored sum / len ** lp; the best K of the rest go on; stop when HF's heuristic says so."""
    running = [([], 0.0)]
    finished: list[tuple[float, list[int], str]] = []
    improvable = True
    for t in range(budget):
        cands = []
        for seq, s in running:
            with torch.no_grad():
                logp = model(torch.tensor([prompt + seq]))[0][0, -1].double().log_softmax(-1)
            cands += [(s + float(logp[v]), seq + [v]) for v in range(vocab)]
        cands = sorted(cands, key=lambda c: -c[0])[: 2 * K]
        full = early_stopping is True and len(finished) == K

        def reason(seq):
            if seq[-1] == eos:
                return "eos"
            if ends is not None and ends(seq):
                return "stop"
            return "length" if len(seq) == budget else None

        if improvable and not full:
            for s, seq in cands[:K]:
                r = reason(seq)
                if r is not None:
                    finished.append((s / (t + 1) ** lp, seq[:-1] if r == "eos" else seq, r))
            finished = sorted(finished, key=lambda h: -h[0])[:K]
        running = [(seq, s) for s, seq in cands if reason(seq) is None][:K]
        if not running:
            break
        if len(finished) == K:
            n = budget if (early_stopping == "never" and lp > 0) else t + 1
            improvable = improvable and running[0][1] / n**lp > finished[-1][0]
            if early_stopping is True:
                improvable = False
        if not improvable:
            break
    return finished[:R]


@pytest.mark.parametrize("early_stopping", [False, True, "never"])
@pytest.mark.parametrize("length_penalty", [-1.0, 0.5, 2.0])
@pytest.mark.parametrize("seed, eos", [(2, 1), (0, 0)])
def test_beam_search_matches_plain_reference(seed, eos, length_penalty, early_stopping):
    V = 6
    model = TinyAttention(vocab_size=V, seed=seed, max_seq_len=16).eval()
    prompts = [[1, 2, 3], [4], [5, 1]]
    K, R, n = 3, 2, 8
    cfg = GenerationConfig(
        max_new_tokens=n,
        num_beams=K,
        num_return_sequences=R,
        eos_token_id=eos,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
    )
    out = generate(model, prompts, cfg)
    for i, p in enumerate(prompts):
        ref = reference_beam(model, p, K, R, n, eos, length_penalty, early_stopping, V)
        assert out.sequences[i] == [r[1] for r in ref]
        assert out.finish_reasons[i] == [r[2] for r in ref]
        assert out.scores[i] == pytest.approx([r[0] for r in ref], abs=1e-4)


def test_early_stopping_modes_differ_here():
    """The setting above is one where the three early-stopping rules give different beams (so it tests them)."""
    model = TinyAttention(vocab_size=6, seed=2, max_seq_len=16).eval()
    outs = [
        generate(
            model,
            [[1, 2, 3], [4], [5, 1]],
            GenerationConfig(
                max_new_tokens=8,
                num_beams=3,
                num_return_sequences=2,
                eos_token_id=1,
                length_penalty=2.0,
                early_stopping=es,
            ),
        ).sequences
        for es in (False, True, "never")
    ]
    assert outs[0] != outs[1] and outs[0] != outs[2] and outs[1] != outs[2]


def test_beam_with_one_beam_equals_greedy(monkeypatch):
    model = TinyGRU().eval()
    prompts = [[1, 2, 3], [4], [9, 9]]
    eos = uncached_greedy(model, prompts[0], 10)[0][3]
    cfg = GenerationConfig(max_new_tokens=10, eos_token_id=eos)
    greedy = generate(model, prompts, cfg)
    # num_beams=1 is greedy decoding; run the beam-search code path with one beam anyway
    monkeypatch.setattr(engine, "sample_search", engine.beam_search)
    beam = generate(model, prompts, cfg)
    assert beam.sequences == greedy.sequences
    assert beam.finish_reasons == greedy.finish_reasons
    for i, p in enumerate(prompts):
        assert greedy.sequences[i] == [uncached_greedy(model, p, 10, eos=[eos])[0]]


def test_beam_batches_of_different_lengths_and_budgets_on_a_bounded_model():
    model = TinyAttention(max_seq_len=20, seed=3).eval()
    prompts = [[1], [2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3, 4, 5, 6], [7, 7, 7]]
    cfg = GenerationConfig(max_length=20, num_beams=3, num_return_sequences=2, eos_token_id=[])
    out = generate(model, prompts, cfg)
    for i, p in enumerate(prompts):
        alone = generate(model, [p], cfg)
        assert out.sequences[i] == alone.sequences[0]
        ref = reference_beam(model, p, 3, 2, 20 - len(p), None, 1.0, False, model.vocab_size)
        assert out.sequences[i] == [r[1] for r in ref]
    assert model.max_slots_used <= 20


def test_beam_stop_strings_and_streaming():
    model = TinyGRU(seed=2).eval()
    tok = ToyTokenizer(CHAR_PIECES)
    prompt = [0, 1]
    plain = reference_beam(model, prompt, 3, 1, 12, None, 1.0, False, model.vocab_size)[0][1]
    stop = tok.decode(plain)[3:5]
    streamed: dict[int, list[int]] = {}
    cfg = GenerationConfig(max_new_tokens=12, num_beams=3, eos_token_id=[], stop_strings=[stop])
    out = generate(model, [prompt], cfg, tokenizer=tok, streamer=lambda r, ids: streamed.setdefault(r, []).extend(ids))

    def ends(seq):
        return stop in tok.decode(seq)

    ref = reference_beam(model, prompt, 3, 1, 12, None, 1.0, False, model.vocab_size, ends=ends)[0]
    text = tok.decode(ref[1])
    cut = text.find(stop) if stop in text else len(text)
    assert out.texts == [[text[:cut]]]
    assert out.sequences == [[ref[1][:cut]]]  # one character per token
    assert out.finish_reasons == [[ref[2]]]
    assert streamed == {0: out.sequences[0][0]}


def test_beam_sampling_is_seeded():
    model = TinyGRU().eval()
    cfg = GenerationConfig(
        max_new_tokens=6, num_beams=3, do_sample=True, seed=1, eos_token_id=[], num_return_sequences=3
    )
    a, b = generate(model, [[1, 2]], cfg), generate(model, [[1, 2]], cfg)
    assert a.sequences == b.sequences
    assert all(math.isfinite(s) for s in a.scores[0])
    assert a.scores[0] == sorted(a.scores[0], reverse=True)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_fast_path_without_end_tokens_equals_the_general_path(length_penalty):
    """Without an eos token no candidate can end before the budget, and beam search takes a shorter path;
    an eos the model is never allowed to produce runs the general path: both must give the same beams."""
    V = 9
    model = TinyAttention(vocab_size=V, seed=3, max_seq_len=24).eval()
    prompts = [[1, 2, 3], [4], [5, 1, 7, 7]]

    def ban(token):
        def proc(ids, scores):
            return scores.index_fill(1, torch.tensor([token]), float("-inf"))

        return proc

    def run(eos, procs):
        cfg = GenerationConfig(max_new_tokens=10, num_beams=4, num_return_sequences=3, eos_token_id=eos,
                               length_penalty=length_penalty)
        return generate(model, prompts, cfg, processors=procs)

    fast = run([], [ban(8)])
    general = run(8, [ban(8)])
    assert fast.sequences == general.sequences and fast.finish_reasons == general.finish_reasons
    for a, b in zip(fast.scores, general.scores, strict=True):
        assert a == pytest.approx(b, abs=1e-6)
    assert all(r == "length" for rows in fast.finish_reasons for r in rows)
