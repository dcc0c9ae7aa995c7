"""Export a trained model for use outside lmforge (layer 6, next to the CLI: it loads through ``predict``).

``export_model(MODEL_DIR, OUT)`` writes, by model family:

- ``transformer`` whose options map exactly onto Hugging Face GPT-2 or Llama (see ``models.hf_mapping``): a
  Hugging Face directory: ``config.json``, ``model.safetensors``, ``generation_config.json``, ``tokenizer.json``
  and ``tokenizer_config.json`` (a ``PreTrainedTokenizerFast`` whose bos/eos/pad tokens are lmforge's end of
  text), loadable with ``AutoModelForCausalLM`` / ``AutoTokenizer``;
- ``hf`` (a fine-tuned Hugging Face model): the same kind of directory, via the model's own ``save_pretrained``;
- ``lstm``, ``gru``, ``rcnn`` and transformers without an exact HF counterpart: an lmforge checkpoint
  (``model.safetensors``, ``config.yaml``, tokenizer files) that lmforge loads back, plus a ``README.md``
  saying that transformers has no class for the model.

The directory is assembled in a hidden sibling and renamed into place, so ``OUT`` is never half-written.
The HF files are written as plain JSON/safetensors: exporting needs no transformers install.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import save_file

from lmforge.config import HFModelConfig, LmforgeError, RunConfig
from lmforge.data.chat_template import write_chat_template
from lmforge.data.tokenizer import Tokenizer
from lmforge.models.base import LanguageModel
from lmforge.models.hf import HFCausalLM
from lmforge.models.hf_mapping import HFMappingError, to_hf_state_dict
from lmforge.models.transformer import TransformerModel
from lmforge.predict.generation_config import load_generation_defaults, save_generation_defaults
from lmforge.predict.loading import load_pretrained
from lmforge.runs import RETRIEVAL_FILE, find_retrieval_file, read_task_file, save_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TOKENIZER_SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


class ExportError(LmforgeError):
    """The export cannot be written (existing output, unknown dtype, ...); the message names the path/value."""


@dataclass
class ExportResult:
    path: Path
    format: str
    """``gpt2`` / ``llama`` (written from an lmforge transformer), ``hf`` (a wrapped HF model's own class)
    or ``lmforge`` (no transformers class; an lmforge checkpoint)."""
    transformers_loadable: bool
    message: str
    """One line for the user: what was written and how to load it."""


def export_model(
    model_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False, dtype: str | None = None
) -> ExportResult:
    """Export the model at ``model_dir`` (anything :func:`lmforge.predict.loading.load_pretrained` takes)
    to ``out_dir``. ``dtype`` (``float32``/``bfloat16``/``float16``) casts floating weights; default: as trained.
    ``overwrite`` replaces an existing ``out_dir``; otherwise a non-empty one is an :class:`ExportError`."""
    out = Path(out_dir).expanduser()
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: unknown; known: {list(DTYPES)}")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {str(out)!r} is a file")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out {str(out)!r} already exists and is not empty (pass --force to replace it)")
    model, tokenizer, cfg = load_pretrained(model_dir)
    model = model.cpu()
    if dtype is not None:
        model = model.to(DTYPES[dtype])
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".tmp-export-{out.name}-{uuid.uuid4().hex[:8]}")
    try:
        result = _write(model, tokenizer, cfg, staging, out, str(model_dir))
        defaults = load_generation_defaults(model_dir)
        if defaults:  # the model's decoding defaults (lmforge tune --task's decode step) travel with it
            save_generation_defaults(staging, defaults)
        retrieval = find_retrieval_file(model_dir)
        if retrieval is not None:  # the retrieval index its task prompts are built with (lmforge eval reads it)
            shutil.copy2(retrieval, staging / RETRIEVAL_FILE)
        if read_task_file(model_dir).get("task") == "chat" and (staging / "tokenizer_config.json").is_file():
            write_chat_template(staging)  # the trained chat format, for apply_chat_template and servers
        if out.exists():
            shutil.rmtree(out)
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result


def _write(
    model: LanguageModel, tokenizer: Tokenizer, cfg: RunConfig, staging: Path, out: Path, source: str
) -> ExportResult:
    family = cfg.model.family
    if family == "hf":
        hf_model, hf_cfg = cast(HFCausalLM, model), cast(HFModelConfig, cfg.model)  # the hf family's classes
        staging.mkdir()
        hf_model.hf.save_pretrained(staging)
        _copy_or_write_tokenizer(tokenizer, Path(hf_cfg.path), staging, model.max_seq_len)
        return ExportResult(out, "hf", True, f"wrote a Hugging Face {type(hf_model.hf).__name__} directory to {out}")
    reason = f"model family {family!r} has no Hugging Face transformers class"
    if family == "transformer":
        try:
            fmt, hf_config, state = to_hf_state_dict(cast(TransformerModel, model))
        except HFMappingError as err:
            reason = f"this transformer has no exact Hugging Face counterpart: {err}"
        else:
            staging.mkdir()
            write_hf_transformer(staging, hf_config, state, tokenizer)
            arch = hf_config["architectures"][0]
            return ExportResult(out, fmt, True, f"wrote a Hugging Face {arch} ({fmt}) directory to {out}")
    _write_lmforge(model, tokenizer, cfg, staging, out, source, reason)
    return ExportResult(
        out,
        "lmforge",
        False,
        f"{reason}: wrote model.safetensors and lmforge config files to {out} (load them with lmforge, "
        "e.g. `lmforge generate OUT`; transformers cannot load this directory)",
    )


# ----------------------------------------------------------------------------------- HF directory
def write_hf_transformer(
    out: Path, hf_config: dict[str, Any], state: dict[str, torch.Tensor], tokenizer: Tokenizer
) -> None:
    """``config.json`` + ``model.safetensors`` + ``generation_config.json`` + tokenizer files."""
    eot = tokenizer.eot_id
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    dtype = str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else "float32"
    config = {
        **hf_config,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": tokenizer.pad_id,
        "dtype": dtype,
        "use_cache": True,
    }
    _write_json(out / "config.json", config)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_json(
        out / "generation_config.json", {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": tokenizer.pad_id}
    )
    max_len = hf_config.get("n_positions") or hf_config.get("max_position_embeddings")
    write_hf_tokenizer(tokenizer, out, max_len)


def write_hf_tokenizer(tokenizer: Tokenizer, out: Path, model_max_length: int | None = None) -> None:
    """``tokenizer.json`` (the lmforge tokenizer's own backend) + ``tokenizer_config.json`` for
    ``AutoTokenizer``: a ``PreTrainedTokenizerFast`` with bos/eos = end of text and lmforge's pad token;
    no tokens added on encode, none skipped and no spaces cleaned up on decode, as lmforge."""
    tokenizer.backend.save(str(out / "tokenizer.json"))
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokenizer.eot_token,
        "eos_token": tokenizer.eot_token,
        "pad_token": tokenizer.pad_token,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
    }
    unk = getattr(tokenizer.backend.model, "unk_token", None)
    if isinstance(unk, str) and tokenizer.backend.token_to_id(unk) is not None:
        config["unk_token"] = unk
    if model_max_length:
        config["model_max_length"] = int(model_max_length)
    _write_json(out / "tokenizer_config.json", config)


def _copy_or_write_tokenizer(tokenizer: Tokenizer, source: Path, out: Path, max_len: int | None) -> None:
    """A wrapped HF model keeps its original tokenizer files (chat template, bos settings) when they exist."""
    found = [source / name for name in _TOKENIZER_SIDE_FILES if (source / name).is_file()]
    if any(f.name == "tokenizer.json" for f in found):
        for f in found:
            shutil.copy2(f, out / f.name)
    else:
        write_hf_tokenizer(tokenizer, out, max_len)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------- lmforge directory
_README = """# lmforge export: {family}

{reason}.

This directory is an lmforge checkpoint: `model.safetensors` (the weights), `config.yaml` (the run
configuration that rebuilds the model), `tokenizer.json` + `lmforge_tokenizer.json` (the tokenizer).
Hugging Face transformers has no model class for it, so `AutoModelForCausalLM` cannot load it; load it
with lmforge instead:

```
lmforge generate {name} "your prompt"
```

```python
from lmforge.runs import load_model
model, tokenizer, config = load_model("{name}")
```

Exported from `{source}`.
"""


def _write_lmforge(
    model: LanguageModel, tokenizer: Tokenizer, cfg: RunConfig, staging: Path, out: Path, source: str, reason: str
) -> None:
    save_checkpoint(
        staging, model=model, config_yaml=cfg.to_yaml(), tokenizer=tokenizer, meta={"exported_from": source}
    )
    # README.md is not listed in COMPLETE: the checkpoint verifies without it
    text = _README.format(family=cfg.model.family, reason=reason, name=out, source=source)
    (staging / "README.md").write_text(text, encoding="utf-8")
