"""Continuous batching (``predict.continuous``): every row's result equals ``generate`` / ``generate_text`` of
that request alone, whatever joins or leaves the batch meanwhile, for every model family; per-row settings,
processors, logprobs, stop strings, cancellation, chunked prefill and the step-level admission."""

from __future__ import annotations

import string

import pytest
import torch

from lmforge.config import build_config
from lmforge.data.tokenizer import char_tokenizer
from lmforge.models import build_model
from lmforge.predict import GenerationConfig, GenerationError, generate, generate_text
from lmforge.predict.config import TokenLogprob
from lmforge.predict.continuous import ContinuousScheduler
from lmforge.predict.requests import Request
from support.generate import TinyGRU

FAMILIES = ["transformer", "lstm", "gru", "rcnn"]
TOK = char_tokenizer([string.printable])
PROMPTS = ["Hello there", "a", "The quick brown fox jumps", "xyz 123", "??", "Once upon a time, in a land"]


def make_model(family: str, context: int = 64):
    torch.manual_seed(0)
    mc = {"family": family, "n_layer": 2, "d_model": 32, "vocab_size": TOK.vocab_size, "init_std": 0.3}
    if family == "transformer":
        mc.update(n_head=2, max_seq_len=context)
    cfg = build_config({"model": mc, "data": {"block_size": context}, "tokenizer": {"kind": "char"}})
    return build_model(cfg.model).eval()


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return make_model(request.param)


class Collector:
    """Callbacks of one request: streamed pieces per row and the final output."""

    def __init__(self) -> None:
        self.streamed: dict[int, list[int]] = {}
        self.stream_lps: dict[int, list[TokenLogprob]] = {}
        self.first_step: int | None = None
        self.out = None
        self.lps = None
        self.error: BaseException | None = None
        self.sch: ContinuousScheduler | None = None

    def request(self, prompts: list[list[int]], config: GenerationConfig, **kw) -> Request:
        return Request(prompts, config, on_tokens=self.on_tokens, on_done=self.on_done, on_error=self.on_error, **kw)

    def on_tokens(self, row, ids, lps):
        if self.first_step is None and self.sch is not None:
            self.first_step = self.sch.steps
        self.streamed.setdefault(row, []).extend(ids)
        if lps is not None:
            assert len(lps) == len(ids)
            self.stream_lps.setdefault(row, []).extend(lps)

    def on_done(self, out, lps):
        assert self.out is None
        self.out, self.lps = out, lps

    def on_error(self, err):
        self.error = err


def enc(text: str) -> list[int]:
    return TOK.encode(text)


def run_schedule(sch: ContinuousScheduler, arrivals: list[tuple[int, Request]]) -> None:
    """Submit each request before step number ``at`` (arrivals sorted by step), then run to the end."""
    pending = sorted(arrivals, key=lambda a: a[0])
    step = 0
    while pending or sch.busy:
        while pending and pending[0][0] <= step:
            sch.submit(pending.pop(0)[1])
        sch.step()
        step += 1
        assert step < 2000


# ------------------------------------------------------------------------------------ equality
@pytest.mark.parametrize("order", ["together", "staggered", "reversed"])
def test_greedy_equals_generate_whatever_the_arrival_order(model, order):
    cfg = GenerationConfig(max_new_tokens=14, eos_token_id=[])
    refs = [generate(model, [enc(p)], cfg).sequences[0][0] for p in PROMPTS]
    sch = ContinuousScheduler(model, TOK, max_rows=4, prefill_chunk_size=8)
    cols = [Collector() for _ in PROMPTS]
    at = {"together": [0] * 6, "staggered": [0, 3, 3, 7, 12, 13], "reversed": [15, 12, 9, 6, 3, 0]}[order]
    run_schedule(sch, [(at[i], c.request([enc(p)], cfg)) for i, (p, c) in enumerate(zip(PROMPTS, cols, strict=True))])
    for c, ref in zip(cols, refs, strict=True):
        assert c.out.sequences == [[ref]]
        assert c.out.finish_reasons == [["length"]]
        assert c.streamed[0] == ref
    assert sch.decode_steps < sum(len(r) for r in refs)  # rows really shared forwards
    assert sch.slots_used == 0 and sch.rows_running == 0 and not sch.busy


