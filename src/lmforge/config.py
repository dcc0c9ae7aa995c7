"""Typed, validated run configuration (layer 1: imports nothing of lmforge, no torch).

A run is described by six sections: ``data``, ``tokenizer``, ``model``, ``optim``, ``schedule`` and
``train``. Each is a small pydantic model that rejects unknown keys; :class:`RunConfig` checks the
rules that span sections. Configs come from YAML (:func:`load_config`) and command-line overrides of
the form ``--section.field value`` (:func:`apply_overrides`). Every problem is reported as a
:class:`ConfigError` naming the field and the value, before any data is read or memory allocated.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class LmforgeError(Exception):
    """Base of every error a user can cause and fix (bad config, data, checkpoint, request).

    The command line prints these as one line (exit status 2) instead of a traceback."""


class ConfigError(LmforgeError, ValueError):
    """A user-facing configuration problem; the message names the field and the value."""


IGNORE_INDEX = -100
"""Target id that the loss skips (prompt tokens, padding): PyTorch's and Hugging Face's convention."""

TASK_NAMES = ("lm", "summarization", "translation", "classification", "semantic-parsing", "generation", "chat")
"""Every task ``finetune``/``eval`` know; ``lm`` is plain language modelling (``lmforge.data.tasks`` defines the
others and checks it matches this list)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------------------- data
class DataConfig(_Section):
    path: str | None = None
    """Text file, folder, glob, ``*.jsonl``, ``hf:NAME[:CONFIG]`` or ``demo``."""
    text_field: str = "text"
    """Field holding the text in JSONL files and Hugging Face datasets."""
    hf_split: str = "train"
    val_path: str | None = None
    """A separate validation source; when unset, ``val_fraction`` of the documents are held out."""
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    block_size: int = Field(128, ge=1)
    encoding_errors: Literal["strict", "replace"] = "strict"
    """``strict``: invalid UTF-8 stops with file and byte offset; ``replace``: replaced and counted."""
    cache_dir: str | None = None
    """Token-array cache (default: ``$LMFORGE_CACHE`` or ``~/.cache/lmforge``)."""
    seed: int = 0
    """Seed of the document split (the sampler uses ``train.seed``)."""
    max_documents: int | None = Field(None, ge=1)


# ------------------------------------------------------------------------------------ tokenizer
class TokenizerConfig(_Section):
    kind: Literal["char", "byte", "bpe", "hf"] = "char"
    vocab_size: int = Field(1024, ge=32)
    """Target vocabulary of a trained ``bpe`` tokenizer."""
    path: str | None = None
    """For ``hf``: a ``tokenizer.json`` file or a local Hugging Face checkpoint directory."""

    @model_validator(mode="after")
    def _hf_needs_path(self) -> TokenizerConfig:
        if self.kind == "hf" and not self.path:
            raise ValueError("tokenizer.path is required when tokenizer.kind is 'hf'")
        return self


