"""The engine on the real model families (transformer, lstm, gru, rcnn, hf), against uncached references,
exhaustive search, and HF transformers' own ``generate`` on the same weights."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import HFModelConfig, RCNNConfig, RecurrentConfig, TransformerConfig
from lmforge.models import build_model
from lmforge.predict import GenerationConfig, GenerationError, generate
from support.generate import brute_force, uncached_greedy

FAMILIES = {
    "gpt": lambda: TransformerConfig(n_layer=2, d_model=32, n_head=4, init_std=0.3),
    "llama": lambda: TransformerConfig(
        n_layer=2,
        d_model=32,
        n_head=4,
        n_kv_head=2,
        position="rope",
        norm="rmsnorm",
        mlp="swiglu",
        bias=False,
        init_std=0.3,
    ),
    "lstm": lambda: RecurrentConfig(family="lstm", n_layer=2, d_model=32, init_std=0.3),
    "gru": lambda: RecurrentConfig(family="gru", n_layer=2, d_model=32, init_std=0.3),
    "rcnn": lambda: RCNNConfig(n_layer=2, d_model=32, kernel_size=3, init_std=0.3),
}


def make(name: str, vocab: int = 40, ctx: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(FAMILIES[name](), vocab_size=vocab, max_seq_len=ctx).eval()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_greedy_batched_equals_uncached(name):
    model = make(name)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8], [9, 10, 11], [12, 13]]
    eos = uncached_greedy(model, prompts[0], 12)[0][5]
    out = generate(model, prompts, GenerationConfig(max_new_tokens=12, eos_token_id=eos))
    for i, p in enumerate(prompts):
        ref, ref_lp = uncached_greedy(model, p, 12, eos=[eos])
        assert out.sequences[i] == [ref]
        assert out.scores[i][0] == pytest.approx(ref_lp, abs=1e-3)
    assert out.finish_reasons[0] == ["eos"]


@pytest.mark.parametrize("name", ["gpt", "gru", "rcnn"])
def test_family_beam_search_is_exact(name):
    V, steps, eos = 5, 3, 0
    model = make(name, vocab=V)
    cfg = GenerationConfig(max_new_tokens=steps, num_beams=V ** (steps - 1), num_return_sequences=5, eos_token_id=eos)
    prompts = [[1, 2, 3], [4]]
    out = generate(model, prompts, cfg)
    for i, p in enumerate(prompts):
        ref = brute_force(model, p, V, steps, eos, 1.0)[:5]
        assert out.sequences[i] == [r[1] for r in ref]
        assert out.scores[i] == pytest.approx([r[0] for r in ref], abs=1e-4)


@pytest.mark.parametrize("name", ["gpt", "lstm"])
def test_family_sampling_reproducible(name):
    model = make(name)
    cfg = GenerationConfig(max_new_tokens=8, do_sample=True, top_k=10, top_p=0.9, seed=3, num_return_sequences=2)
    a = generate(model, [[1, 2], [3]], cfg)
    assert a.sequences == generate(model, [[1, 2], [3]], cfg).sequences


def test_transformer_context_limits():
    model = make("gpt", ctx=16)
    with pytest.raises(GenerationError, match=r"20 tokens.*16"):
        generate(model, [list(range(20))], GenerationConfig(max_new_tokens=2))
    out = generate(
        model, [list(range(20)), [1]], GenerationConfig(max_new_tokens=4, truncate_prompt=True, eos_token_id=[])
    )
    assert out.sequences[0] == [uncached_greedy(model, list(range(8, 20)), 4)[0]]
    # different budgets from max_length: the engine splits the batch so the padded cache never overflows
    out = generate(model, [[1], list(range(14))], GenerationConfig(max_length=16, eos_token_id=[]))
    assert [len(s[0]) for s in out.sequences] == [15, 2]
    assert out.sequences[0] == [uncached_greedy(model, [1], 15)[0]]


# ------------------------------------------------------------------------------ HF transformers parity
def _hf_gpt2(model):
    transformers = pytest.importorskip("transformers")
    from lmforge.models.hf_mapping import to_hf_state_dict

    fmt, cfg, sd = to_hf_state_dict(model)
    assert fmt == "gpt2"
    hf_cfg = transformers.GPT2Config(**{k: v for k, v in cfg.items() if k not in ("model_type", "architectures")})
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    hf.load_state_dict(sd, strict=False)  # lm_head is tied to the embedding
    return hf


def _hf_new_tokens(row: list[int], prompt_len: int, eos: int) -> list[int]:
    new = row[prompt_len:]
    return new[: new.index(eos)] if eos in new else new


@pytest.mark.parametrize(
    "beam_kw",
    [
        {"num_beams": 1},
        {"num_beams": 3, "num_return_sequences": 2, "length_penalty": 1.0, "early_stopping": False},
        {"num_beams": 4, "num_return_sequences": 3, "length_penalty": 2.0, "early_stopping": True},
        {"num_beams": 3, "num_return_sequences": 3, "length_penalty": 0.5, "early_stopping": "never"},
    ],
    ids=["greedy", "beam-false", "beam-true", "beam-never"],
)
def test_matches_hf_generate(beam_kw):
    model = make("gpt", vocab=12, ctx=32, seed=5)
    hf = _hf_gpt2(model)
    prompts = [[1, 2, 3, 4], [5, 6], [7]]
    eos = 3
    cfg = GenerationConfig(max_new_tokens=10, eos_token_id=eos, **beam_kw)
    ours = generate(model, prompts, cfg)
    R = beam_kw.get("num_return_sequences", 1)
    for i, p in enumerate(prompts):
        with torch.inference_mode():
            res = hf.generate(
                torch.tensor([p]),
                attention_mask=torch.ones(1, len(p), dtype=torch.long),
                do_sample=False,
                max_new_tokens=10,
                eos_token_id=eos,
                pad_token_id=eos,
                output_scores=True,
                return_dict_in_generate=True,
                **{k: v for k, v in beam_kw.items()},
            )
        theirs = [_hf_new_tokens(r, len(p), eos) for r in res.sequences.tolist()]
        assert ours.sequences[i] == theirs[:R]
        if beam_kw["num_beams"] > 1:
            assert ours.scores[i] == pytest.approx(res.sequences_scores.tolist(), abs=1e-4)


def test_hf_family_through_the_engine():
    transformers = pytest.importorskip("transformers")
    from lmforge.models.hf import HFCausalLM

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=30, n_positions=32, n_embd=32, n_layer=2, n_head=4, initializer_range=0.3)
    ).eval()
    model = HFCausalLM(HFModelConfig(path="in-memory"), hf_model=hf).eval()
    prompts = [[1, 2, 3, 4, 5], [6], [7, 8]]
    out = generate(model, prompts, GenerationConfig(max_new_tokens=8, eos_token_id=[]))
    for i, p in enumerate(prompts):
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=8, min_new_tokens=8, pad_token_id=0)
        assert out.sequences[i] == [ref[0, len(p) :].tolist()]
    beams = generate(model, prompts, GenerationConfig(max_new_tokens=6, num_beams=3, eos_token_id=[]))
    for i, p in enumerate(prompts):
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([p]), do_sample=False, num_beams=3, max_new_tokens=6, pad_token_id=0)
        assert beams.sequences[i] == [ref[0, len(p) :].tolist()]