def test_seeded_sampling_and_per_row_settings_in_one_batch(model):
    settings = [
        dict(do_sample=True, seed=1, temperature=0.7, top_k=5),
        dict(do_sample=True, seed=2, top_p=0.8, repetition_penalty=1.5),
        dict(),  # greedy
        dict(no_repeat_ngram_size=2),
        dict(do_sample=True, seed=3, num_return_sequences=3, temperature=1.3),
        dict(repetition_penalty=0.5, do_sample=True, seed=4),
    ]
    cfgs = [GenerationConfig(max_new_tokens=12, eos_token_id=[], **kw) for kw in settings]
    prompts = [[enc(PROMPTS[i])] if i != 4 else [enc(PROMPTS[4]), enc(PROMPTS[0])] for i in range(6)]
    refs = [generate(model, p, c) for p, c in zip(prompts, cfgs, strict=True)]
    # the settings matter: the same prompt under another row's settings gives another completion
    other = generate(model, prompts[0], cfgs[1]).sequences
    assert other != refs[0].sequences
    sch = ContinuousScheduler(model, TOK, max_rows=16)
    cols = [Collector() for _ in cfgs]
    run_schedule(
        sch, [(i % 3, c.request(p, cfg)) for i, (c, p, cfg) in enumerate(zip(cols, prompts, cfgs, strict=True))]
    )
    for c, ref in zip(cols, refs, strict=True):
        assert c.out.sequences == ref.sequences
        assert c.out.scores == [pytest.approx(s, abs=1e-3) for s in ref.scores]


def test_eos_and_max_length_budgets(model):
    base = GenerationConfig(max_new_tokens=12, eos_token_id=[])
    ref0 = generate(model, [enc(PROMPTS[0])], base).sequences[0][0]
    cfg = GenerationConfig(max_length=32, eos_token_id=ref0[4])
    prompts = [enc(p) for p in PROMPTS[:4]]
    refs = [generate(model, [p], cfg) for p in prompts]
    sch = ContinuousScheduler(model, TOK, max_rows=3)
    cols = [Collector() for _ in prompts]
    run_schedule(sch, [(2 * i, c.request([p], cfg)) for i, (c, p) in enumerate(zip(cols, prompts, strict=True))])
    for c, ref in zip(cols, refs, strict=True):
        assert c.out.sequences == ref.sequences and c.out.finish_reasons == ref.finish_reasons
    assert ["eos"] in [c.out.finish_reasons[0] for c in cols]


def test_stop_strings_equal_generate_text(model):
    texts = generate_text(model, TOK, PROMPTS[:3], GenerationConfig(max_new_tokens=16, eos_token_id=[]))
    stop = texts[0][0][5:7]  # two characters the first completion produces
    cfg = GenerationConfig(max_new_tokens=16, eos_token_id=[], stop_strings=[stop, "zz"])
    refs = [generate_text(model, TOK, [p], cfg)[0][0] for p in PROMPTS[:3]]
    sch = ContinuousScheduler(model, TOK, max_rows=4)
    cols = [Collector() for _ in refs]
    run_schedule(sch, [(i, c.request([enc(p)], cfg)) for i, (c, p) in enumerate(zip(cols, PROMPTS[:3], strict=True))])
    for c, ref in zip(cols, refs, strict=True):
        assert c.out.texts == [[ref]]
        assert TOK.decode(c.streamed.get(0, [])) == TOK.decode(c.out.sequences[0][0])  # nothing past the cut
    assert cols[0].out.finish_reasons == [["stop"]] and stop not in refs[0]


def test_chunked_prefill_equals_unchunked(model):
    long = enc("The quick brown fox jumps over the lazy dog; " * 1)[:40]
    cfg = GenerationConfig(max_new_tokens=10, eos_token_id=[])
    ref = generate(model, [long], cfg).sequences
    outs = {}
    for chunk in (3, 1000):
        sch = ContinuousScheduler(model, TOK, prefill_chunk_size=chunk)
        c = Collector()
        sch.submit(c.request([long], cfg))
        sch.run_until_idle()
        outs[chunk] = (c.out.sequences, sch.prefill_steps)
    assert outs[3][0] == outs[1000][0] == ref
    assert outs[3][1] == 14 and outs[1000][1] == 1  # ceil(40 / 3) chunks vs one


def test_long_prompt_prefill_does_not_stall_running_rows(model):
    """While a long prompt is prefilled in chunks, the running row still gets one token per step."""
    cfg = GenerationConfig(max_new_tokens=30, eos_token_id=[])
    sch = ContinuousScheduler(model, TOK, prefill_chunk_size=4)
    a, b = Collector(), Collector()
    sch.submit(a.request([enc("a")], cfg))
    sch.step()
    sch.step()
    n0 = len(a.streamed[0])
    sch.submit(b.request([enc("x" * 40)], GenerationConfig(max_new_tokens=3, eos_token_id=[])))
    for _ in range(5):
        sch.step()
    assert len(a.streamed[0]) == n0 + 5  # one token per step while b's 40 tokens prefill 4 at a time
    assert 0 not in b.streamed
    sch.run_until_idle()
    assert (
        b.out.sequences
        == generate(model, [enc("x" * 40)], GenerationConfig(max_new_tokens=3, eos_token_id=[])).sequences
    )


