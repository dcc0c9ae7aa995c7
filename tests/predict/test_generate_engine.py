"""Greedy / sampling engine: against an uncached reference loop, batching, eos, stop strings, context, streaming."""

from __future__ import annotations

import pytest
import torch

from lmforge.predict import GenerationConfig, GenerationError, GenerationOutput, generate, generate_text
from support.generate import CHAR_PIECES, MULTI_PIECES, TinyAttention, TinyGRU, ToyTokenizer, uncached_greedy

MODELS = [TinyGRU, TinyAttention]
PROMPTS = [[1, 2, 3, 4, 5], [6], [2, 7, 9], [3, 3, 3, 3, 3, 3, 3, 1]]


@pytest.fixture(params=MODELS, ids=lambda c: c.__name__)
def model(request):
    return request.param().eval()


def test_greedy_equals_uncached_reference(model):
    out = generate(model, PROMPTS, GenerationConfig(max_new_tokens=10, eos_token_id=[]))
    assert isinstance(out, GenerationOutput)
    for i, p in enumerate(PROMPTS):
        ref, ref_lp = uncached_greedy(model, p, 10)
        assert out.sequences[i] == [ref]
        assert out.finish_reasons[i] == ["length"]
        assert out.scores[i][0] == pytest.approx(ref_lp, abs=1e-4)  # cached logits agree with forward


def test_batched_equals_alone_with_eos_and_budgets(model):
    # eos = a token the references emit, so rows end at different steps; max_length gives different budgets
    ref = {i: uncached_greedy(model, p, 12)[0] for i, p in enumerate(PROMPTS)}
    eos = ref[0][3]
    cfg = GenerationConfig(max_length=16, eos_token_id=eos)
    batched = generate(model, PROMPTS, cfg)
    for i, p in enumerate(PROMPTS):
        alone = generate(model, [p], cfg)
        assert batched.sequences[i] == alone.sequences[0]
        assert batched.finish_reasons[i] == alone.finish_reasons[0]
        expect, _ = uncached_greedy(model, p, 16 - len(p), eos=[eos])
        assert batched.sequences[i] == [expect]
        ended_by_eos = len(expect) < 16 - len(p)
        assert batched.finish_reasons[i] == ["eos" if ended_by_eos else "length"]
    assert "eos" in sum(batched.finish_reasons, [])


def test_tensor_prompts_and_training_mode_restored(model):
    model.train()
    out = generate(model, torch.tensor([[1, 2, 3], [4, 5, 6]]), GenerationConfig(max_new_tokens=4, eos_token_id=[]))
    assert model.training
    assert out.sequences[1] == [uncached_greedy(model.eval(), [4, 5, 6], 4)[0]]


def test_default_eos_comes_from_tokenizer():
    model = TinyGRU()
    tok = ToyTokenizer(CHAR_PIECES)
    ref, _ = uncached_greedy(model, [1, 2], 30)
    # build a tokenizer whose end-of-text id is the third generated token
    tok.eot_id = ref[2]
    out = generate(model, [[1, 2]], GenerationConfig(max_new_tokens=30), tokenizer=tok)
    assert out.finish_reasons == [["eos"]]
    assert out.sequences == [[ref[: ref.index(ref[2])]]]


# ------------------------------------------------------------------------------------------ sampling
def test_sampling_reproducible_with_seed(model):
    cfg = GenerationConfig(max_new_tokens=12, do_sample=True, seed=123, num_return_sequences=3, eos_token_id=[])
    a = generate(model, PROMPTS[:2], cfg)
    b = generate(model, PROMPTS[:2], cfg)
    assert a.sequences == b.sequences
    c = generate(model, PROMPTS[:2], GenerationConfig(**{**cfg.__dict__, "seed": 7}))
    assert c.sequences != a.sequences
    assert all(len(s) == 3 for s in a.sequences)


@pytest.mark.parametrize("kw", [{"top_k": 1}, {"top_p": 1e-6}, {"temperature": 1e-4}, {"temperature": 0.0}], ids=str)
def test_degenerate_sampling_equals_greedy(model, kw):
    greedy = generate(model, PROMPTS, GenerationConfig(max_new_tokens=8, eos_token_id=[]))
    sampled = generate(
        model, PROMPTS, GenerationConfig(max_new_tokens=8, eos_token_id=[], do_sample=True, seed=0, **kw)
    )
    assert sampled.sequences == greedy.sequences


