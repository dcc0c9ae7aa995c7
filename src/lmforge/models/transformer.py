"""Decoder-only transformer (nanoGPT-style, readable top to bottom).

Options (``TransformerConfig``): grouped-query attention (``n_kv_head``), GELU (exact, or the tanh
approximation of GPT-2's ``gelu_new``) or SwiGLU MLP, LayerNorm or RMSNorm, learned or rotary positions, sequential or parallel
(GPT-J) blocks, biases, tied embeddings.

Weight names follow GPT-2 (``wte``, ``wpe``, ``h.{i}.ln_1``, ``h.{i}.attn.c_attn`` ...) so that
``hf_mapping`` writes Hugging Face GPT-2 and Llama checkpoints by copying, transposing or splitting tensors:
- ``attn.c_attn`` is the fused projection ``[q; k; v]`` with ``n_head + 2 * n_kv_head`` heads of ``head_dim`` rows,
- ``mlp.c_fc`` is ``Linear(d, hidden)`` for GELU, and the fused ``[gate; up]`` ``Linear(d, 2 * hidden)`` for SwiGLU.
RoPE uses the rotate-half (non-interleaved) convention of Hugging Face Llama.

Incremental decoding keeps a preallocated KV cache (:class:`KVCache`); see the state contract in ``base.py``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ConfigError, TransformerConfig
from lmforge.models.base import ContextLengthError, LanguageModel, lm_loss, without_onednn
from lmforge.models.native import decode_step, native_ops

_INITIAL_CAPACITY = 16
"""Cache slots of a new state; ``step`` doubles the capacity when it runs out (up to ``max_seq_len``)."""


@dataclass
class KVCache:
    """Incremental state of the transformer. ``step`` fills it in place and returns it."""

    kv: list[torch.Tensor]
    """Per layer (B, 2, n_kv_head, capacity, head_dim): keys ``[:, 0]`` and values ``[:, 1]`` in one buffer
    (one copy per layer to write a token or reorder the rows); capacity <= max_seq_len (``step`` grows it);
    slots ``[:length]`` are filled."""
    key_valid: torch.Tensor
    """(B, max_seq_len) bool: which slots hold real tokens (left padding is False)."""
    pos: torch.Tensor
    """(B,) long: valid tokens seen per row, i.e. the position id of the row's next token."""
    length: int
    """Slots used (padding included)."""
    padded: bool = False
    """Whether any slot holds padding (else a single query needs no mask)."""
    spare: list[torch.Tensor] | None = None
    """Buffers shaped like ``kv`` that the next ``reorder_state`` writes into (those of the state this one was
    reordered from): beam search reorders every step, and a fresh allocation of this size each time costs
    more than the copy (page faults)."""
    group: torch.Tensor | None = None
    """(B,) long or None: rows with the same id hold the same slots ``[:prefix]`` (the beams of one prompt share
    the prompt)."""
    prefix: int = 0
    spare_ready: bool = False
    """Whether each row of ``spare`` holds its group's ``[:prefix]``: then a reorder within the groups copies
    only the slots after it (a long prompt with a few new tokens is not copied every beam step)."""


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (max_len, head_dim), computed as Hugging Face Llama does (float32, halves repeated)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))  # (hd/2,)
    freqs = torch.arange(max_len, dtype=torch.float)[:, None] * inv_freq[None, :]  # (max_len, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (max_len, hd)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, hd); cos/sin broadcastable to it: (T, hd) or (B, 1, T, hd)."""
    half = x.size(-1) // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


Norm = nn.LayerNorm | nn.RMSNorm

NormSpec = tuple[bool, list[int], torch.Tensor | None, torch.Tensor | None, float | None]
"""(is RMSNorm, normalized shape, weight, bias (None for RMSNorm), eps (a float for LayerNorm))."""