# ---------------------------------------------------------------------------------- scheduling
def test_request_arriving_mid_batch_starts_within_one_step(model):
    long = GenerationConfig(max_new_tokens=40, eos_token_id=[])
    sch = ContinuousScheduler(model, TOK, max_rows=8, prefill_chunk_size=64)
    first = [Collector() for _ in range(3)]
    for c in first:
        c.sch = sch
        sch.submit(c.request([enc("Hello")], long))
    for _ in range(5):
        sch.step()
    late = Collector()
    late.sch = sch
    sch.submit(late.request([enc("late comer")], GenerationConfig(max_new_tokens=4, eos_token_id=[])))
    before = sch.steps
    sch.step()
    assert late.first_step == before + 1  # its first token came out of the very next step
    assert sch.rows_running == 4
    sch.run_until_idle()
    assert (
        late.out.sequences
        == generate(model, [enc("late comer")], GenerationConfig(max_new_tokens=4, eos_token_id=[])).sequences
    )


def test_cancellation_frees_the_slot(model):
    cfg = GenerationConfig(max_new_tokens=50, eos_token_id=[])
    sch = ContinuousScheduler(model, TOK, max_rows=2)
    a, b, c = Collector(), Collector(), Collector()
    ra, rb, rc = a.request([enc("aa")], cfg), b.request([enc("bb")], cfg), c.request([enc("cc")], cfg)
    for r in (ra, rb, rc):
        sch.submit(r)
    sch.step()
    sch.step()
    assert sch.rows_running == 2 and sch.rows_waiting == 1 and sch.slots_used == sch.slots_total == 2
    sch.cancel(ra)
    sch.step()
    assert sch.rows_running == 2 and sch.rows_waiting == 0  # c took a's slot at the next step
    assert 0 in c.streamed
    n = len(a.streamed[0])
    sch.run_until_idle()
    assert a.out is None and len(a.streamed[0]) == n  # nothing after the cancel
    assert c.out.sequences == generate(model, [enc("cc")], cfg).sequences
    assert sch.requests_cancelled == 1 and sch.requests_done == 2
    outcomes = sorted(t.outcome for t in sch.timings)
    assert outcomes == ["cancelled", "done", "done"]
    assert all(t.ttft_s is not None and t.ttft_s <= t.e2e_s for t in sch.timings)
    assert sum(t.completion_tokens for t in sch.timings if t.outcome == "done") == 100


def test_transformer_cache_stays_within_the_context():
    """Rows come and go for many more steps than the context has slots: the shared cache drops slots no row
    uses, so it never overflows, and results still equal generate's."""
    model = make_model("transformer", context=24)
    cfg = GenerationConfig(max_new_tokens=12, eos_token_id=[])
    prompts = [enc(p)[:10] for p in PROMPTS] * 2
    refs = [generate(model, [p], cfg).sequences for p in prompts]
    sch = ContinuousScheduler(model, TOK, max_rows=3)
    cols = [Collector() for _ in prompts]
    run_schedule(sch, [(4 * i, c.request([p], cfg)) for i, (c, p) in enumerate(zip(cols, prompts, strict=True))])
    assert [c.out.sequences for c in cols] == refs
    assert sch.steps > 40  # far more steps than the 24 slots


# ---------------------------------------------------------------------------- processors, logprobs
def test_extra_processor_applies_to_its_row_only(model):
    cfg = GenerationConfig(max_new_tokens=10, eos_token_id=[])
    prompt = enc("Hello there")
    plain = generate(model, [prompt], cfg).sequences[0][0]
    banned = plain[0]
    shapes = []

    def ban(input_ids, scores):
        shapes.append((tuple(input_ids.shape), tuple(scores.shape)))
        return scores.index_fill(1, torch.tensor([banned]), float("-inf"))

    ref = generate(model, [prompt], cfg, processors=[ban]).sequences
    shapes.clear()
    sch = ContinuousScheduler(model, TOK)
    with_ban, without = Collector(), Collector()
    sch.submit(with_ban.request([prompt], cfg, processors=[ban]))
    sch.submit(without.request([prompt], cfg))
    sch.run_until_idle()
    assert with_ban.out.sequences == ref and banned not in ref[0][0]
    assert without.out.sequences == [[plain]]
    assert shapes and all(s == ((1, len(prompt) + i), (1, TOK.vocab_size)) for i, s in enumerate(shapes))


