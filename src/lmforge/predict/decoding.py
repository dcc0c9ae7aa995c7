"""What one :func:`~lmforge.predict.generate` call shares with its search strategies (greedy / sampling
in :mod:`~lmforge.predict.sampling`, beam search in :mod:`~lmforge.predict.beam`): the resolved settings
(:class:`DecodeRun`), a finished :class:`Hypothesis` with its finish reason, and the prefill step that
both strategies start with.

Kept below the engine so that the strategies do not import the module that dispatches to them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lmforge.models.base import DecodingModel
from lmforge.predict.config import GenerationConfig, GenerationError
from lmforge.predict.processors import LogitsProcessorList
from lmforge.predict.streaming import GenerationTokenizer, Streamer

LENGTH, EOS, STOP = 0, 1, 2
"""Finish reasons, as ints (cheap to keep in tensors during beam search)."""
FINISH_REASONS = ("length", "eos", "stop")
"""The names :class:`~lmforge.predict.config.GenerationOutput` reports, indexed by the ints above."""


@dataclass
class DecodeRun:
    """The settings of one generate call, resolved once (eos ids, pad id, processors, sampling generator)."""

    model: DecodingModel
    config: GenerationConfig
    device: torch.device
    eos: list[int]
    pad: int
    procs: LogitsProcessorList
    sampling: bool
    generator: torch.Generator | None
    tokenizer: GenerationTokenizer | None
    stops: list[str]
    streamer: Streamer | None


@dataclass
class Hypothesis:
    """One returned completion: new ids (no eos), its score and finish reason, its text when decoded."""

    ids: list[int]
    score: float
    reason: int
    text: str | None = None


def prefill(run: DecodeRun, prompts: list[list[int]], budget: int) -> tuple[Any, torch.Tensor, torch.Tensor | None]:
    """Left-pad the prompts into (N, L), one ``step`` -> state, last logits (N, V), history (N, L) or None
    (history: the prompt ids with -1 for padding, only kept when a processor reads it)."""
    lengths = [len(p) for p in prompts]
    N, L = len(prompts), max(lengths)
    ids = torch.tensor([[run.pad] * (L - len(p)) + p for p in prompts], dtype=torch.long, device=run.device)
    valid = None
    if min(lengths) < L:
        lens = torch.tensor(lengths, device=run.device)
        valid = torch.arange(L, device=run.device)[None, :] >= (L - lens)[:, None]  # (N, L)
    state = run.model.init_state(N, run.device)
    if hasattr(run.model, "reserve_state"):  # a cache can be allocated once (the longest prompt + its budget)
        run.model.reserve_state(state, L + budget)
    logits, state = run.model.step(ids, state, valid=valid)
    history = None
    if run.procs.needs_history:
        history = ids if valid is None else ids.masked_fill(~valid, -1)
    return state, logits[:, -1, :], history


# ------------------------------------------------------------------------------------ row states
class RowStateError(GenerationError):
    """A model whose decoding state the continuous scheduler cannot merge row by row (it then falls back)."""


class RowStates:
    """What continuous batching needs beyond the state contract: rows of two states joined into one batch
    (:meth:`concat`) and rows kept (:meth:`select`). The contract's ``reorder_state`` selects rows but keeps
    the state's length; :meth:`select` also drops the leading cache slots no kept row uses, so that a
    transformer's shared slot count stays the longest row's length and never outgrows the context while rows
    come and go.

    Written per state type of the model families (kept here, with the strategies, rather than as model
    methods, so the families' contract does not grow for one consumer): the transformer's :class:`KVCache`
    (rows of different lengths are aligned on the right and left-padded, ``key_valid`` masks the padding,
    ``pos`` keeps each row's own positions), the recurrent and RCNN states (hidden states are joined on the
    batch axis; no padding) and a wrapped Hugging Face model's :class:`HFState` (``DynamicCache`` layers only).
    """

    def __init__(self, concat: Callable[[Any, Any], Any], select: Callable[[Any, torch.Tensor], Any]) -> None:
        self.concat = concat
        self.select = select


def row_states(state: object) -> RowStates:
    """The :class:`RowStates` of a state (one from ``init_state``); :class:`RowStateError` when the family
    has none (the caller then decodes that model request by request)."""
    from lmforge.models.hf import HFState
    from lmforge.models.rcnn import RCNNState
    from lmforge.models.recurrent import RecurrentState
    from lmforge.models.transformer import KVCache

    if isinstance(state, KVCache):
        return RowStates(_kv_concat, _kv_select)
    if isinstance(state, RecurrentState):
        return RowStates(_rec_concat, _rec_select)
    if isinstance(state, RCNNState):
        return RowStates(_rcnn_concat, _rcnn_select)
    if isinstance(state, HFState) and _hf_plain(state):
        return RowStates(_hf_concat, _hf_select)
    raise RowStateError(f"decoding state {type(state).__name__} cannot be merged row by row")


def _cat_hidden(a: Any, b: Any) -> Any:
    if isinstance(a, tuple):
        return (torch.cat([a[0], b[0]], 1), torch.cat([a[1], b[1]], 1))
    return torch.cat([a, b], 1)


def _sel_hidden(h: Any, index: torch.Tensor) -> Any:
    if isinstance(h, tuple):
        return (h[0].index_select(1, index), h[1].index_select(1, index))
    return h.index_select(1, index)


def _rec_concat(a: Any, b: Any) -> Any:
    from lmforge.models.recurrent import RecurrentState

    hidden = [_cat_hidden(x, y) for x, y in zip(a.hidden, b.hidden, strict=True)]
    return RecurrentState(hidden, max(a.length, b.length))


def _rec_select(s: Any, index: torch.Tensor) -> Any:
    from lmforge.models.recurrent import RecurrentState

    return RecurrentState([_sel_hidden(h, index) for h in s.hidden], s.length)


def _rcnn_concat(a: Any, b: Any) -> Any:
    from lmforge.models.rcnn import RCNNState

    return RCNNState(
        conv=[torch.cat([x, y], 0) for x, y in zip(a.conv, b.conv, strict=True)],
        hidden=[_cat_hidden(x, y) for x, y in zip(a.hidden, b.hidden, strict=True)],
        length=max(a.length, b.length),
    )


def _rcnn_select(s: Any, index: torch.Tensor) -> Any:
    from lmforge.models.rcnn import RCNNState

    return RCNNState(
        conv=[c.index_select(0, index) for c in s.conv],
        hidden=[_sel_hidden(h, index) for h in s.hidden],
        length=s.length,
    )


def _first_used(valid: torch.Tensor, length: int) -> int:
    """First slot of ``valid[:, :length]`` (B, S) bool that some row uses (``length`` when none does)."""
    used = valid[:, :length].any(0)
    return int(used.int().argmax()) if bool(used.any()) else length


def _kv_concat(a: Any, b: Any) -> Any:
    """Rows of ``a`` then ``b``; the shorter state is left-padded (zeros, masked) to the longer one's length."""
    from lmforge.models.transformer import KVCache

    S = max(a.length, b.length)
    cap = max(a.kv[0].size(3), b.kv[0].size(3), S)
    C = a.key_valid.size(1)
    kv = []
    for x, y in zip(a.kv, b.kv, strict=True):
        out = x.new_empty((x.size(0) + y.size(0), *x.shape[1:3], cap, x.size(4)))
        for rows, t, L in ((slice(0, x.size(0)), x, a.length), (slice(x.size(0), None), y, b.length)):
            out[rows, :, :, : S - L] = 0  # padding: masked out, but must be finite (0 x NaN is NaN)
            out[rows, :, :, S - L : S] = t[:, :, :, :L]
        kv.append(out)
    valid = torch.zeros(a.key_valid.size(0) + b.key_valid.size(0), C, dtype=torch.bool, device=a.key_valid.device)
    na = a.key_valid.size(0)
    valid[:na, S - a.length : S] = a.key_valid[:, : a.length]
    valid[na:, S - b.length : S] = b.key_valid[:, : b.length]
    return KVCache(kv=kv, key_valid=valid, pos=torch.cat([a.pos, b.pos]), length=S, padded=not bool(valid[:, :S].all()))


def _kv_select(s: Any, index: torch.Tensor) -> Any:
    """Rows ``index``, without the leading slots none of them uses (one copy of the kept slots)."""
    from lmforge.models.transformer import KVCache

    valid = s.key_valid.index_select(0, index)
    L = s.length
    m = _first_used(valid, L)
    kv = []
    for t in s.kv:
        out = t.new_empty((index.numel(), *t.shape[1:]))
        torch.index_select(t[:, :, :, m:L], 0, index, out=out[:, :, :, : L - m])
        kv.append(out)
    new_valid = torch.zeros_like(valid)
    new_valid[:, : L - m] = valid[:, m:L]
    return KVCache(
        kv=kv,
        key_valid=new_valid,
        pos=s.pos.index_select(0, index),
        length=L - m,
        padded=not bool(new_valid[:, : L - m].all()),
    )


def _hf_plain(state: Any) -> bool:
    """Whether every layer of the HF cache is a plain ``DynamicLayer`` (full attention, keys/values tensors)."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return False
    layers = getattr(state.cache, "layers", None)
    return isinstance(layers, list) and all(type(x) is DynamicLayer for x in layers)


def _hf_concat(a: Any, b: Any) -> Any:
    import copy

    from lmforge.models.hf import HFState

    S = max(a.length, b.length)
    cache = copy.copy(a.cache)
    cache.layers = []
    for x, y in zip(a.cache.layers, b.cache.layers, strict=True):
        layer = copy.copy(x)
        for name in ("keys", "values"):
            tx, ty = getattr(x, name), getattr(y, name)
            parts = []
            for t in (tx, ty):
                pad = S - t.size(2)
                parts.append(torch.cat([t.new_zeros((*t.shape[:2], pad, t.size(3))), t], 2) if pad else t)
            setattr(layer, name, torch.cat(parts, 0))
        cache.layers.append(layer)
    masks = []
    for st in (a, b):
        pad = S - st.length
        masks.append(torch.cat([st.mask.new_zeros((st.mask.size(0), pad)), st.mask], 1) if pad else st.mask)
    return HFState(cache=cache, mask=torch.cat(masks, 0), pos=torch.cat([a.pos, b.pos]), length=S)


def _hf_select(s: Any, index: torch.Tensor) -> Any:
    import copy

    from lmforge.models.hf import HFState

    mask = s.mask.index_select(0, index)
    m = _first_used(mask.bool(), s.length)
    cache = copy.copy(s.cache)
    cache.layers = []
    for x in s.cache.layers:
        layer = copy.copy(x)
        layer.keys = x.keys.index_select(0, index)[:, :, m:]
        layer.values = x.values.index_select(0, index)[:, :, m:]
        cache.layers.append(layer)
    return HFState(cache=cache, mask=mask[:, m:], pos=s.pos.index_select(0, index), length=s.length - m)