def _norm(cfg: TransformerConfig) -> Norm:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def _norm_spec(m: Norm) -> NormSpec:
    """What the decoding fast path needs of a LayerNorm / RMSNorm module."""
    if isinstance(m, nn.LayerNorm):
        return (False, list(m.normalized_shape), m.weight, m.bias, m.eps)
    return (True, list(m.normalized_shape), m.weight, None, m.eps)


def _norm_apply(x: torch.Tensor, spec: NormSpec) -> torch.Tensor:
    rms, shape, w, b, eps = spec
    # eps is None only for an RMSNorm (the spec's flag), so layer_norm gets a float
    return F.rms_norm(x, shape, w, eps) if rms else F.layer_norm(x, shape, w, b, eps)  # type: ignore[arg-type]


@dataclass(frozen=True)
class _LayerParams:
    """One block's tensors and options as plain attributes: the decoding fast path reads them without
    ``nn.Module.__getattr__`` (a noticeable share of a small model's decoding step)."""

    parallel: bool
    ln_1: NormSpec
    ln_2: NormSpec | None
    """None for a parallel block (one norm per block)."""
    qkv: tuple[torch.Tensor, torch.Tensor | None]
    out: tuple[torch.Tensor, torch.Tensor | None]
    fc: tuple[torch.Tensor, torch.Tensor | None]
    proj: tuple[torch.Tensor, torch.Tensor | None]
    n_head: int
    n_kv_head: int
    head_dim: int
    gqa: bool
    swiglu: bool
    approximate: str

    @classmethod
    def of(cls, block: Block) -> _LayerParams:
        a, m = block.attn, block.mlp
        return cls(
            parallel=block.parallel,
            ln_1=_norm_spec(block.ln_1),
            ln_2=None if block.ln_2 is None else _norm_spec(block.ln_2),
            qkv=(a.c_attn.weight, a.c_attn.bias),
            out=(a.c_proj.weight, a.c_proj.bias),
            fc=(m.c_fc.weight, m.c_fc.bias),
            proj=(m.c_proj.weight, m.c_proj.bias),
            n_head=a.n_head,
            n_kv_head=a.n_kv_head,
            head_dim=a.head_dim,
            gqa=a.gqa,
            swiglu=m.swiglu,
            approximate=m.approximate,
        )


