"""Architecture mutations of a model instance (layer 2: models only, nothing of training).

Every function takes a model and returns a NEW model (the argument is left untouched) whose ``.config`` is
the new resolved config, on the parent's device and dtype, in the parent's train/eval mode. Weights are
carried over; what is new is initialized so that, where it is possible, the child computes exactly the
parent's function (its logits equal the parent's, up to float rounding) and can still learn:

``add_layer(model, index)``
    - transformer: a new block whose attention output projection and MLP output projection (weights and
      biases) are zero: both branches add 0 to the residual stream, so the block is the identity. Its other
      weights keep the usual random init, so the zero projections get a gradient at once.
    - lstm / gru with ``residual``: a new layer whose *candidate* rows (LSTM ``g``, GRU ``n``: input and
      hidden weights and both biases) are zero. LSTM: ``g = tanh(0) = 0`` keeps ``c = 0`` so
      ``h = o * tanh(0) = 0``; GRU: ``n = tanh(0) = 0`` and ``h' = (1 - z) * n + z * h`` keeps ``h = 0``.
      The layer outputs exactly 0 and the residual connection makes it the identity; the gate rows keep
      their random init (symmetry breaking), and the candidate rows get a gradient through ``i`` / ``1 - z``.
      Index 0 is refused: the first layer has no residual connection (``residual`` adds from the second on).
    - rcnn with ``residual``: a new block whose GLU value half of the pointwise projection is zero (the
      convolution branch outputs ``0 * sigmoid(b) = 0``) and whose recurrent layer has zero candidate rows.
    - recurrent families without ``residual``: no recurrent layer computes the identity, so
      ``add_layer`` raises :class:`MutationError` unless ``exact=False`` (then the new layer is freshly
      initialized and the function changes). Turning ``residual`` on first (:func:`set_connection`) is the
      other way; it is not function-preserving either.
``remove_layer(model, index)``: drops a layer/block (not function-preserving, except removing a layer that
    computes the identity, e.g. one just added).
``widen(model, factor | width)``
    - transformer: the MLP hidden width. ``method="net2net"`` (default) duplicates random existing hidden
      units (incoming weights and biases copied; for SwiGLU both the gate and the up row) and splits each
      original unit's outgoing column among its copies with random positive shares that sum to 1: the sum
      is unchanged, and unequal shares give the copies different gradients (symmetry breaking).
      ``method="zero"``: new units with random incoming weights and zero outgoing columns.
    - lstm / gru: ``d_model`` (embedding and hidden width). New embedding columns are zero and every layer's
      new units have zero candidate rows, so the new dimensions stay exactly 0 through the network (weights
      that only multiply those zeros keep a random init, which is what lets them start learning).
    - rcnn: refused: its LayerNorms normalize over ``d_model``, so extra (zero) dimensions change the
      statistics of the old ones; no function-preserving widening exists.
``set_connection(model, residual=..., layout=...)``: residual on/off (recurrent families) or the
    transformer block layout (``sequential`` / ``parallel``). Not function-preserving; all weights are copied
    (sequential from parallel: ``ln_2`` starts as a copy of ``ln_1``, the norm the MLP read before).
``change_options(model, **fields)``: any other field of the family's config (``n_head``, ``norm``,
    ``position``, ``kernel_size``, ``rnn``, ``dropout``...). Tensors whose name and shape are unchanged are
    copied; the others are freshly initialized. Only options that touch no tensor (``dropout``) preserve the
    function.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from pydantic import ValidationError

from lmforge.config import LmforgeError
from lmforge.models import build_model
from lmforge.models.base import LanguageModel
from lmforge.models.rcnn import RCNNModel
from lmforge.models.recurrent import RecurrentModel
from lmforge.models.transformer import TransformerModel, mlp_hidden

__all__ = [
    "MUTABLE_FAMILIES",
    "MutationError",
    "add_layer",
    "change_options",
    "remove_layer",
    "set_connection",
    "widen",
]

MUTABLE_FAMILIES = ("transformer", "lstm", "gru", "rcnn")
_LAYERS = {"transformer": "h", "lstm": "layers", "gru": "layers", "rcnn": "blocks"}
"""Name of the module list that holds the layers of each family."""
_GATES = {"lstm": 4, "gru": 3}
_CANDIDATE = 2
"""Chunk of the candidate in PyTorch's fused gate rows: LSTM [i, f, g, o], GRU [r, z, n]."""


class MutationError(LmforgeError, ValueError):
    """A mutation that does not apply to this model (wrong family, index out of range, not exact...)."""