# ---------------------------------------------------------------------------------------- model
class _ModelBase(_Section):
    vocab_size: int | None = Field(None, ge=2)
    """Set from the tokenizer when left empty."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    tie_embeddings: bool = True
    init_std: float = Field(0.02, gt=0.0)


class TransformerConfig(_ModelBase):
    family: Literal["transformer"] = "transformer"
    n_layer: int = Field(4, ge=1)
    d_model: int = Field(128, ge=1)
    n_head: int = Field(4, ge=1)
    n_kv_head: int | None = Field(None, ge=1)
    """Grouped-query attention: key/value heads (default ``n_head``)."""
    mlp_ratio: float = Field(4.0, gt=0.0)
    mlp: Literal["gelu", "gelu_tanh", "swiglu"] = "gelu"
    """``gelu``: exact (erf) GELU, as nanoGPT; ``gelu_tanh``: the tanh approximation of GPT-2's ``gelu_new``
    (imported GPT-2 checkpoints use it; on CPU it is several times slower); ``swiglu``: Llama's gated MLP."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = Field(1e-5, gt=0.0)
    position: Literal["learned", "rope"] = "learned"
    rope_theta: float = Field(10000.0, gt=0.0)
    layout: Literal["sequential", "parallel"] = "sequential"
    bias: bool = True
    max_seq_len: int | None = Field(None, ge=1)
    """Positions the model supports (default ``data.block_size``)."""

    @model_validator(mode="after")
    def _heads(self) -> TransformerConfig:
        if self.d_model % self.n_head:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})")
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise ValueError(f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({self.n_kv_head})")
        if self.position == "rope" and (self.d_model // self.n_head) % 2:
            raise ValueError(f"model.position 'rope' needs an even head size, got d_model/n_head = {self.d_model // self.n_head}")
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head


class RecurrentConfig(_ModelBase):
    family: Literal["lstm", "gru"] = "lstm"
    n_layer: int = Field(2, ge=1)
    d_model: int = Field(256, ge=1)
    """Hidden size of every recurrent layer (and the embedding width)."""
    residual: bool = False
    """Add each layer's input to its output (from the second layer on)."""


class RCNNConfig(_ModelBase):
    family: Literal["rcnn"] = "rcnn"
    n_layer: int = Field(2, ge=1)
    """Number of (causal convolution block, recurrent layer) pairs."""
    d_model: int = Field(256, ge=1)
    kernel_size: int = Field(3, ge=1)
    rnn: Literal["gru", "lstm"] = "gru"
    residual: bool = True


class HFModelConfig(_ModelBase):
    """A Hugging Face causal LM loaded from a local directory (or ``hf:NAME`` with a network)."""

    family: Literal["hf"] = "hf"
    path: str
    max_seq_len: int | None = Field(None, ge=1)


ModelConfig = Annotated[
    Union[TransformerConfig, RecurrentConfig, RCNNConfig, HFModelConfig], Field(discriminator="family")
]
FAMILIES = ("transformer", "lstm", "gru", "rcnn", "hf")


# ---------------------------------------------------------------------------------------- optim
class OptimConfig(_Section):
    name: Literal["gd", "sgd", "momentum", "adam", "adamw", "muon"] = "adamw"
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.1, ge=0.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.99, ge=0.0, lt=1.0)
    eps: float = Field(1e-8, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    """For ``momentum`` and ``muon``."""
    nesterov: bool = False
    muon_lr: float = Field(0.02, gt=0.0)
    """Learning rate of the Muon part (2-D hidden weights); AdamW with ``lr`` takes the rest."""
    grad_clip: float = Field(1.0, ge=0.0)
    """Clip the global gradient norm to this value; 0 turns clipping off."""

    @field_validator("lr", "muon_lr", "eps")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"must be finite, got {v}")
        return v


# ------------------------------------------------------------------------------------- schedule
DECAYING_SCHEDULES = ("linear", "cosine", "wsd")
"""The schedules with a length (``total_steps``, or ``train.max_time`` with ``horizon: time``)."""


class ScheduleConfig(_Section):
    name: Literal["constant", "linear", "cosine", "wsd", "plateau"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr: float = Field(0.0, ge=0.0)
    """Final learning rate of ``linear``, ``cosine`` and ``wsd``; floor of ``plateau``."""
    decay_fraction: float = Field(0.2, gt=0.0, le=1.0)
    """``wsd``: fraction of the steps spent in the final decay."""
    plateau_factor: float = Field(0.5, gt=0.0, lt=1.0)
    plateau_patience: int = Field(2, ge=0)
    """``plateau``: evaluations without improvement before the learning rate is multiplied by the factor."""
    total_steps: int | None = Field(None, ge=1)
    """Length of the decay (default ``train.max_steps``)."""
    horizon: Literal["steps", "time"] = "steps"
    """``time``: ``linear``, ``cosine`` and ``wsd`` decay over ``train.max_time`` (progress = training seconds /
    max_time) instead of over steps, so a run stopped by the clock ends its decay when it stops. Warmup
    still counts steps. A resumed run then follows the clock, so it is not bitwise equal to an uninterrupted
    one."""


# ---------------------------------------------------------------------------------------- train
_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(s|sec|m|min|h|hr|d)?\s*$")


def parse_duration(value: str | float | int | None) -> float | None:
    """``"90"``, ``"90s"``, ``"10m"``, ``"2h"`` -> seconds."""
    if value is None or isinstance(value, (int, float)):
        return None if value is None else float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError(f"not a duration: {value!r} (use e.g. 90s, 10m, 2h)")
    scale = {None: 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "d": 86400}[m.group(2)]
    return float(m.group(1)) * scale


class TrainConfig(_Section):
    batch_size: int = Field(12, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_steps: int | None = Field(1000, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    max_epochs: float | None = Field(None, gt=0)
    max_time: float | None = Field(None, gt=0)
    """Wall-clock limit in seconds (YAML/CLI also accept ``10m``, ``2h``)."""
    eval_interval: int = Field(100, ge=1)
    eval_batches: int = Field(20, ge=1)
    """Batches per evaluation; 0 is not allowed. The whole validation set is used when it is smaller."""
    log_interval: int = Field(10, ge=1)
    patience: int | None = Field(None, ge=1)
    """Early stopping: evaluations without an improvement of at least ``min_delta`` before stopping."""
    min_delta: float = Field(0.0, ge=0.0)
    checkpoint_interval: int | None = Field(None, ge=1)
    """Save a checkpoint every N steps (default: at every evaluation)."""
    keep_last: int = Field(2, ge=1)
    resume: str = "never"
    """``never`` (refuse a run directory that has checkpoints), ``auto`` (latest complete checkpoint),
    or the path of a checkpoint directory."""
    seed: int = 1337
    deterministic: bool = False
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """``auto``: bf16 autocast on CUDA, fp32 on CPU."""
    compile: bool | Literal["auto"] = "auto"
    """``torch.compile`` the model: ``true``, ``false``, or ``auto`` (the default): eager, switching to compiled
    after a few measured steps only when recorded measurements on this machine say the remaining planned steps
    repay the compile time (see :mod:`lmforge.train.compile`); never slower than eager by that estimate."""
    max_bad_steps: int = Field(3, ge=1)
    """Consecutive NaN/inf losses tolerated (each skipped) before ``on_bad_steps`` acts."""
    on_bad_steps: Literal["rollback", "stop"] = "rollback"
    max_rollbacks: int = Field(2, ge=0)
    progress: bool = True

    @field_validator("max_time", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> Any:
        return parse_duration(v)

    @field_validator("resume")
    @classmethod
    def _resume(cls, v: str) -> str:
        if not v:
            raise ValueError("must be 'never', 'auto' or a checkpoint path")
        return v


# ------------------------------------------------------------------------------------------ run
class RunConfig(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelConfig = Field(default_factory=TransformerConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _cross(self) -> RunConfig:
        t, s, o, m = self.train, self.schedule, self.optim, self.model
        if not any([t.max_steps, t.max_tokens, t.max_epochs, t.max_time, t.patience]):
            raise ValueError(
                "train: no stopping rule; set one of train.max_steps, train.max_tokens, train.max_epochs, "
                "train.max_time or train.patience"
            )
        max_pos = getattr(m, "max_seq_len", None)
        if max_pos is not None and self.data.block_size > max_pos:
            raise ValueError(
                f"data.block_size ({self.data.block_size}) exceeds model.max_seq_len ({max_pos})"
            )
        if s.min_lr > o.lr:
            raise ValueError(f"schedule.min_lr ({s.min_lr}) is larger than optim.lr ({o.lr})")
        if s.horizon == "time" and (t.max_time is None or s.name not in DECAYING_SCHEDULES):
            raise ValueError(
                f"schedule.horizon 'time' needs train.max_time (got {t.max_time}) and a decaying schedule.name "
                f"(linear, cosine or wsd; got {s.name!r})"
            )
        if s.name in DECAYING_SCHEDULES and self.total_steps is None and s.horizon == "steps":
            raise ValueError(
                f"schedule.name '{s.name}' needs a length: set train.max_steps or schedule.total_steps"
            )
        if self.total_steps is not None and s.warmup_steps >= self.total_steps and s.name != "constant":
            raise ValueError(
                f"schedule.warmup_steps ({s.warmup_steps}) must be below the schedule length ({self.total_steps})"
            )
        if m.family == "hf" and self.tokenizer.kind != "hf":
            raise ValueError("model.family 'hf' needs tokenizer.kind 'hf' (the checkpoint's own tokenizer)")
        return self

    @property
    def total_steps(self) -> int | None:
        return self.schedule.total_steps or self.train.max_steps

    @property
    def max_seq_len(self) -> int:
        """Positions of the model: ``model.max_seq_len`` or ``data.block_size``."""
        return getattr(self.model, "max_seq_len", None) or self.data.block_size

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS = ("data", "tokenizer", "model", "optim", "schedule", "train")


# ------------------------------------------------------------------------------- load / override
def _format_error(err: ValidationError, raw: dict[str, Any]) -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        # pydantic puts the union tag in the location ("model.transformer.n_head"): drop it
        if len(loc) >= 2 and loc[0] == "model" and loc[1] in FAMILIES:
            loc = [loc[0]] + loc[2:]
        field = ".".join(loc) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        value = _lookup(raw, loc)
        shown = f" = {value!r}" if value is not _MISSING and not isinstance(value, dict) else ""
        lines.append(f"{field}{shown}: {msg}")
    return "invalid config: " + "; ".join(lines)


_MISSING = object()


def _lookup(raw: Any, loc: list[str]) -> Any:
    for key in loc:
        if isinstance(raw, dict) and key in raw:
            raw = raw[key]
        else:
            return _MISSING
    return raw


def build_config(raw: dict[str, Any] | None = None) -> RunConfig:
    """Validate a nested dict into a :class:`RunConfig`, or raise :class:`ConfigError`."""
    raw = dict(raw or {})
    unknown = [k for k in raw if k not in SECTIONS]
    if unknown:
        raise ConfigError(f"invalid config: unknown section(s) {unknown}; known: {list(SECTIONS)}")
    for k in SECTIONS:
        if raw.get(k) is not None and not isinstance(raw[k], dict):
            raise ConfigError(f"invalid config: section '{k}' must be a mapping, got {raw[k]!r}")
    if isinstance(raw.get("model"), dict):
        raw["model"] = {"family": "transformer", **raw["model"]}
        if raw["model"]["family"] not in FAMILIES:
            raise ConfigError(f"invalid config: model.family = {raw['model']['family']!r}: unknown; known: {list(FAMILIES)}")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, raw)) from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {p} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections, got {type(data).__name__}")
    return data


def parse_value(text: str) -> Any:
    """Parse a command-line value: YAML scalars (``4``, ``true``, ``null``, ``[1, 2]``), with
    ``3e-3`` read as a float (YAML 1.1 would keep it a string)."""
    try:
        return float(text) if re.fullmatch(r"[+-]?\d+(\.\d*)?[eE][+-]?\d+", text) else yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``raw["a"]["b"] = value`` for ``dotted == "a.b"``; a new ``model.family`` drops the
    previous family's options (they belong to another config class)."""
    parts = dotted.split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override '--{dotted}': expected --section.field (e.g. --optim.lr 3e-3)")
    section, field = parts
    if section not in SECTIONS:
        raise ConfigError(f"override '--{dotted}': unknown section '{section}'; known: {list(SECTIONS)}")
    sec = raw.setdefault(section, {})
    if sec is None:
        sec = raw[section] = {}
    if section == "model" and field == "family" and sec.get("family", "transformer") != value:
        keep = {"vocab_size", "dropout", "tie_embeddings", "init_std"}
        for k in [k for k in sec if k not in keep]:
            del sec[k]
    sec[field] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, str]]:
    """``["--model.n_layer", "4", "--optim.lr=3e-3"]`` -> ``[("model.n_layer", "4"), ("optim.lr", "3e-3")]``,
    in order (a field may appear twice here: the command line refuses that, callers composing overrides
    may rely on the last one winning)."""
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(overrides):
        tok = overrides[i]
        if not tok.startswith("--"):
            raise ConfigError(f"unexpected argument {tok!r}: overrides look like --section.field value")
        key = tok[2:]
        if "=" in key:
            key, text = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(overrides):
                raise ConfigError(f"override '--{key}' has no value")
            text = overrides[i + 1]
            i += 2
        pairs.append((key, text))
    return pairs


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``["--model.n_layer", "4", "--optim.lr=3e-3", ...]`` to a nested dict (copied)."""
    raw = copy.deepcopy(raw)
    for key, text in parse_overrides(overrides):
        set_dotted(raw, key, parse_value(text))
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> RunConfig:
    """YAML file (optional) + overrides -> validated :class:`RunConfig`."""
    raw: dict[str, Any] = dict(base or {})
    if path is not None:
        raw = _merge(raw, load_yaml(path))
    raw = apply_overrides(raw, overrides or [])
    return build_config(raw)


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