def _decode_layer(
    p: _LayerParams,
    x: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
    kv_cache: torch.Tensor,
    start: int,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """``Block.forward`` for one new token per row (x (B, C), no time axis) in eval mode, with functional ops
    only; writes the token's key and value into ``kv_cache`` (B, 2, nkv, capacity, hd) at slot ``start``."""
    B = x.size(0)
    hd, nq = p.head_dim, p.n_head * p.head_dim
    h = _norm_apply(x, p.ln_1)
    qkv = F.linear(h, *p.qkv)  # (B, nq + 2 nkv hd)
    q = qkv[:, :nq].view(B, p.n_head, 1, hd)
    kv = qkv[:, nq:].view(B, 2, p.n_kv_head, 1, hd)
    end = start + 1
    if rope is not None:
        q = apply_rope(q, *rope)
        kv_cache[:, 0, :, start:end] = apply_rope(kv[:, 0], *rope)
        kv_cache[:, 1, :, start:end] = kv[:, 1]
    else:
        kv_cache[:, :, :, start:end] = kv
    y = F.scaled_dot_product_attention(
        q, kv_cache[:, 0, :, :end], kv_cache[:, 1, :, :end], attn_mask=mask, enable_gqa=p.gqa
    )  # (B, nh, 1, hd)
    att = F.linear(y.reshape(B, nq), *p.out)
    if not p.parallel:
        assert p.ln_2 is not None  # a sequential block has its second norm
        x = x + att
        h = _norm_apply(x, p.ln_2)
    m = F.linear(h, *p.fc)
    if p.swiglu:
        gate, up = m.chunk(2, dim=-1)
        m = F.silu(gate) * up
    else:
        m = F.gelu(m, approximate=p.approximate)
    m = F.linear(m, *p.proj)
    return x + att + m if p.parallel else x + m


def mlp_hidden(cfg: TransformerConfig) -> int:
    """Hidden width of the MLP (the same rule for GELU and SwiGLU: ``round(mlp_ratio * d_model)``)."""
    return max(1, round(cfg.mlp_ratio * cfg.d_model))


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.n_kv_head = cfg.kv_heads
        self.head_dim = cfg.d_model // cfg.n_head
        # fused [q; k; v] projection: one matmul instead of three
        self.c_attn = nn.Linear(cfg.d_model, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=cfg.bias)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.gqa = self.n_kv_head != self.n_head

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: tuple[torch.Tensor, torch.Tensor, int] | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, C = x.size()
        hd = self.head_dim
        q, k, v = self.c_attn(x).split([self.n_head * hd, self.n_kv_head * hd, self.n_kv_head * hd], dim=2)
        q = q.view(B, T, self.n_head, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv_head, hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.n_kv_head, hd).transpose(1, 2)  # (B, nkv, T, hd)
        if rope is not None:
            cos, sin = rope[0].to(q.dtype), rope[1].to(q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            # training / full forward: causal attention over the sequence itself
            dropout_p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=self.gqa)
        else:
            k_cache, v_cache, start = cache  # (B, nkv, max_len, hd) each
            k_cache[:, :, start : start + T] = k
            v_cache[:, :, start : start + T] = v
            k_all, v_all = k_cache[:, :, : start + T], v_cache[:, :, : start + T]  # (B, nkv, S, hd)
            y = F.scaled_dot_product_attention(q.to(k_all.dtype), k_all, v_all, attn_mask=mask, enable_gqa=self.gqa)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * hd)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        hidden = mlp_hidden(cfg)
        self.swiglu = cfg.mlp == "swiglu"
        self.approximate = "tanh" if cfg.mlp == "gelu_tanh" else "none"
        # SwiGLU: fused [gate; up] projection, split exactly into Llama's gate_proj / up_proj
        self.c_fc = nn.Linear(cfg.d_model, 2 * hidden if self.swiglu else hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, hidden) or (B, T, 2 * hidden)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate=self.approximate)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.parallel = cfg.layout == "parallel"
        self.ln_1 = _norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        # parallel (GPT-J): attention and MLP read the same normalized input, so one norm per block
        self.ln_2: Norm | None = None if self.parallel else _norm(cfg)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: tuple[torch.Tensor, torch.Tensor, int] | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C); ``cache`` = (k_cache, v_cache, first free slot) when decoding."""
        if self.parallel:
            h = self.ln_1(x)
            return x + self.attn(h, rope, cache, mask) + self.mlp(h)
        assert self.ln_2 is not None  # a sequential block has its second norm
        x = x + self.attn(self.ln_1(x), rope, cache, mask)
        return x + self.mlp(self.ln_2(x))


NativeArgs = tuple[
    tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, list[torch.Tensor | None],
          torch.Tensor],
    tuple[int, int, int, bool, float, bool, int],
]
"""The native decoding step's arguments: (wte, wpe, rope_cos, rope_sin, 12 per-layer tensors, lm_head^T) and
(n_head, n_kv_head, head_dim, rms final norm, its eps, parallel, mlp kind)."""

DecodeParams = tuple[list[_LayerParams], NormSpec, torch.Tensor, NativeArgs | None]


class TransformerModel(LanguageModel):
    """Decoder-only transformer; see the module docstring."""

    config: TransformerConfig
    wpe: nn.Embedding | None
    rope_cos: torch.Tensor
    """(max_seq_len, head_dim) buffers, with ``position == "rope"`` only."""
    rope_sin: torch.Tensor

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ConfigError("model.vocab_size is not set (build the model with build_model(cfg, vocab_size=...))")
        if cfg.max_seq_len is None:
            raise ConfigError("model.max_seq_len is not set (build the model with build_model(cfg, max_seq_len=...))")
        self.config = cfg
        self.max_seq_len = cfg.max_seq_len
        self.head_dim = cfg.d_model // cfg.n_head
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.position == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = _norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if cfg.position == "rope":
            cos, sin = rope_tables(self.head_dim, cfg.max_seq_len, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)  # (max_len, hd)
            self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights(cfg)

    def _init_weights(self, cfg: TransformerConfig) -> None:
        # GPT-2: N(0, init_std) everywhere, residual output projections scaled by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                if name.endswith("bias"):
                    nn.init.zeros_(p)
                else:
                    nn.init.ones_(p)  # norm gains
            elif name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))
            else:
                nn.init.normal_(p, mean=0.0, std=cfg.init_std)

    @property
    def context_length(self) -> int:
        """``max_seq_len`` typed as an int: a transformer always has one (``__init__`` refuses a config without).

        (``max_seq_len`` itself keeps the ``int | None`` of :class:`LanguageModel`, the type protocols expect.)"""
        assert self.max_seq_len is not None
        return self.max_seq_len

    def blocks(self) -> Sequence[Block]:
        """The blocks ``h``, typed: ``nn.ModuleList`` is not generic (its items type as Module)."""
        return cast(Sequence[Block], self.h)

    # ------------------------------------------------------------------------------------- training
    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T = idx.size()
        if T > self.context_length:
            raise ContextLengthError(f"sequence of {T} tokens is longer than model.max_seq_len ({self.max_seq_len})")
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe.weight[:T]  # (T, C) broadcast over the batch
        rope = (self.rope_cos[:T], self.rope_sin[:T]) if self.wpe is None else None  # (T, hd) each
        x = self.drop(x)
        for block in self.h:
            x = block(x, rope)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        loss = lm_loss(logits, targets) if targets is not None else None
        return logits, loss

    # ------------------------------------------------------------------------------ incremental state
    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> KVCache:
        p = self.wte.weight
        device = p.device if device is None else torch.device(device)
        shape = (batch_size, 2, self.config.kv_heads, min(self.context_length, _INITIAL_CAPACITY), self.head_dim)
        return KVCache(
            kv=[torch.empty(shape, dtype=p.dtype, device=device) for _ in self.h],
            key_valid=torch.zeros(batch_size, self.context_length, dtype=torch.bool, device=device),
            pos=torch.zeros(batch_size, dtype=torch.long, device=device),
            length=0,
        )

    def step(
        self, idx: torch.Tensor, state: KVCache, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, KVCache]:
        B, T = idx.size()
        start, end = state.length, state.length + T
        if end > self.context_length:
            raise ContextLengthError(
                f"KV cache is full: {start} cached + {T} new tokens exceed model.max_seq_len ({self.max_seq_len})"
            )
        if end > state.kv[0].size(3):
            self._grow(state, end)
        if T == 1 and valid is None and not self.training:
            return self._decode_one(idx, state)
        if valid is None:  # every new token is real (one token per row in eval mode took _decode_one above)
            pos = state.pos[:, None] + torch.arange(T, device=idx.device)  # (B, T)
            state.key_valid[:, start:end] = True
            state.pos = state.pos + T
        else:
            valid = valid.to(torch.bool)
            # position ids count only valid tokens; left padding gets position 0 (it is never attended to)
            pos = (state.pos[:, None] + valid.cumsum(1) - 1).clamp_(min=0)  # (B, T)
            state.key_valid[:, start:end] = valid
            state.pos = state.pos + valid.sum(1)
            state.padded = state.padded or not bool(valid.all())

        key_valid = state.key_valid[:, :end]  # (B, S)
        if T == 1 and not state.padded:
            mask = None  # one query that may see every cached key
        else:
            q_slot = torch.arange(start, end, device=idx.device)[:, None]  # (T, 1)
            k_slot = torch.arange(end, device=idx.device)[None, :]  # (1, S)
            # causal and not padding; a padding query also sees itself so its softmax stays finite
            mask = ((k_slot <= q_slot) & key_valid[:, None, :]) | (k_slot == q_slot)  # (B, T, S)
            mask = mask[:, None]  # (B, 1, T, S)

        x = self.wte(idx)  # (B, T, C)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(pos)
        else:
            rope = (self.rope_cos[pos][:, None], self.rope_sin[pos][:, None])  # (B, 1, T, hd) each
        x = self.drop(x)
        for i, block in enumerate(self.h):
            x = block(x, rope, (state.kv[i][:, 0], state.kv[i][:, 1], start), mask)
        state.length = end
        return self.lm_head(self.ln_f(x)), state

    def _decode_one(self, idx: torch.Tensor, state: KVCache) -> tuple[torch.Tensor, KVCache]:
        """``step`` for one real token per row in eval mode: the same computation, written with functional
        ops only (about a dozen per layer), since decoding small models is bound by per-op overhead. The
        C++ build of these ops (:mod:`lmforge.models.native`) runs instead when it is available."""
        start = state.length
        end = start + 1
        pos = state.pos  # (B,)
        state.key_valid[:, start] = True
        state.pos = pos + 1
        # one query per row sees every filled slot that is not padding
        mask = state.key_valid[:, None, None, :end] if state.padded else None  # (B, 1, 1, S)
        layers, ln_f, head, native_args = self._decode_params()
        state.length = end
        if native_args is not None and (native := decode_step()) is not None:
            (*args, head_t), options = native_args
            logits = native(idx.view(-1), pos, *args, state.kv, start, mask, ln_f[2], ln_f[3], head_t, *options)
            return logits[:, None], state
        x = F.embedding(idx.view(-1), self.wte.weight)  # (B, C)
        rope = None
        if self.wpe is not None:
            x = x + F.embedding(pos, self.wpe.weight)
        else:
            rope = (
                self.rope_cos[pos][:, None, None].to(x.dtype),
                self.rope_sin[pos][:, None, None].to(x.dtype),
            )  # (B, 1, 1, hd) each
        for p, kv in zip(layers, state.kv, strict=True):
            x = _decode_layer(p, x, rope, kv, start, mask)
        return F.linear(_norm_apply(x, ln_f), head)[:, None], state

    def _decode_params(self) -> DecodeParams:
        """The decoding fast path's view of the parameters (and the native step's arguments), cached until
        ``train``/``eval``/``to`` (which every :func:`~lmforge.predict.generate` call goes through); in-place
        updates stay visible."""
        cached: DecodeParams | None = self.__dict__.get("_decode_cache")
        if cached is None:
            layers = [_LayerParams.of(b) for b in self.blocks()]
            ln_f = _norm_spec(self.ln_f)
            native_args: NativeArgs | None = None
            if layers and ln_f[4] is not None and self.wte.weight.device.type == "cpu":  # (GPUs: not tried yet)
                # the native step's arguments: 12 tensors (or None) per layer, then the options
                flat: list[torch.Tensor | None] = []
                for p in layers:
                    ln_2 = p.ln_2 or (None, None, None, None)
                    linears = (p.qkv, p.out, p.fc, p.proj)
                    qkv, out, fc, proj = ((w.t(), b) for w, b in linears)  # transposed views, made once
                    flat += [p.ln_1[2], p.ln_1[3], *qkv, *out, ln_2[2], ln_2[3], *fc, *proj]
                first = layers[0]
                mlp = 2 if first.swiglu else (1 if first.approximate == "tanh" else 0)
                wpe = None if self.wpe is None else self.wpe.weight
                rope = (getattr(self, "rope_cos", None), getattr(self, "rope_sin", None))
                args = (self.wte.weight, wpe, *rope, flat, self.lm_head.weight.t())
                n_heads = (first.n_head, first.n_kv_head, first.head_dim)
                native_args = (args, (*n_heads, ln_f[0], float(ln_f[4]), first.parallel, mlp))
            cached = (layers, ln_f, self.lm_head.weight, native_args)
            self.__dict__["_decode_cache"] = cached
        return cached

    def train(self, mode: bool = True) -> TransformerModel:
        self.__dict__.pop("_decode_cache", None)
        return super().train(mode)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], *args: Any, **kwargs: Any) -> TransformerModel:
        # .to(), .half(), ...: parameters may be new tensors
        self.__dict__.pop("_decode_cache", None)
        return super()._apply(fn, *args, **kwargs)

    def reserve_state(self, state: KVCache, length: int) -> None:
        if length > state.kv[0].size(3):
            self._grow(state, min(length, self.context_length), exact=True)

    def _grow(self, state: KVCache, end: int, exact: bool = False) -> None:
        """Give the cache room for slots ``[:end]`` (capacity doubles unless ``exact``, up to ``max_seq_len``)."""
        cap = state.kv[0].size(3)
        new_cap = end if exact else min(self.context_length, max(end, 2 * cap, _INITIAL_CAPACITY))
        L = state.length

        def grow(t: torch.Tensor) -> torch.Tensor:
            out = t.new_empty((*t.shape[:3], new_cap, t.size(4)))  # slots past ``length`` are never read
            out[:, :, :, :L] = t[:, :, :, :L]
            return out

        state.kv = [grow(t) for t in state.kv]
        state.spare, state.spare_ready = None, False

    def reorder_state(self, state: KVCache, index: torch.Tensor) -> KVCache:
        # Beam search reorders every step: copy the filled slots, into the spare buffers when the shapes allow
        # (then the state given is overwritten by the next reorder, as the contract allows), and not the
        # shared prefix when every row takes a row of its own group and the spare rows already hold it.
        B, L = index.numel(), state.length
        same_rows = state.kv[0].size(0) == B
        spare = state.spare
        ready = state.spare_ready
        if spare is None or spare[0].shape != (B, *state.kv[0].shape[1:]):
            spare = [t.new_empty((B, *t.shape[1:])) for t in state.kv]
            ready = False
        if same_rows and state.group is not None:
            group, prefix = state.group.index_select(0, index), state.prefix
            within = bool(torch.equal(group, state.group))
        else:  # new rows (beams from prompts, rows dropped): rows copied from the same row agree on [:L]
            group, prefix, within = index, L, False
        start = prefix if within and ready else 0
        ops = native_ops() if index.device.type == "cpu" else None
        if ops is not None:
            ops.reorder(state.kv, spare, index, start, L)  # the same copies, without a Python call per layer
        else:
            for src, dst in zip(state.kv, spare, strict=True):
                torch.index_select(src[:, :, :, start:L], 0, index, out=dst[:, :, :, start:L])
        return KVCache(
            kv=spare,
            key_valid=state.key_valid.index_select(0, index),
            pos=state.pos.index_select(0, index),
            length=L,
            padded=state.padded,
            spare=state.kv if same_rows else None,
            group=group,
            prefix=prefix,
            # the buffers just read from hold every row's prefix for these groups, unless the groups changed
            spare_ready=same_rows and within,
        )

    def state_length(self, state: KVCache) -> int:
        return state.length

    def decoding(self) -> contextlib.AbstractContextManager:
        return without_onednn()  # its GELU costs 4 us a call more than the native kernel at decoding sizes

    # ------------------------------------------------------------------------------------- accounting
    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (tied weights once). ``exclude_embeddings`` leaves out the lookup tables
        (positions; tokens unless tied: a tied matrix also does the output projection's matmul)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            if self.wpe is not None:
                n -= self.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        T = seq_len or self.context_length
        cfg = self.config
        return 6.0 * self.num_params(exclude_embeddings=True) + 12.0 * cfg.n_layer * cfg.d_model * T
