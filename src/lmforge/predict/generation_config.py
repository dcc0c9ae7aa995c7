"""A model's own decoding defaults: ``generation_config.json`` (Hugging Face's file and key names).

``lmforge tune --task`` chooses decoding settings on validation records and writes them next to the model
(:func:`save_generation_defaults`); ``generate``, ``eval``, ``serve`` and ``export`` start from them
(:func:`load_generation_defaults`, then :func:`with_defaults`), and a flag or request field still wins.

lmforge's own settings, the copy mechanism's ``copy_bias``, ``source_bias`` and ``source_half_life``
(:class:`~lmforge.predict.processors.CopyBiasProcessor`), are stored as ``lmforge_copy_bias``,
``lmforge_source_bias`` and ``lmforge_source_half_life`` (:data:`FILE_KEYS`): keys Hugging Face does not know and keeps as plain attributes,
so an exported model still loads there (its ``generate`` does not apply them).

Only the keys below are decoding *choices*; the token ids Hugging Face keeps in the same file
(``bos_token_id``, ``eos_token_id``, ``pad_token_id``) are kept when the file is rewritten but never become
defaults here: lmforge takes them from the tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from lmforge.atomic import atomic_write_json, read_json_object
from lmforge.config import LmforgeError
from lmforge.predict.config import GenerationConfig, GenerationError
from lmforge.runs import BEST_DIR

GENERATION_CONFIG_FILE = "generation_config.json"

DEFAULT_KEYS: tuple[str, ...] = (
    "max_new_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "num_beams",
    "length_penalty",
    "early_stopping",
    "copy_bias",
    "source_bias",
    "source_half_life",
)
"""The :class:`GenerationConfig` fields a model's ``generation_config.json`` may set as defaults."""

FILE_KEYS: dict[str, str] = {
    "copy_bias": "lmforge_copy_bias",
    "source_bias": "lmforge_source_bias",
    "source_half_life": "lmforge_source_half_life",
}
"""Fields stored under another key in the file (lmforge's own, prefixed so no Hugging Face key is taken)."""


def file_key(name: str) -> str:
    """The key of :class:`GenerationConfig` field ``name`` in ``generation_config.json``."""
    return FILE_KEYS.get(name, name)


class GenerationDefaultsError(LmforgeError):
    """A ``generation_config.json`` that cannot be read or holds an invalid value (names file and key)."""


def _candidates(path: str | Path) -> list[Path]:
    """Where a model path keeps its file: the path itself, then its ``best/`` checkpoint (a run directory)."""
    p = Path(path).expanduser()
    return [p / GENERATION_CONFIG_FILE, p / BEST_DIR / GENERATION_CONFIG_FILE]


def find_generation_config(path: str | Path) -> Path | None:
    """The ``generation_config.json`` that holds ``path``'s defaults, or None (``hf:NAME`` has none here)."""
    if str(path).startswith("hf:"):
        return None
    for c in _candidates(path):
        if c.is_file():
            return c
    return None


def load_generation_defaults(path: str | Path) -> dict[str, Any]:
    """The decoding defaults stored for the model at ``path`` (a run, checkpoint or Hugging Face directory).

    Returns only :data:`DEFAULT_KEYS` that are present, validated as a :class:`GenerationConfig` would;
    ``{}`` when there is no file. A corrupt file or a bad value raises :class:`GenerationDefaultsError`
    naming the file and key."""
    f = path if Path(path).name == GENERATION_CONFIG_FILE else find_generation_config(path)
    if f is None or not Path(f).is_file():
        return {}
    raw = read_json_object(f, GenerationDefaultsError)
    out = {k: raw[file_key(k)] for k in DEFAULT_KEYS if raw.get(file_key(k)) is not None}
    for k, v in out.items():
        try:
            GenerationConfig(**{k: v})
        except (GenerationError, TypeError) as e:
            raise GenerationDefaultsError(f"{f}: key {file_key(k)!r}: {e}") from None
    try:
        GenerationConfig(**out)
    except GenerationError as e:
        raise GenerationDefaultsError(f"{f}: {e}") from None
    return out


def save_generation_defaults(model_dir: str | Path, settings: dict[str, Any], **extra: Any) -> Path:
    """Write ``settings`` (keys of :data:`DEFAULT_KEYS`) into ``model_dir/generation_config.json``.

    Keys already in the file that are not decoding choices (token ids, ``transformers_version``, ...) are
    kept; ``extra`` keys (e.g. ``lmforge_chosen_by``) are added as they are. Written atomically."""
    unknown = sorted(set(settings) - set(DEFAULT_KEYS))
    if unknown:
        raise GenerationError(f"generation defaults: unknown key(s) {unknown}; allowed: {list(DEFAULT_KEYS)}")
    GenerationConfig(**settings)  # validate before writing
    f = Path(model_dir) / GENERATION_CONFIG_FILE
    data: dict[str, Any] = {}
    if f.is_file():
        try:
            loaded = json.loads(f.read_text(encoding="utf-8"))
            if isinstance(loaded, dict):
                data = {k: v for k, v in loaded.items() if k not in {file_key(d) for d in DEFAULT_KEYS}}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            data = {}
    data.update({file_key(k): v for k, v in settings.items()})
    data.update(extra)
    atomic_write_json(f, data)
    return f


def with_defaults(defaults: dict[str, Any], overrides: dict[str, Any]) -> GenerationConfig:
    """A :class:`GenerationConfig` from the model's ``defaults`` with ``overrides`` (what the user set
    explicitly: flags or request fields, ``None`` meaning "not set") on top."""
    names = {f.name for f in fields(GenerationConfig)}
    merged = {k: v for k, v in defaults.items() if k in names}
    merged.update({k: v for k, v in overrides.items() if v is not None and k in names})
    unknown = sorted(k for k in overrides if k not in names)
    if unknown:
        raise GenerationError(f"unknown generation setting(s) {unknown}")
    return GenerationConfig(**merged)
