"""Map lmforge transformer weights to and from Hugging Face GPT-2 and Llama (pure torch; no transformers import).

- ``gpt2``: learned positions, LayerNorm, GELU (tanh), sequential blocks, biases, ``n_kv_head == n_head``.
  Names are the same (``transformer.`` prefix); HF stores linear weights as ``Conv1D`` (in, out): transposed.
- ``llama``: rotary positions, RMSNorm, SwiGLU, no biases, sequential blocks, any ``n_kv_head``.
  ``attn.c_attn`` splits into ``q_proj``/``k_proj``/``v_proj`` and ``mlp.c_fc`` into ``gate_proj``/``up_proj``;
  lmforge applies RoPE with the same rotate-half convention, so no permutation is needed.

Anything else (parallel blocks, a mix such as rope + LayerNorm) has no exact HF counterpart and raises
:class:`HFMappingError`. State dicts returned here hold independent contiguous tensors (safetensors-ready);
with tied embeddings ``lm_head.weight`` is left out, as in HF checkpoints.
"""

from __future__ import annotations

from typing import Any

import torch

from lmforge.config import LmforgeError, TransformerConfig
from lmforge.models.transformer import TransformerModel, mlp_hidden

FORMATS = ("gpt2", "llama")


class HFMappingError(LmforgeError, ValueError):
    """The model (or the HF checkpoint) has no exact counterpart in the other format."""