ModelT = TypeVar("ModelT", bound=LanguageModel)


# ------------------------------------------------------------------------------------------ helpers
def _family(model: LanguageModel) -> str:
    fam = getattr(getattr(model, "config", None), "family", None)
    if fam not in MUTABLE_FAMILIES:
        raise MutationError(f"model.family {fam!r} cannot be mutated; supported: {list(MUTABLE_FAMILIES)}")
    return fam


def _as(model: LanguageModel, cls: type[ModelT]) -> ModelT:
    """``model`` as the class ``build_model`` builds for its family (a model of another class is a bug)."""
    if not isinstance(model, cls):
        raise MutationError(f"internal: a {model.config.family} model of class {type(model).__name__}, not {cls.__name__}")
    return model


def _rebuild(model: LanguageModel, **updates: Any) -> LanguageModel:
    """A freshly initialized model of the parent's config with ``updates``, on the parent's device/dtype."""
    cfg = model.config
    if "family" in updates and updates["family"] != cfg.family:
        allowed = {"lstm", "gru"}
        if not {cfg.family, updates["family"]} <= allowed:
            raise MutationError(f"model.family {cfg.family!r} -> {updates['family']!r}: only lstm <-> gru can switch")
    unknown = sorted(set(updates) - set(type(cfg).model_fields))
    if unknown:
        raise MutationError(f"{cfg.family} has no option(s) {unknown}; known: {sorted(type(cfg).model_fields)}")
    try:
        new_cfg = type(cfg).model_validate({**cfg.model_dump(), **updates})
    except ValidationError as err:
        e = err.errors()[0]
        where = ".".join(str(p) for p in e["loc"]) or "model"
        raise MutationError(f"model.{where}: {e['msg'].removeprefix('Value error, ')}") from None
    child = build_model(new_cfg)
    ref = next(model.parameters())
    child.to(device=ref.device, dtype=ref.dtype)
    child.train(model.training)
    return child