def test_sampling_frequencies_match_model_probabilities():
    model = TinyGRU(sharpness=0.5)
    n = 4000
    cfg = GenerationConfig(max_new_tokens=1, do_sample=True, seed=0, num_return_sequences=n, eos_token_id=[])
    out = generate(model, [[1, 2]], cfg)
    counts = torch.bincount(torch.tensor([s[0] for s in out.sequences[0]]), minlength=model.vocab_size).double()
    with torch.no_grad():
        p = model(torch.tensor([[1, 2]]))[0][0, -1].double().softmax(-1)
    # each frequency within 4.5 standard deviations of a binomial
    assert torch.all((counts / n - p).abs() <= 4.5 * (p * (1 - p) / n).sqrt() + 1e-9)

    # top_k=3: only the 3 most likely tokens, renormalized
    out = generate(model, [[1, 2]], GenerationConfig(**{**cfg.__dict__, "top_k": 3}))
    counts = torch.bincount(torch.tensor([s[0] for s in out.sequences[0]]), minlength=model.vocab_size).double()
    top = p.topk(3).indices
    q = torch.zeros_like(p)
    q[top] = p[top] / p[top].sum()
    assert set(torch.nonzero(counts).flatten().tolist()) <= set(top.tolist())
    assert torch.all((counts / n - q).abs() <= 4.5 * (q * (1 - q) / n).sqrt() + 1e-9)


def test_sampling_expands_rows_and_scores_are_logprobs(model):
    cfg = GenerationConfig(max_new_tokens=5, do_sample=True, seed=3, num_return_sequences=4, eos_token_id=[])
    out = generate(model, PROMPTS[:2], cfg)
    for i, p in enumerate(PROMPTS[:2]):
        assert len(out.sequences[i]) == 4
        for seq, score in zip(out.sequences[i], out.scores[i], strict=True):
            with torch.no_grad():
                logp = model(torch.tensor([p + seq]))[0][0].double().log_softmax(-1)
            ref = sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(seq))
            assert score == pytest.approx(ref, abs=1e-4)


# ------------------------------------------------------------------------------------ stop strings
def test_stop_string_cuts_text_and_ids(model):
    tok = ToyTokenizer(CHAR_PIECES)
    prompt = [0, 1, 2]
    ref, _ = uncached_greedy(model, prompt, 20)
    text = tok.decode(ref)
    stop = text[6:8]
    pos = text.find(stop)
    cfg = GenerationConfig(max_new_tokens=20, eos_token_id=[], stop_strings=[stop])
    out = generate(model, [prompt], cfg, tokenizer=tok)
    assert out.finish_reasons == [["stop"]]
    assert out.texts == [[text[:pos]]]
    assert out.sequences == [[ref[:pos]]]  # one character per token
    assert generate_text(model, tok, [tok.decode(prompt)], cfg) == [[text[:pos]]]


def test_stop_string_across_multichar_tokens():
    model = TinyGRU(seed=5)
    tok = ToyTokenizer(MULTI_PIECES)
    prompt = [0, 4]
    ref, _ = uncached_greedy(model, prompt, 25)
    text = tok.decode(ref)
    ends = [0]
    for t in ref:  # character offset after each token, from the piece lengths
        ends.append(ends[-1] + len(tok.decode([t])))
    # "bcd" starts inside the 3-character token "abc" this model emits
    stop = "bcd"
    pos = text.find(stop)
    assert pos > 0 and pos not in ends
    expect_ids = ref[: max(j for j, e in enumerate(ends) if e <= pos)]
    streamed: list[int] = []
    out = generate(
        model,
        [prompt],
        GenerationConfig(max_new_tokens=25, eos_token_id=[], stop_strings=["zzz", stop]),
        tokenizer=tok,
        streamer=lambda row, ids: streamed.extend(ids),
    )
    assert out.texts == [[text[:pos]]]
    assert out.sequences == [[expect_ids]]
    assert streamed == expect_ids  # held back what could start the stop string, never more
    assert out.finish_reasons == [["stop"]]


def test_stop_strings_in_batch_and_text_streaming():
    model = TinyAttention(seed=2)
    tok = ToyTokenizer(CHAR_PIECES)
    prompts = ["abc", "h", "eeg ."]
    refs = [tok.decode(uncached_greedy(model, tok.encode(p), 15)[0]) for p in prompts]
    stop = refs[0][4:6]
    expect = [r[: r.find(stop)] if stop in r else r for r in refs]
    pieces: dict[int, str] = {}
    got = generate_text(
        model,
        tok,
        prompts,
        GenerationConfig(max_new_tokens=15, eos_token_id=[], stop_strings=[stop]),
        streamer=lambda row, s: pieces.__setitem__(row, pieces.get(row, "") + s),
    )
    assert got == [[e] for e in expect]
    assert [pieces.get(i, "") for i in range(3)] == expect