def hf_format(cfg: TransformerConfig) -> str:
    """``"gpt2"`` or ``"llama"``: the HF architecture that reproduces ``cfg`` exactly, else HFMappingError."""
    if cfg.layout != "sequential":
        raise HFMappingError("model.layout 'parallel' has no exact Hugging Face GPT-2 / Llama counterpart")
    gpt2 = dict(position="learned", norm="layernorm", mlp=("gelu", "gelu_tanh"), bias=True)
    llama = dict(position="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    if all(getattr(cfg, k) in (v if isinstance(v, tuple) else (v,)) for k, v in gpt2.items()):
        if cfg.kv_heads != cfg.n_head:
            raise HFMappingError(
                f"model.n_kv_head ({cfg.n_kv_head}) < n_head ({cfg.n_head}): GPT-2 has no grouped-query attention"
            )
        return "gpt2"
    if all(getattr(cfg, k) == v for k, v in llama.items()):
        return "llama"
    got = {k: getattr(cfg, k) for k in gpt2}
    raise HFMappingError(f"model options {got} match neither GPT-2 {gpt2} nor Llama {llama}")


def _c(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().contiguous()


def to_hf_state_dict(model: TransformerModel) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """lmforge transformer -> (format, HF ``config.json`` dict, HF state dict)."""
    cfg: TransformerConfig = model.config
    fmt = hf_format(cfg)
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    config: dict[str, Any]
    nh, nkv, hd = cfg.n_head, cfg.kv_heads, cfg.d_model // cfg.n_head
    if fmt == "gpt2":
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        for name, t in sd.items():
            if name == "lm_head.weight":
                continue
            out["transformer." + name] = _c(t.t()) if name.endswith(conv1d) else _c(t)
        config = {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": cfg.vocab_size,
            "n_positions": cfg.max_seq_len,
            "n_embd": cfg.d_model,
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_inner": mlp_hidden(cfg),
            # GPT-2's own "gelu_new" is the tanh approximation; "gelu" is the exact one
            "activation_function": "gelu_new" if cfg.mlp == "gelu_tanh" else "gelu",
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.dropout,
            "initializer_range": cfg.init_std,
            "tie_word_embeddings": cfg.tie_embeddings,
            "bos_token_id": None,  # the tokenizer's special tokens are the exporter's business
            "eos_token_id": None,
        }
    else:
        out["model.embed_tokens.weight"] = _c(sd["wte.weight"])
        for i in range(cfg.n_layer):
            p, q = f"h.{i}.", f"model.layers.{i}."
            wq, wk, wv = sd[p + "attn.c_attn.weight"].split([nh * hd, nkv * hd, nkv * hd], dim=0)
            gate, up = sd[p + "mlp.c_fc.weight"].chunk(2, dim=0)
            out[q + "input_layernorm.weight"] = _c(sd[p + "ln_1.weight"])
            out[q + "self_attn.q_proj.weight"] = _c(wq)
            out[q + "self_attn.k_proj.weight"] = _c(wk)
            out[q + "self_attn.v_proj.weight"] = _c(wv)
            out[q + "self_attn.o_proj.weight"] = _c(sd[p + "attn.c_proj.weight"])
            out[q + "post_attention_layernorm.weight"] = _c(sd[p + "ln_2.weight"])
            out[q + "mlp.gate_proj.weight"] = _c(gate)
            out[q + "mlp.up_proj.weight"] = _c(up)
            out[q + "mlp.down_proj.weight"] = _c(sd[p + "mlp.c_proj.weight"])
        out["model.norm.weight"] = _c(sd["ln_f.weight"])
        config = {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model,
            "intermediate_size": mlp_hidden(cfg),
            "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": nh,
            "num_key_value_heads": nkv,
            "head_dim": hd,
            "hidden_act": "silu",
            "max_position_embeddings": cfg.max_seq_len,
            "rms_norm_eps": cfg.norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "attention_bias": False,
            "mlp_bias": False,
            "attention_dropout": cfg.dropout,
            "initializer_range": cfg.init_std,
            "tie_word_embeddings": cfg.tie_embeddings,
            "bos_token_id": None,
            "eos_token_id": None,
        }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = _c(sd["lm_head.weight"])
    return fmt, config, out


def config_from_hf(fmt: str, hf_config: dict[str, Any]) -> TransformerConfig:
    """HF ``config.json`` dict -> the lmforge TransformerConfig with the same architecture."""

    def get(*names: str, default: Any = None) -> Any:
        for n in names:
            if hf_config.get(n) is not None:
                return hf_config[n]
        if default is None:
            raise HFMappingError(f"HF {fmt} config lacks {names[0]!r}")
        return default

    def must(name: str, ok: Any, default: Any) -> None:
        value = hf_config.get(name, default)
        if value not in ok:
            raise HFMappingError(f"HF {fmt} config {name} = {value!r} is not supported (supported: {list(ok)})")

    if fmt == "gpt2":
        act = hf_config.get("activation_function", "gelu_new")
        must("activation_function", ("gelu_new", "gelu_pytorch_tanh", "gelu"), "gelu_new")
        must("scale_attn_weights", (True,), True)
        must("scale_attn_by_inverse_layer_idx", (False,), False)
        d = get("n_embd", "hidden_size")
        inner = get("n_inner", default=4 * d)
        return TransformerConfig(
            vocab_size=get("vocab_size"),
            max_seq_len=get("n_positions", "max_position_embeddings"),
            n_layer=get("n_layer", "num_hidden_layers"),
            d_model=d,
            n_head=get("n_head", "num_attention_heads"),
            mlp_ratio=inner / d,
            mlp="gelu" if act == "gelu" else "gelu_tanh",
            norm="layernorm",
            norm_eps=get("layer_norm_epsilon", default=1e-5),
            position="learned",
            layout="sequential",
            bias=True,
            dropout=get("resid_pdrop", default=0.0),
            init_std=get("initializer_range", default=0.02),
            tie_embeddings=get("tie_word_embeddings", default=True),
        )
    if fmt == "llama":
        must("hidden_act", ("silu",), "silu")
        must("attention_bias", (False,), False)
        must("mlp_bias", (False,), False)
        rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise HFMappingError(
                f"HF llama config rope type {rope.get('rope_type', rope.get('type'))!r} is not supported"
            )
        d, nh = get("hidden_size"), get("num_attention_heads")
        if hf_config.get("head_dim") not in (None, d // nh):
            raise HFMappingError(f"HF llama config head_dim = {hf_config['head_dim']} differs from hidden_size/heads")
        return TransformerConfig(
            vocab_size=get("vocab_size"),
            max_seq_len=get("max_position_embeddings"),
            n_layer=get("num_hidden_layers"),
            d_model=d,
            n_head=nh,
            n_kv_head=get("num_key_value_heads", default=nh),
            mlp_ratio=get("intermediate_size") / d,
            mlp="swiglu",
            norm="rmsnorm",
            norm_eps=get("rms_norm_eps", default=1e-6),
            position="rope",
            rope_theta=rope.get("rope_theta") or get("rope_theta", default=10000.0),
            layout="sequential",
            bias=False,
            dropout=get("attention_dropout", default=0.0),
            init_std=get("initializer_range", default=0.02),
            tie_embeddings=get("tie_word_embeddings", default=False),
        )
    raise HFMappingError(f"unknown HF format {fmt!r}; known: {list(FORMATS)}")


def from_hf_state_dict(fmt: str, hf_config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> TransformerModel:
    """(format, HF config dict, HF state dict) -> an lmforge TransformerModel holding those weights.

    Keys may carry the usual prefix (``transformer.`` / ``model.``) or not (original GPT-2 files); GPT-2's
    causal-mask buffers (``attn.bias``, ``attn.masked_bias``) are ignored.
    """
    cfg = config_from_hf(fmt, hf_config)
    if mlp_hidden(cfg) != (hf_config.get("n_inner") or hf_config.get("intermediate_size") or 4 * cfg.d_model):
        raise HFMappingError(f"HF {fmt} MLP width is not representable as round(mlp_ratio * d_model)")
    model = TransformerModel(cfg)
    prefix = "transformer." if fmt == "gpt2" else "model."
    hf = {k.removeprefix(prefix): v for k, v in state_dict.items()}
    ours: dict[str, torch.Tensor] = {}
    if fmt == "gpt2":
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        for name, t in hf.items():
            if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
                continue
            ours[name] = t.t() if name.endswith(conv1d) else t
    else:
        try:
            ours.update(_llama_to_ours(hf, cfg))
        except KeyError as err:
            raise HFMappingError(f"HF llama state dict lacks {err.args[0]!r}") from None
    if not cfg.tie_embeddings and "lm_head.weight" not in hf:
        raise HFMappingError(f"HF {fmt} state dict lacks 'lm_head.weight' (tie_word_embeddings is false)")
    head = ours.get("wte.weight") if cfg.tie_embeddings else hf["lm_head.weight"]
    if head is not None:
        ours["lm_head.weight"] = head
    missing, unexpected = model.load_state_dict(ours, strict=False)
    if missing or unexpected:
        raise HFMappingError(f"HF {fmt} state dict does not fit: missing {missing}, unexpected {unexpected}")
    return model


def _llama_to_ours(hf: dict[str, torch.Tensor], cfg: TransformerConfig) -> dict[str, torch.Tensor]:
    """Llama keys (without the ``model.`` prefix) -> lmforge keys; fuses q/k/v and gate/up."""
    ours = {"wte.weight": hf["embed_tokens.weight"], "ln_f.weight": hf["norm.weight"]}
    for i in range(cfg.n_layer):
        p, q = f"h.{i}.", f"layers.{i}."
        ours[p + "ln_1.weight"] = hf[q + "input_layernorm.weight"]
        ours[p + "attn.c_attn.weight"] = torch.cat([hf[q + f"self_attn.{n}_proj.weight"] for n in "qkv"], dim=0)
        ours[p + "attn.c_proj.weight"] = hf[q + "self_attn.o_proj.weight"]
        ours[p + "ln_2.weight"] = hf[q + "post_attention_layernorm.weight"]
        ours[p + "mlp.c_fc.weight"] = torch.cat([hf[q + "mlp.gate_proj.weight"], hf[q + "mlp.up_proj.weight"]], dim=0)
        ours[p + "mlp.c_proj.weight"] = hf[q + "mlp.down_proj.weight"]
    return ours
