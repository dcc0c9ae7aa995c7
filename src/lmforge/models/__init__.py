"""lmforge.models: model families behind one contract (``base.LanguageModel``) and one builder.

``build_model(cfg, vocab_size, max_seq_len)`` looks the family up in an open registry: a module adds a
family with ``@register_model("name")``. Families whose module pulls in heavy dependencies are listed in
``_LAZY_MODULES`` and imported only when such a model is built (``hf`` needs transformers, which this package
never imports at module level).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import TypeAdapter, ValidationError

from lmforge.config import IGNORE_INDEX, ConfigError, ModelConfig
from lmforge.models.base import ContextLengthError, LanguageModel, lm_loss
from lmforge.models.rcnn import RCNNModel
from lmforge.models.recurrent import RecurrentModel
from lmforge.models.transformer import TransformerModel

__all__ = [
    "IGNORE_INDEX",
    "ContextLengthError",
    "LanguageModel",
    "RCNNModel",
    "RecurrentModel",
    "TransformerModel",
    "available_families",
    "build_model",
    "lm_loss",
    "register_model",
]

ModelFactory = Callable[[Any], LanguageModel]
FactoryT = TypeVar("FactoryT", bound=ModelFactory)

_REGISTRY: dict[str, ModelFactory] = {}
_LAZY_MODULES: dict[str, str] = {"hf": "lmforge.models.hf"}
"""family -> module that registers it when imported."""


def register_model(family: str) -> Callable[[FactoryT], FactoryT]:
    """Class decorator: ``@register_model("name")`` makes ``build_model`` build ``cls(resolved_cfg)`` for
    configs with ``family == "name"``. The factory sets ``model.config`` to the config it was given."""

    def deco(factory: FactoryT) -> FactoryT:
        _REGISTRY[family] = factory
        return factory

    return deco


def available_families() -> list[str]:
    return sorted(set(_REGISTRY) | set(_LAZY_MODULES))


def _factory(family: str) -> ModelFactory:
    if family not in _REGISTRY and family in _LAZY_MODULES:
        try:
            importlib.import_module(_LAZY_MODULES[family])
        except ImportError as err:
            raise ConfigError(f"model.family = {family!r} needs an optional dependency: {err}") from None
    if family not in _REGISTRY:
        raise ConfigError(f"model.family = {family!r}: unknown; known: {available_families()}")
    return _REGISTRY[family]


def build_model(cfg: Any, vocab_size: int | None = None, max_seq_len: int | None = None) -> LanguageModel:
    """Build a model from its config (a family config object or a dict with ``family``).

    ``vocab_size`` (from the tokenizer) and ``max_seq_len`` (``data.block_size``) fill the fields the config
    leaves empty; the built model's ``.config`` is that resolved config, so ``build_model(model.config)``
    rebuilds the same architecture. A config ``vocab_size`` smaller than the tokenizer's is an error.
    """
    if isinstance(cfg, dict):
        try:
            cfg = TypeAdapter(ModelConfig).validate_python({"family": "transformer", **cfg})
        except ValidationError as err:
            e = err.errors()[0]
            field = ".".join(["model", *(str(p) for p in e["loc"][1:])])  # loc[0] is the family tag
            raise ConfigError(f"invalid model config: {field}: {e['msg'].removeprefix('Value error, ')}") from None
    fields = type(cfg).model_fields
    update: dict[str, Any] = {}
    if vocab_size is not None and "vocab_size" in fields:
        if cfg.vocab_size is None:
            update["vocab_size"] = vocab_size
        elif cfg.vocab_size < vocab_size:
            raise ConfigError(
                f"model.vocab_size = {cfg.vocab_size} is smaller than the tokenizer's vocabulary ({vocab_size})"
            )
    if max_seq_len is not None and "max_seq_len" in fields and cfg.max_seq_len is None:
        update["max_seq_len"] = max_seq_len
    if update:
        cfg = cfg.model_copy(update=update)
    return _factory(cfg.family)(cfg)


register_model("transformer")(TransformerModel)
register_model("lstm")(RecurrentModel)
register_model("gru")(RecurrentModel)
register_model("rcnn")(RCNNModel)