def test_logprobs_match_the_models_forward(model):
    prompt = enc("The cat")
    cfg = GenerationConfig(max_new_tokens=6, eos_token_id=[])
    sch = ContinuousScheduler(model, TOK)
    c = Collector()
    sch.submit(c.request([prompt], cfg, logprobs=3))
    other = Collector()
    sch.submit(other.request([enc("x")], cfg))  # no logprobs asked: none reported
    sch.run_until_idle()
    ids = c.out.sequences[0][0]
    lps = c.lps[0]
    assert len(lps) == len(ids) == 6 and c.stream_lps[0] == lps
    with torch.no_grad():
        logits, _ = model(torch.tensor([prompt + ids]))
    ref = logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)  # the positions that predicted each id
    for t, lp in enumerate(lps):
        assert lp.token_id == ids[t]
        assert lp.logprob == pytest.approx(float(ref[t, ids[t]]), abs=1e-4)
        vals, idx = ref[t].topk(3)
        assert [i for i, _ in lp.top] == idx.tolist()
        assert [v for _, v in lp.top] == pytest.approx(vals.tolist(), abs=1e-4)
    assert c.out.scores[0][0] == pytest.approx(sum(lp.logprob for lp in lps), abs=1e-4)
    assert other.lps is None and other.stream_lps == {}


# ------------------------------------------------------------------------------------- refusals
def test_refusals():
    model = make_model("transformer", context=24)
    sch = ContinuousScheduler(model, TOK)
    with pytest.raises(GenerationError, match="beam"):
        sch.submit(Request([[1, 2]], GenerationConfig(num_beams=2)))
    with pytest.raises(GenerationError, match="context"):
        sch.submit(Request([[1] * 20], GenerationConfig(max_new_tokens=10)))
    with pytest.raises(GenerationError, match="vocabulary"):
        sch.submit(Request([[10**6]], GenerationConfig()))
    assert not sch.busy
    assert not ContinuousScheduler.supports(TinyGRU())  # a stand-in's dict state: callers decode it per request


def test_hf_wrapped_family(tmp_path):
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from lmforge.models.hf import HFCausalLM
    from lmforge.predict.loading import load_pretrained

    tok = char_tokenizer(["hello world, a tiny corpus.\n"])
    PreTrainedTokenizerFast(tokenizer_object=tok.backend, eos_token=tok.eot_token).save_pretrained(tmp_path)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=tok.vocab_size,
        max_position_embeddings=40,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    model, tokenizer, _ = load_pretrained(tmp_path)
    assert isinstance(model, HFCausalLM)
    assert ContinuousScheduler.supports(model)
    gen = GenerationConfig(max_new_tokens=8, eos_token_id=[])
    prompts = [tokenizer.encode(t) for t in ("hello", "a tiny", "world, world")]
    refs = [generate(model, [p], gen).sequences for p in prompts]
    sch = ContinuousScheduler(model, tokenizer, max_rows=2, prefill_chunk_size=3)
    cols = [Collector() for _ in prompts]
    run_schedule(sch, [(3 * i, c.request([p], gen)) for i, (c, p) in enumerate(zip(cols, prompts, strict=True))])
    assert [c.out.sequences for c in cols] == refs


def test_a_failing_processor_fails_its_request_only():
    model = make_model("gru")
    cfg = GenerationConfig(max_new_tokens=8, eos_token_id=[])
    calls = []

    def broken(input_ids, scores):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("processor broke")
        return scores

    sch = ContinuousScheduler(model, TOK)
    bad, good = Collector(), Collector()
    sch.submit(bad.request([enc("abc")], cfg, processors=[broken]))
    sch.submit(good.request([enc("abc")], cfg))
    sch.run_until_idle()
    assert isinstance(bad.error, RuntimeError) and bad.out is None and len(bad.streamed[0]) == 2
    assert good.out.sequences == generate(model, [enc("abc")], cfg).sequences
    assert sch.requests_failed == 1 and sch.requests_done == 1 and sch.requests_cancelled == 0
    assert not sch.busy and sch.rows_running == 0


def test_copy_bias_equals_generate(model):
    """The copy mechanism keeps each row's prompt apart when rows join and leave the batch."""
    cfg = GenerationConfig(max_new_tokens=12, eos_token_id=[], copy_bias=3.0, source_bias=0.5)
    refs = [generate(model, [enc(p)], cfg).sequences[0][0] for p in PROMPTS]
    sch = ContinuousScheduler(model, TOK, max_rows=3, prefill_chunk_size=8)
    cols = [Collector() for _ in PROMPTS]
    run_schedule(sch, [(2 * i, c.request([enc(p)], cfg)) for i, (p, c) in enumerate(zip(PROMPTS, cols, strict=True))])
    assert [c.out.sequences[0][0] for c in cols] == refs
