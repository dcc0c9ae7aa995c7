"""Transformer specifics: context limits, hand-counted parameters and FLOPs, GPT-2 init, rebuild from config."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import TransformerConfig
from lmforge.models import ContextLengthError, build_model

V = 50


def test_forward_longer_than_max_seq_len_is_a_clear_error():
    m = build_model(TransformerConfig(n_layer=1, d_model=16, n_head=2), vocab_size=V, max_seq_len=8)
    m(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ContextLengthError, match="max_seq_len"):
        m(torch.zeros(1, 9, dtype=torch.long))


def test_step_past_max_seq_len_is_a_clear_error():
    m = build_model(TransformerConfig(n_layer=1, d_model=16, n_head=2, position="rope"), vocab_size=V, max_seq_len=8)
    state = m.init_state(2)
    _, state = m.step(torch.zeros(2, 7, dtype=torch.long), state)
    _, state = m.step(torch.zeros(2, 1, dtype=torch.long), state)  # exactly full is fine
    assert m.state_length(state) == 8
    with pytest.raises(ContextLengthError, match=r"8 cached \+ 1 new tokens exceed model.max_seq_len \(8\)"):
        m.step(torch.zeros(2, 1, dtype=torch.long), state)


@pytest.mark.parametrize("T", [8, 64])
def test_gpt2_like_params_and_flops_by_hand(T):
    L, d = 3, 48
    m = build_model(TransformerConfig(n_layer=L, d_model=d, n_head=4), vocab_size=V, max_seq_len=T)
    per_layer = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (4 * d * d + 4 * d) + (4 * d * d + d)
    total = L * per_layer + V * d + T * d + 2 * d  # tied head counted once
    assert m.num_params() == total
    assert m.num_params(exclude_embeddings=True) == total - T * d  # tied matrix stays: it is the output matmul
    assert m.flops_per_token(T) == 6 * (total - T * d) + 12 * L * d * T
    assert m.flops_per_token() == m.flops_per_token(T)  # default: the full context


def test_llama_like_params_by_hand():
    L, d, nh, nkv, ratio = 2, 32, 4, 2, 3.0
    cfg = TransformerConfig(
        n_layer=L,
        d_model=d,
        n_head=nh,
        n_kv_head=nkv,
        mlp_ratio=ratio,
        position="rope",
        norm="rmsnorm",
        mlp="swiglu",
        bias=False,
        tie_embeddings=False,
    )
    m = build_model(cfg, vocab_size=V, max_seq_len=16)
    hd, h = d // nh, int(ratio * d)
    per_layer = d + d * (nh + 2 * nkv) * hd + d * d + d + 3 * d * h
    assert m.num_params() == L * per_layer + 2 * V * d + d
    assert m.num_params(exclude_embeddings=True) == L * per_layer + V * d + d


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    L, std = 4, 0.05
    m = build_model(TransformerConfig(n_layer=L, d_model=128, n_head=4, init_std=std), vocab_size=V, max_seq_len=16)
    blk = m.h[0]
    assert blk.attn.c_attn.weight.std().item() == pytest.approx(std, rel=0.05)
    assert blk.mlp.c_proj.weight.std().item() == pytest.approx(std / (2 * L) ** 0.5, rel=0.05)
    assert blk.attn.c_proj.weight.std().item() == pytest.approx(std / (2 * L) ** 0.5, rel=0.05)
    assert torch.all(blk.attn.c_attn.bias == 0) and torch.all(blk.ln_1.weight == 1)


def test_rebuild_from_resolved_config_gives_the_same_model():
    cfg = TransformerConfig(n_layer=2, d_model=32, n_head=4, n_kv_head=2, position="rope", mlp="swiglu")
    assert cfg.vocab_size is None and cfg.max_seq_len is None
    m = build_model(cfg, vocab_size=V, max_seq_len=24).eval()
    assert m.config.vocab_size == V and m.config.max_seq_len == 24 and m.max_seq_len == 24
    again = build_model(m.config).eval()
    again.load_state_dict(m.state_dict())  # strict: same names and shapes
    idx = torch.randint(0, V, (2, 24))
    torch.testing.assert_close(again(idx)[0], m(idx)[0], atol=0, rtol=0)


def test_dropout_is_active_in_training_only():
    m = build_model(TransformerConfig(n_layer=1, d_model=16, n_head=2, dropout=0.5), vocab_size=V, max_seq_len=8)
    idx = torch.randint(0, V, (2, 8))
    m.train()
    assert not torch.equal(m(idx)[0], m(idx)[0])
    m.eval()
    assert torch.equal(m(idx)[0], m(idx)[0])
