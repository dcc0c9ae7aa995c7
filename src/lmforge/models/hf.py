"""Family ``hf``: any local Hugging Face causal LM behind the lmforge model contract.

``HFModelConfig.path`` is a local directory holding ``config.json`` and weights (``hf:NAME`` is passed to
``from_pretrained`` as ``NAME``, for users with a network). transformers is imported only when such a model is
built; ``lmforge.models`` finds this module through its lazy registry.

Training uses the HF model's logits with lmforge's loss (targets are already shifted, ``-100`` ignored); the
checkpoint's own dropout settings apply (``model.dropout``, ``init_std`` and ``tie_embeddings`` are not used).
``max_seq_len`` is the checkpoint's position limit (``n_positions`` / ``max_position_embeddings``); a longer
``model.max_seq_len`` / ``data.block_size`` is a :class:`ConfigError`.
Incremental decoding keeps the HF cache plus the attention mask and position ids that HF needs for left padding
(:class:`HFState`), so one lmforge generation engine drives HF models too.

No code from a model folder ever runs: :func:`refuse_remote_code` rejects a folder whose ``config.json`` or
``tokenizer_config.json`` has an ``auto_map`` (transformers' hook for the folder's own ``*.py`` modules) before
transformers is imported, and every transformers loader gets ``trust_remote_code=False``.
"""

from __future__ import annotations

import copy
import inspect
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from lmforge.config import ConfigError, HFModelConfig, LmforgeError
from lmforge.models import memory, register_model
from lmforge.models.base import ContextLengthError, LanguageModel, lm_loss
from lmforge.models.hf_mapping import FORMATS, HFMappingError, from_hf_state_dict

if TYPE_CHECKING:  # transformers is an optional extra, imported when a model is built
    from transformers import PreTrainedModel

HF_PREFIX = "hf:"
REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json")
"""The files where transformers looks for ``auto_map`` (custom code it would import from the folder)."""


class HFLoadError(LmforgeError):
    """A Hugging Face checkpoint that cannot be found or loaded; the message names the path."""


@dataclass
class HFState:
    """Incremental state of a wrapped HF model."""

    cache: Any
    """The HF ``Cache`` (``DynamicCache``): keys/values of every consumed slot, padding included."""
    mask: torch.Tensor
    """(B, S) long: 1 for real tokens, 0 for left padding (HF's ``attention_mask`` over the cached slots)."""
    pos: torch.Tensor
    """(B,) long: valid tokens seen per row, i.e. the position id of the row's next token."""
    length: int
    """Slots used (padding included)."""


class RemoteCodeError(HFLoadError):
    """A model folder that asks transformers to run its own code (``auto_map``); lmforge never runs it."""


def _auto_map_modules(auto_map: object) -> list[str]:
    """The ``*.py`` files an ``auto_map`` names: ``{"AutoModel": "modeling_x.Cls"}`` -> ``["modeling_x.py"]``
    (a tokenizer's value may be a ``[slow, fast]`` list; ``repo--module.Cls`` names another repository)."""
    refs: list[str] = []
    values = auto_map.values() if isinstance(auto_map, dict) else [auto_map]
    for value in values:
        refs.extend(v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str))
    return sorted({ref.rsplit(".", 1)[0].split("--")[-1] + ".py" for ref in refs if "." in ref})


def refuse_remote_code(path: str | Path) -> None:
    """Raise :class:`RemoteCodeError` (one line naming the file and the modules) when the local model folder
    ``path`` would make transformers import code from it: ``auto_map`` in ``config.json`` or
    ``tokenizer_config.json``. Call it before transformers sees the folder (loading, fine-tuning, export);
    unreadable JSON is an :class:`HFLoadError` naming the file."""
    folder = Path(path).expanduser()
    for name in REMOTE_CODE_FILES:
        file = folder / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise HFLoadError(f"{file}: not readable JSON ({err})") from None
        if isinstance(data, dict) and "auto_map" in data:
            modules = _auto_map_modules(data["auto_map"])
            named = f" (modules {', '.join(modules)})" if modules else ""
            raise RemoteCodeError(
                f"{file}: 'auto_map' asks to run custom code from the model folder{named}; lmforge never runs "
                "code from a model folder (trust_remote_code=False): remove 'auto_map' and use a built-in "
                "transformers architecture"
            )


