"""Parity with Hugging Face GPT-2 and Llama: tiny random configs built locally, weights copied both ways."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import TransformerConfig
from lmforge.models import build_model
from lmforge.models.hf_mapping import HFMappingError, from_hf_state_dict, hf_format, to_hf_state_dict

transformers = pytest.importorskip("transformers")

V, T = 50, 16

GPT2_CFG = TransformerConfig(n_layer=2, d_model=32, n_head=4, norm_eps=1e-5)
LLAMA_CFG = TransformerConfig(
    n_layer=2,
    d_model=32,
    n_head=4,
    n_kv_head=2,
    position="rope",
    rope_theta=500.0,
    norm="rmsnorm",
    mlp="swiglu",
    mlp_ratio=2.75,
    bias=False,
    tie_embeddings=False,
    norm_eps=1e-6,
)


def _ours(cfg: TransformerConfig):
    torch.manual_seed(0)
    m = build_model(cfg, vocab_size=V, max_seq_len=T).eval()
    with torch.no_grad():  # norm gains / biases away from 1 / 0 so a mis-mapped one shows
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    return m


def _hf_model(fmt: str, hf_config: dict):
    kwargs = {k: v for k, v in hf_config.items() if k != "model_type"}
    config = transformers.AutoConfig.for_model(fmt, **kwargs)
    cls = transformers.GPT2LMHeadModel if fmt == "gpt2" else transformers.LlamaForCausalLM
    return cls(config).eval()


@pytest.mark.parametrize(
    ("cfg", "fmt"),
    [
        (GPT2_CFG, "gpt2"),
        (GPT2_CFG.model_copy(update={"tie_embeddings": False, "mlp_ratio": 3.0}), "gpt2"),
        (LLAMA_CFG, "llama"),
        (LLAMA_CFG.model_copy(update={"tie_embeddings": True, "n_kv_head": None}), "llama"),
    ],
    ids=["gpt2-tied", "gpt2-untied", "llama-gqa-untied", "llama-mha-tied"],
)
def test_logits_match_hf_with_copied_weights(cfg, fmt):
    ours = _ours(cfg)
    got_fmt, hf_config, sd = to_hf_state_dict(ours)
    assert got_fmt == fmt
    hf = _hf_model(fmt, hf_config)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected
    assert set(missing) <= ({"lm_head.weight"} if cfg.tie_embeddings else set())
    if cfg.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    idx = torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(idx).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cfg", [GPT2_CFG, LLAMA_CFG], ids=["gpt2", "llama"])
def test_from_hf_state_dict_reproduces_a_random_hf_model(cfg):
    fmt, hf_config, _ = to_hf_state_dict(_ours(cfg))
    torch.manual_seed(3)
    hf = _hf_model(fmt, hf_config)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours = from_hf_state_dict(fmt, hf_config, hf.state_dict()).eval()
    assert ours.config == cfg.model_copy(update={"vocab_size": V, "max_seq_len": T})
    idx = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(idx).logits, atol=1e-5, rtol=0)


def test_round_trip_is_exact():
    for cfg in (GPT2_CFG, LLAMA_CFG):
        ours = _ours(cfg)
        back = from_hf_state_dict(*to_hf_state_dict(ours))
        for (name, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items(), strict=True):
            assert torch.equal(a, b), name


def test_gpt2_original_key_layout_is_accepted():
    """Original GPT-2 files have no ``transformer.`` prefix and carry causal-mask buffers."""
    fmt, hf_config, sd = to_hf_state_dict(_ours(GPT2_CFG))
    raw = {k.removeprefix("transformer."): v for k, v in sd.items()}
    raw["h.0.attn.bias"] = torch.ones(1, 1, T, T)
    raw["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    model = from_hf_state_dict(fmt, hf_config, raw)
    assert torch.equal(model.h[0].attn.c_attn.bias, sd["transformer.h.0.attn.c_attn.bias"])


@pytest.mark.parametrize(
    ("update", "match"),
    [
        ({"layout": "parallel"}, "parallel"),
        ({"norm": "rmsnorm"}, "match neither"),
        ({"position": "rope"}, "match neither"),
        ({"n_kv_head": 2}, "grouped-query"),
    ],
)
def test_unmappable_options_raise_a_clear_error(update, match):
    cfg = GPT2_CFG.model_copy(update=update)
    with pytest.raises(HFMappingError, match=match):
        hf_format(cfg)


def test_unsupported_hf_configs_raise_a_clear_error():
    _, hf_config, sd = to_hf_state_dict(_ours(LLAMA_CFG))
    with pytest.raises(HFMappingError, match="hidden_act"):
        from_hf_state_dict("llama", {**hf_config, "hidden_act": "gelu"}, sd)
    with pytest.raises(HFMappingError, match="lacks"):
        from_hf_state_dict("llama", hf_config, {k: v for k, v in sd.items() if "layers.1.mlp" not in k})
    with pytest.raises(HFMappingError, match="unknown HF format"):
        from_hf_state_dict("bert", hf_config, sd)