def _load(child: LanguageModel, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into ``child`` (names must exist with the same shapes)."""
    target = child.state_dict()
    with torch.no_grad():
        for name, value in state.items():
            if name not in target:
                raise MutationError(f"internal: the child has no tensor {name!r}")
            if target[name].shape != value.shape:
                raise MutationError(
                    f"internal: {name} is {tuple(target[name].shape)} in the child, {tuple(value.shape)} in the parent"
                )
            target[name].copy_(value)


def _renumber(
    state: dict[str, torch.Tensor], prefix: str, fn: Callable[[int], int | None]
) -> dict[str, torch.Tensor]:
    """Rename ``prefix.{j}.rest`` to ``prefix.{fn(j)}.rest``; ``fn(j) is None`` drops the tensor."""
    pat = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    out = {}
    for name, value in state.items():
        m = pat.match(name)
        if m is None:
            out[name] = value
            continue
        j = fn(int(m.group(1)))
        if j is not None:
            out[f"{prefix}.{j}.{m.group(2)}"] = value
    return out


def _zero_candidate(rnn: torch.nn.RNNBase, rows: slice | None = None) -> None:
    """Zero the candidate rows (input and hidden weights, both biases) of ``rnn``; ``rows`` selects units
    within the candidate chunk (default: all)."""
    d = rnn.hidden_size
    start = _CANDIDATE * d
    sel = slice(start, start + d) if rows is None else slice(start + rows.start, start + rows.stop)
    with torch.no_grad():
        for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
            p = getattr(rnn, name, None)
            if p is not None:
                p[sel].zero_()


def _check_index(index: int | None, low: int, high: int, default: int, what: str) -> int:
    i = default if index is None else index
    if not isinstance(i, int) or isinstance(i, bool) or not low <= i <= high:
        raise MutationError(f"{what} index {index!r} is out of range [{low}, {high}]")
    return i


# ---------------------------------------------------------------------------------------- add_layer
def add_layer(model: LanguageModel, index: int | None = None, *, exact: bool = True) -> LanguageModel:
    """A child with one more layer/block inserted at ``index`` (default: on top, after the last one),
    initialized as the identity (see the module docstring). ``exact=False`` allows a freshly initialized
    layer where no identity layer exists (recurrent families without ``residual``)."""
    fam = _family(model)
    cfg = model.config
    n = cfg.n_layer
    residual = fam == "transformer" or cfg.residual
    low = 1 if fam in ("lstm", "gru") and residual else 0
    if index == 0 and low == 1:
        raise MutationError(
            "add_layer index 0: the first recurrent layer has no residual connection (model.residual adds a "
            f"layer's input from the second layer on), so a new first layer cannot be the identity; use 1..{n}"
        )
    i = _check_index(index, low, n, n, "add_layer")
    if not residual and exact:
        raise MutationError(
            f"add_layer on a {fam} model with model.residual off: no recurrent layer computes the identity; "
            "pass exact=False for a freshly initialized layer, or set_connection(model, residual=True) first"
        )
    child = _rebuild(model, n_layer=n + 1)
    prefix = _LAYERS[fam]
    _load(child, _renumber(model.state_dict(), prefix, lambda j: j if j < i else j + 1))
    if not residual:
        return child  # exact=False: the new layer keeps its fresh init
    with torch.no_grad():
        if fam == "transformer":
            block = _as(child, TransformerModel).blocks()[i]
            for lin in (block.attn.c_proj, block.mlp.c_proj):
                lin.weight.zero_()
                if lin.bias is not None:
                    lin.bias.zero_()
        elif fam in ("lstm", "gru"):
            _zero_candidate(_as(child, RecurrentModel).rnns()[i])
        else:
            rblock = _as(child, RCNNModel).rcnn_blocks()[i]
            d = cfg.d_model
            rblock.conv.pw.weight[:d].zero_()  # GLU value half: a = 0, so a * sigmoid(b) = 0
            rblock.conv.pw.bias[:d].zero_()
            _zero_candidate(rblock.rnn)
    return child


# ------------------------------------------------------------------------------------- remove_layer
def remove_layer(model: LanguageModel, index: int | None = None) -> LanguageModel:
    """A child without layer/block ``index`` (default: the last one); the others keep their weights."""
    fam = _family(model)
    n = model.config.n_layer
    if n < 2:
        raise MutationError(f"remove_layer: the model has {n} layer; at least one must remain")
    i = _check_index(index, 0, n - 1, n - 1, "remove_layer")
    child = _rebuild(model, n_layer=n - 1)
    _load(child, _renumber(model.state_dict(), _LAYERS[fam], lambda j: None if j == i else (j if j < i else j - 1)))
    return child


# --------------------------------------------------------------------------------------------- widen
def _new_width(old: int, factor: float | None, width: int | None, what: str) -> int:
    if width is not None and factor is None:
        new = int(width)
    elif factor is not None and width is None:
        new = round(old * float(factor))
    else:
        raise MutationError("widen: give exactly one of factor or width")
    if new <= old:
        raise MutationError(f"widen: {what} would go from {old} to {new}; widening must increase it")
    return new


def widen(
    model: LanguageModel, factor: float | None = None, *, width: int | None = None, method: str = "net2net"
) -> LanguageModel:
    """A wider child computing the same function: the transformer's MLP hidden width, or the recurrent
    ``d_model`` (see the module docstring). ``factor`` multiplies the current width, ``width`` sets it.
    ``method`` (transformer only): ``net2net`` (duplicate units, split outgoing weights) or ``zero``."""
    fam = _family(model)
    if method not in ("net2net", "zero"):
        raise MutationError(f"widen method {method!r}: use 'net2net' or 'zero'")
    if fam == "transformer":
        return _widen_mlp(model, factor, width, method)
    if fam in ("lstm", "gru"):
        return _widen_recurrent(model, factor, width)
    raise MutationError(
        "widen: rcnn normalizes over d_model with LayerNorm, so added dimensions change the old ones' statistics; "
        "no function-preserving widening exists (change_options(model, d_model=...) gives a fresh model)"
    )


def _widen_mlp(model: LanguageModel, factor: float | None, width: int | None, method: str) -> LanguageModel:
    cfg = model.config
    h = mlp_hidden(cfg)
    new_h = _new_width(h, factor, width, "the MLP hidden width")
    child = _rebuild(model, mlp_ratio=new_h / cfg.d_model)
    if mlp_hidden(child.config) != new_h:
        raise MutationError(f"internal: mlp_ratio {new_h / cfg.d_model} does not give {new_h} hidden units")
    state = {k: v for k, v in model.state_dict().items() if not re.match(r"^h\.\d+\.mlp\.c_(fc|proj)\.", k)}
    _load(child, state)
    swiglu = cfg.mlp == "swiglu"
    with torch.no_grad():
        for pb, cb in zip(_as(model, TransformerModel).blocks(), _as(child, TransformerModel).blocks(), strict=True):
            p_fc, p_proj, c_fc, c_proj = pb.mlp.c_fc, pb.mlp.c_proj, cb.mlp.c_fc, cb.mlp.c_proj
            if p_proj.bias is not None:
                c_proj.bias.copy_(p_proj.bias)
            halves = 2 if swiglu else 1  # SwiGLU: c_fc rows are [gate; up], each h long
            if method == "zero":
                for k in range(halves):
                    c_fc.weight[k * new_h : k * new_h + h] = p_fc.weight[k * h : (k + 1) * h]
                    if p_fc.bias is not None:
                        c_fc.bias[k * new_h : k * new_h + h] = p_fc.bias[k * h : (k + 1) * h]
                c_proj.weight[:, :h] = p_proj.weight
                c_proj.weight[:, h:] = 0.0
                continue
            dev = p_fc.weight.device
            src = torch.cat([torch.arange(h), torch.randint(0, h, (new_h - h,))]).to(dev)  # unit each copies
            r = (torch.rand(new_h) + 0.5).to(device=dev, dtype=torch.float64)  # positive shares
            total = torch.zeros(h, dtype=torch.float64, device=dev).index_add_(0, src, r)
            share = (r / total[src]).to(p_proj.weight.dtype)  # the shares of each original unit sum to 1
            for k in range(halves):
                rows = src + k * h
                c_fc.weight[k * new_h : (k + 1) * new_h] = p_fc.weight[rows]
                if p_fc.bias is not None:
                    c_fc.bias[k * new_h : (k + 1) * new_h] = p_fc.bias[rows]
            c_proj.weight.copy_(p_proj.weight[:, src] * share[None, :])  # (d, new_h)
    return child


def _widen_recurrent(model: LanguageModel, factor: float | None, width: int | None) -> LanguageModel:
    cfg = model.config
    d = cfg.d_model
    new_d = _new_width(d, factor, width, "d_model")
    gates = _GATES[cfg.family]
    parent = _as(model, RecurrentModel)
    child = _as(_rebuild(model, d_model=new_d), RecurrentModel)
    with torch.no_grad():
        child.wte.weight[:, :d] = parent.wte.weight
        child.wte.weight[:, d:] = 0.0  # new input dimensions start at exactly 0
        if not cfg.tie_embeddings:
            child.lm_head.weight[:, :d] = parent.lm_head.weight  # new columns multiply zeros: random init kept
        for p_rnn, c_rnn in zip(parent.rnns(), child.rnns(), strict=True):
            for kind in ("ih", "hh"):
                pw, cw = getattr(p_rnn, f"weight_{kind}_l0"), getattr(c_rnn, f"weight_{kind}_l0")
                pbias, cbias = getattr(p_rnn, f"bias_{kind}_l0"), getattr(c_rnn, f"bias_{kind}_l0")
                for g in range(gates):
                    # old units: old rows and old columns; the new columns multiply zeros (random init kept)
                    cw[g * new_d : g * new_d + d, :d] = pw[g * d : (g + 1) * d]
                    cbias[g * new_d : g * new_d + d] = pbias[g * d : (g + 1) * d]
            _zero_candidate(c_rnn, rows=slice(d, new_d))  # new units output exactly 0
    return child


# ------------------------------------------------------------------------------ connection / options
def set_connection(model: LanguageModel, *, residual: bool | None = None, layout: str | None = None) -> LanguageModel:
    """Residual connections on/off (lstm, gru, rcnn) or the transformer block layout (``sequential`` /
    ``parallel``). Not function-preserving: every weight is copied into the rewired model."""
    fam = _family(model)
    if (residual is None) == (layout is None):
        raise MutationError("set_connection: give exactly one of residual or layout")
    if fam == "transformer":
        if layout is None:
            raise MutationError("set_connection: a transformer is always residual; change its layout instead")
        child = change_options(model, layout=layout)
        if model.config.layout == "parallel" and layout == "sequential":
            with torch.no_grad():
                for block in _as(child, TransformerModel).blocks():
                    assert block.ln_2 is not None  # sequential blocks have a second norm
                    block.ln_2.load_state_dict(block.ln_1.state_dict())
        return child
    if residual is None:
        raise MutationError(f"set_connection: {fam} has no layout; set residual instead")
    return change_options(model, residual=bool(residual))


def change_options(model: LanguageModel, **updates: Any) -> LanguageModel:
    """A child with other config options (any field of the family's config). Tensors whose name and shape
    are unchanged are copied; the others are freshly initialized (see the module docstring)."""
    _family(model)
    if not updates:
        raise MutationError("change_options: no option given")
    child = _rebuild(model, **updates)
    target = child.state_dict()
    state = {k: v for k, v in model.state_dict().items() if k in target and target[k].shape == v.shape}
    _load(child, state)
    return child
