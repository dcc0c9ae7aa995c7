"""Load any model lmforge can generate with: ``load_pretrained(path) -> (model, tokenizer, RunConfig)``.

``path`` may be
- an lmforge run directory (``OUT/``): its ``best/`` checkpoint, else its newest complete step checkpoint;
- an lmforge checkpoint directory (has ``COMPLETE`` and ``config.yaml``), e.g. ``OUT/best`` or a recurrent export;
- a Hugging Face causal-LM directory (has ``config.json``), e.g. an ``lmforge export`` of a transformer: wrapped
  as model family ``hf`` with the directory's own ``tokenizer.json`` (tokenizer kind ``hf``);
- ``hf:NAME``: a Hugging Face Hub model, downloaded (needs a network) and then loaded as a local directory.

A Hugging Face folder whose config asks to run its own code (``auto_map``) is refused with one line
(:func:`lmforge.models.hf.refuse_remote_code`); lmforge never runs code from a model folder.

With ``native=True`` (what ``generate``, ``eval`` and ``serve`` ask for) a Hugging Face GPT-2 or Llama model
(a directory, or an ``hf``-family checkpoint fine-tuned from one) that maps exactly onto lmforge's transformer
is returned as that transformer: the same logits, lmforge's faster decoding. Fine-tuning and export keep the
wrapped model, so the checkpoint's own Hugging Face config travels on.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import torch

from lmforge.config import HFModelConfig, LmforgeError, RunConfig, build_config
from lmforge.data.tokenizer import Tokenizer

# hf as a module: native_transformer is looked up when called (tests watch it there)
from lmforge.models import build_model, hf
from lmforge.models.base import LanguageModel
from lmforge.runs import BEST_DIR, is_complete, list_checkpoints, load_model

HF_PREFIX = "hf:"
DEFAULT_BLOCK_SIZE = 128


class ModelLoadError(LmforgeError):
    """A path that holds no loadable model; the message names the path and what was expected."""


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory -> its ``best/`` (else its newest complete checkpoint); any other path unchanged."""
    p = Path(path).expanduser()
    if is_complete(p):
        return p
    if is_complete(p / BEST_DIR):
        return p / BEST_DIR
    steps = list_checkpoints(p)
    return steps[-1] if steps else p


def is_hf_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and not (p / "COMPLETE").is_file()


def load_pretrained(
    path: str | Path, *, map_location: str | torch.device = "cpu", native: bool = False
) -> tuple[LanguageModel, Tokenizer, RunConfig]:
    """``(model, tokenizer, RunConfig)`` from an lmforge run/checkpoint directory, a Hugging Face directory or
    ``hf:NAME``; the model is on ``map_location`` in eval mode. ``native``: a Hugging Face GPT-2 / Llama comes
    back as lmforge's transformer (see the module docstring). Raises :class:`ModelLoadError` (or the
    checkpoint/config error of the layer below) with a one-line message naming the path."""
    model, tokenizer, cfg = _load(path, map_location)
    if native and getattr(cfg.model, "family", None) == "hf":
        converted = hf.native_transformer(cast(hf.HFCausalLM, model))  # the hf family's one class
        if converted is not None:
            cfg = cfg.model_copy(update={"model": converted.config})
            model = converted
    return model, tokenizer, cfg


def _load(path: str | Path, map_location: str | torch.device) -> tuple[LanguageModel, Tokenizer, RunConfig]:
    text = str(path)
    if text.startswith(HF_PREFIX):
        return load_hf_dir(_download(text[len(HF_PREFIX) :]), map_location=map_location)
    p = Path(text).expanduser()
    if not p.exists():
        raise ModelLoadError(f"model path {text!r}: no such file or directory")
    if not p.is_dir():
        raise ModelLoadError(f"model path {text!r} is a file; give an lmforge run/checkpoint or Hugging Face directory")
    ckpt = resolve_checkpoint(p)
    if (ckpt / "COMPLETE").is_file():
        model, tokenizer, cfg = load_model(ckpt, map_location=map_location)
        model.eval()
        return model, tokenizer, cfg
    if is_hf_dir(p):
        return load_hf_dir(p, map_location=map_location)
    if (p / "config.yaml").is_file() or (p / "checkpoints").is_dir():
        raise ModelLoadError(f"model path {text!r}: an lmforge run directory without a complete checkpoint")
    raise ModelLoadError(
        f"model path {text!r}: neither an lmforge run/checkpoint directory (config.yaml + COMPLETE) nor a "
        "Hugging Face model directory (config.json)"
    )


def load_hf_dir(
    path: str | Path, *, map_location: str | torch.device = "cpu"
) -> tuple[LanguageModel, Tokenizer, RunConfig]:
    """A local Hugging Face causal-LM directory -> (family ``hf`` model, its tokenizer, a RunConfig saying so).
    A folder with custom code (``auto_map``) is refused before anything in it is read by transformers."""
    p = Path(path).expanduser().resolve()  # recorded in the config: later checkpoints load from anywhere
    hf.refuse_remote_code(p)
    if not (p / "tokenizer.json").is_file():
        raise ModelLoadError(
            f"{p} has no tokenizer.json (a fast tokenizer file); create one with "
            "AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)"
        )
    tokenizer = Tokenizer.load(p)
    model = build_model(HFModelConfig(path=str(p)), vocab_size=tokenizer.vocab_size)
    positions = model.max_seq_len or DEFAULT_BLOCK_SIZE
    cfg = build_config(
        {
            "tokenizer": {"kind": "hf", "path": str(p)},
            "model": {**model.config.model_dump(mode="json"), "max_seq_len": model.max_seq_len},
            "data": {"block_size": min(DEFAULT_BLOCK_SIZE, positions)},
        }
    )
    return model.to(map_location).eval(), tokenizer, cfg


def _download(name: str) -> Path:
    """Snapshot of a Hub model's config, weights and tokenizer files (needs a network)."""
    if not name:
        raise ModelLoadError("model path 'hf:': expected hf:NAME (a Hugging Face Hub model id)")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except ImportError as err:
        raise ModelLoadError(f"hf:{name} needs huggingface_hub (pip install 'lmforge[hf]'): {err}") from None
    except Exception as err:  # network, authentication or unknown-repository errors of huggingface_hub
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"cannot download hf:{name}: {first}") from None
    return Path(folder)