def hf_source(path: str | Path) -> str:
    """What ``from_pretrained`` gets: ``hf:NAME`` -> ``NAME``; a local path must be a directory with
    ``config.json`` (raises :class:`HFLoadError` naming it otherwise)."""
    text = str(path)
    if text.startswith(HF_PREFIX):
        name = text[len(HF_PREFIX) :]
        if not name:
            raise HFLoadError(f"model.path {text!r}: expected hf:NAME (a Hugging Face Hub model id)")
        return name
    p = Path(text).expanduser()
    if not p.is_dir():
        raise HFLoadError(f"model.path {text!r}: no such directory (use hf:NAME for a Hugging Face Hub model)")
    if not (p / "config.json").is_file():
        raise HFLoadError(f"model.path {text!r}: {p / 'config.json'} is missing (not a Hugging Face checkpoint)")
    refuse_remote_code(p)
    return str(p)


def load_hf_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` with errors turned into one-line :class:`HFLoadError`; a local
    folder with custom code is refused first (:func:`refuse_remote_code`), and transformers never trusts it."""
    source = hf_source(path)
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as err:
        raise HFLoadError(f"model.family 'hf' needs transformers (pip install 'lmforge[hf]'): {err}") from None
    try:
        if torch.get_default_device().type == "meta":
            # sizing builds models on the meta device to count them: the architecture without the weights
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(source, trust_remote_code=False)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=False)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HFLoadError(f"cannot load a Hugging Face causal LM from {str(path)!r}: {first}") from None
    return model


def _input_embeddings(hf: PreTrainedModel) -> nn.Embedding:
    """The token table of ``hf`` (transformers types the accessor as a plain Module)."""
    return cast(nn.Embedding, hf.get_input_embeddings())


def _positions(hf_config: Any) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"):
        value = getattr(hf_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class HFCausalLM(LanguageModel):
    """A Hugging Face ``*ForCausalLM`` (attribute ``hf``) implementing :class:`LanguageModel`."""

    config: HFModelConfig

    def __init__(self, cfg: HFModelConfig, hf_model: PreTrainedModel | None = None):
        super().__init__()
        hf = load_hf_causal_lm(cfg.path) if hf_model is None else hf_model
        head = hf.get_output_embeddings()
        hf_vocab = int(head.weight.size(0)) if head is not None else int(hf.config.vocab_size)
        if cfg.vocab_size is not None and cfg.vocab_size > hf_vocab:
            raise ConfigError(
                f"model.vocab_size = {cfg.vocab_size} (the tokenizer's) is larger than the vocabulary of the "
                f"Hugging Face model at {cfg.path!r} ({hf_vocab})"
            )
        positions = _positions(hf.config)
        if cfg.max_seq_len is not None and positions is not None and cfg.max_seq_len > positions:
            raise ConfigError(
                f"model.max_seq_len / data.block_size ({cfg.max_seq_len}) exceeds the {positions} positions of the "
                f"Hugging Face model at {cfg.path!r}"
            )
        self.hf = hf
        # the checkpoint's own position limit, not data.block_size: a model trained on short blocks still
        # generates over its full context
        self.max_seq_len = positions or cfg.max_seq_len
        self.config = cfg.model_copy(update={"vocab_size": hf_vocab})
        params = inspect.signature(hf.forward).parameters
        # transformers >= 5 calls the cache argument ``cache``; earlier versions ``past_key_values``
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    # ------------------------------------------------------------------------------------- training
    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T = idx.size()
        if self.max_seq_len is not None and T > self.max_seq_len:
            raise ContextLengthError(f"sequence of {T} tokens is longer than model.max_seq_len ({self.max_seq_len})")
        logits = self.hf(input_ids=idx, use_cache=False).logits  # (B, T, V)
        loss = lm_loss(logits, targets) if targets is not None else None
        return logits, loss

    # ------------------------------------------------------------------------------ incremental state
    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> HFState:
        from transformers import DynamicCache

        device = _input_embeddings(self.hf).weight.device if device is None else torch.device(device)
        return HFState(
            cache=DynamicCache(config=self.hf.config),
            mask=torch.zeros(batch_size, 0, dtype=torch.long, device=device),
            pos=torch.zeros(batch_size, dtype=torch.long, device=device),
            length=0,
        )

    def step(
        self, idx: torch.Tensor, state: HFState, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, HFState]:
        B, T = idx.size()
        end = state.length + T
        if self.max_seq_len is not None and end > self.max_seq_len:
            raise ContextLengthError(
                f"cache is full: {state.length} cached + {T} new tokens exceed model.max_seq_len ({self.max_seq_len})"
            )
        valid = torch.ones_like(idx, dtype=torch.bool) if valid is None else valid.to(torch.bool)
        # position ids count only valid tokens; left padding gets position 0 and is masked out of attention
        pos = (state.pos[:, None] + valid.long().cumsum(1) - 1).clamp_(min=0)  # (B, T)
        mask = torch.cat([state.mask, valid.long()], dim=1)  # (B, S + T)
        out = self.hf(
            input_ids=idx, attention_mask=mask, position_ids=pos, use_cache=True, **{self._cache_arg: state.cache}
        )
        cache = getattr(out, "cache", None)
        cache = out.past_key_values if cache is None else cache
        return out.logits, HFState(cache=cache, mask=mask, pos=state.pos + valid.sum(1), length=end)

    def reorder_state(self, state: HFState, index: torch.Tensor) -> HFState:
        # HF reorders in place; copy the containers so the caller's state stays valid
        cache = copy.copy(state.cache)
        cache.layers = [copy.copy(layer) for layer in state.cache.layers]
        cache.reorder_cache(index)
        return HFState(
            cache=cache,
            mask=state.mask.index_select(0, index),
            pos=state.pos.index_select(0, index),
            length=state.length,
        )

    def state_length(self, state: HFState) -> int:
        return state.length

    # ------------------------------------------------------------------------------------- accounting
    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (tied weights once). ``exclude_embeddings`` leaves out lookup tables: position
        embeddings, and the token embedding unless it is tied to the output projection (then it does a matmul)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            wte = _input_embeddings(self.hf)
            out = self.hf.get_output_embeddings()
            tied = out is not None and out.weight is wte.weight
            for module in self.hf.modules():
                if isinstance(module, nn.Embedding) and (module is not wte or not tied):
                    n -= module.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        c = self.hf.config
        T = seq_len or self.max_seq_len or 0
        n_layer = getattr(c, "num_hidden_layers", 0) or 0
        d_model = getattr(c, "hidden_size", 0) or 0
        return 6.0 * self.num_params(exclude_embeddings=True) + 12.0 * n_layer * d_model * T


def native_transformer(model: HFCausalLM) -> LanguageModel | None:
    """An lmforge transformer holding ``model``'s weights when it is a GPT-2 or Llama checkpoint that maps
    exactly (:mod:`lmforge.models.hf_mapping`), on the same device and dtype, in eval mode; else None.

    It computes the same logits (within float rounding: the mapping tests hold them to 1e-5) and decodes several
    times faster than the wrapped model (lmforge's decoding path instead of transformers' forward per token).
    Weights are copied, so memory peaks at twice the model while both exist: when the device lacks the room for
    the copy (as far as :func:`lmforge.models.memory.free_memory` can tell), the wrapped model stays, with a warning.
    """
    fmt = getattr(model.hf.config, "model_type", None)
    if fmt not in FORMATS:
        return None
    weight = _input_embeddings(model.hf).weight
    size = sum(p.numel() * p.element_size() for p in model.hf.parameters())
    free = memory.free_memory(weight.device)
    if free is not None and size > 0.8 * free:
        warnings.warn(
            f"lmforge: {size / 2**30:.1f} GiB model with {free / 2**30:.1f} GiB free: no room for a copy, so it runs "
            "through transformers (slower decoding)",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    try:
        native = from_hf_state_dict(fmt, model.hf.config.to_dict(), model.hf.state_dict())
    except HFMappingError:
        return None
    return native.to(device=weight.device, dtype=weight.dtype).eval()


@register_model("hf")
def build_hf_model(cfg: HFModelConfig) -> HFCausalLM:
    return HFCausalLM(cfg)