# ------------------------------------------------------------------------------------------ context
def test_context_overflow_errors_name_both_numbers():
    model = TinyAttention(max_seq_len=24)
    with pytest.raises(GenerationError, match=r"30 tokens.*24"):
        generate(model, [list(range(10)) * 3], GenerationConfig(max_new_tokens=4))
    with pytest.raises(GenerationError, match=r"20 tokens\) \+ 10 new tokens = 30.*24"):
        generate(model, [[1] * 20], GenerationConfig(max_new_tokens=10))
    with pytest.raises(GenerationError, match=r"24"):
        generate(model, [[1]], GenerationConfig(max_new_tokens=24))


def test_truncate_prompt_keeps_last_tokens():
    model = TinyAttention(max_seq_len=24)
    long_prompt = [(3 * i) % 10 for i in range(40)]
    out = generate(
        model, [long_prompt, [1, 2]], GenerationConfig(max_new_tokens=6, truncate_prompt=True, eos_token_id=[])
    )
    assert out.sequences[0] == [uncached_greedy(model, long_prompt[-18:], 6)[0]]
    assert out.sequences[1] == [uncached_greedy(model, [1, 2], 6)[0]]
    assert model.max_slots_used <= 24


def test_max_length_budgets_never_overflow_the_cache():
    # budgets 22 and 4 with prompts of 2 and 20 tokens: padded together they would need 42 slots
    model = TinyAttention(max_seq_len=24)
    prompts = [[1, 2], [(7 * i) % 10 for i in range(20)]]
    out = generate(model, prompts, GenerationConfig(max_length=24, eos_token_id=[]))
    assert [len(s[0]) for s in out.sequences] == [22, 4]
    for i, p in enumerate(prompts):
        assert out.sequences[i] == [uncached_greedy(model, p, 24 - len(p))[0]]
    assert model.max_slots_used <= 24


def test_recurrent_model_has_no_context_limit():
    model = TinyGRU()
    out = generate(model, [[1] * 300], GenerationConfig(max_new_tokens=3, eos_token_id=[]))
    assert len(out.sequences[0][0]) == 3


# ------------------------------------------------------------------------------------------ streaming
def test_streamer_receives_exactly_the_generated_tokens(model):
    got: dict[int, list[int]] = {}
    order: list[int] = []

    def streamer(row: int, ids: list[int]) -> None:
        got.setdefault(row, []).extend(ids)
        order.append(row)

    eos = uncached_greedy(model, PROMPTS[0], 10)[0][4]
    cfg = GenerationConfig(max_new_tokens=10, eos_token_id=eos, do_sample=True, seed=5, num_return_sequences=2)
    out = generate(model, PROMPTS, cfg, streamer=streamer)
    for i in range(len(PROMPTS)):
        for j in range(2):
            assert got.get(i * 2 + j, []) == out.sequences[i][j]
    assert all(eos not in ids for ids in got.values())


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "kw, field",
    [
        ({"top_p": 0.0}, "top_p"),
        ({"temperature": -1.0}, "temperature"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"num_beams": 2, "num_return_sequences": 3}, "num_return_sequences"),
        ({"num_return_sequences": 2}, "num_return_sequences"),
        ({"early_stopping": "sometimes"}, "early_stopping"),
        ({"eos_token_id": [-1]}, "eos_token_id"),
        ({"stop_strings": [""]}, "stop_strings"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"top_k": -2}, "top_k"),
    ],
)
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(GenerationError, match=rf"GenerationConfig\.{field}"):
        GenerationConfig(**kw)


def test_input_errors():
    model = TinyGRU()
    with pytest.raises(GenerationError, match="prompt 1 is empty"):
        generate(model, [[1], []])
    with pytest.raises(GenerationError, match="prompt 0 has token id 11"):
        generate(model, [[1, 11]])
    with pytest.raises(GenerationError, match="stop_strings needs a tokenizer"):
        generate(model, [[1]], GenerationConfig(stop_strings=["a"]))
    with pytest.raises(GenerationError, match="max_length"):
        generate(model, [[1, 2, 3]], GenerationConfig(max_length=3))
