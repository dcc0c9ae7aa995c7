"""How big a model the budget can train: parameter counts, a quick throughput measurement, a size cap,
and the default space narrowed to it.

The cap keeps the final model trainable for about ``TOKENS_PER_PARAM`` tokens per parameter within the
budget (compute-optimal training uses about 20; small budgets do better with slightly larger models, so 10),
and below ``CORPUS_PARAMS_PER_TOKEN`` parameters per training token (more memorises a small corpus).
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any

import torch

from lmforge.config import ConfigError, RunConfig, build_config
from lmforge.data import BlockSampler
from lmforge.models import build_model
from lmforge.search.space import Dist, SearchSpace, apply_values
from lmforge.train.loop import autocast_context, resolve_device

SHORT_RUN_EPOCHS = 2.0
"""Below this many passes over the corpus by the final model, the default space does not search dropout."""
TOKENS_PER_PARAM = 10.0
CORPUS_PARAMS_PER_TOKEN = 10.0
_REFERENCE = {"family": "transformer", "d_model": 128, "n_layer": 2, "n_head": 4}


def count_params(cfg: RunConfig, vocab_size: int) -> tuple[int, float]:
    """(parameters, training FLOPs per token) of ``cfg.model``, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = build_model(cfg.model, vocab_size=vocab_size, max_seq_len=cfg.max_seq_len)
    try:
        fpt = float(model.flops_per_token(cfg.data.block_size))
    except NotImplementedError:
        fpt = 6.0 * model.num_params()
    return int(model.num_params()), fpt


def measure_throughput(
    base: dict[str, Any], train_tokens: Any, vocab_size: int, seconds: float = 1.5
) -> tuple[float, float]:
    """(training FLOP/s, tokens/s) of a small reference transformer: a few AdamW steps on the base
    config's batch shape and device, the fastest of three windows (the FLOP/s are a lower bound for larger
    models, which use the hardware better)."""
    raw = apply_values(base, {f"model.{k}": v for k, v in _REFERENCE.items()})
    cfg = build_config(raw)
    device = resolve_device(cfg.train.device)
    model = build_model(cfg.model, vocab_size=vocab_size, max_seq_len=cfg.max_seq_len).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sampler = BlockSampler(train_tokens, cfg.data.block_size, cfg.train.batch_size, seed=0)
    autocast = autocast_context(device, cfg.train.dtype)

    def step() -> int:
        x, y = sampler.next_batch()
        x, y = x.to(device), y.to(device)
        with autocast:
            _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return x.numel()

    step()  # warm-up: allocations, kernels
    # three windows, the fastest counts: a moment of interference (another process starting, a page-cache
    # flush) should not shrink the model sizes of a whole run
    rates = []
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, tokens, steps = time.perf_counter(), 0, 0
        while steps < 2 or (time.perf_counter() - t0 < seconds / 3 and steps < 70):
            tokens += step()
            steps += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(tokens / max(1e-9, time.perf_counter() - t0))
    tok_s = max(rates)
    return tok_s * float(model.flops_per_token(cfg.data.block_size)), tok_s


def size_cap_for_time(flops_per_s: float, train_seconds: float, train_tokens: int) -> int:
    """Largest parameter count trainable for ``TOKENS_PER_PARAM`` tokens each in ``train_seconds``:
    tokens = F t / (6 N) >= r N  ->  N <= sqrt(F t / (6 r))."""
    by_budget = math.sqrt(max(0.0, flops_per_s) * max(0.0, train_seconds) / (6.0 * TOKENS_PER_PARAM))
    return int(max(1.0, min(by_budget, CORPUS_PARAMS_PER_TOKEN * train_tokens)))


def size_cap_for_tokens(tokens: float, train_tokens: int) -> int:
    return int(max(1.0, min(tokens / TOKENS_PER_PARAM, CORPUS_PARAMS_PER_TOKEN * train_tokens)))


def cap_space(space: SearchSpace, base: dict[str, Any], vocab_size: int, cap: int) -> tuple[SearchSpace, list[str]]:
    """Narrow ``model.d_model`` and ``model.n_layer`` so that the smallest model of each kept width (and
    the narrowest model of each kept depth) fits ``cap`` parameters; at least the smallest value stays.
    Counted as a transformer, the family with the most parameters for a width and depth."""
    d_dists = [d for d in space.dists if d.path == "model.d_model"]
    l_dists = [d for d in space.dists if d.path == "model.n_layer"]
    if not d_dists and not l_dists:
        return space, []
    widths = sorted({int(v) for d in d_dists for v in _values(d)}) or [
        int((base.get("model") or {}).get("d_model", 128))
    ]
    depths = sorted({int(v) for d in l_dists for v in _values(d)}) or [int((base.get("model") or {}).get("n_layer", 2))]

    def params(width: int, depth: int) -> int:
        raw = apply_values(
            base, {"model.family": "transformer", "model.d_model": width, "model.n_layer": depth, "model.n_head": 1}
        )
        try:
            return count_params(build_config(raw), vocab_size)[0]
        except ConfigError:
            return 0

    max_width = max([widths[0]] + [w for w in widths if params(w, depths[0]) <= cap])
    max_depth = max([depths[0]] + [n for n in depths if params(widths[0], n) <= cap])
    notes = []
    new_blocks = []
    for b in space.blocks:
        dists = []
        for d in b.dists:
            limit = max_width if d.path == "model.d_model" else max_depth if d.path == "model.n_layer" else None
            if limit is not None:
                nd = _clip(d, limit)
                if nd != d:
                    notes.append(f"{d.path} capped at {limit} (about {cap:,} parameters fit the budget)")
                d = nd
            dists.append(d)
        new_blocks.append(replace(b, dists=dists))
    return replace(space, blocks=new_blocks), sorted(set(notes))


def _values(d: Dist) -> list[Any]:
    if d.kind == "categorical":
        return [c for c in d.choices if isinstance(c, (int, float)) and not isinstance(c, bool)]
    return [d.low, d.high]


def _clip(d: Dist, limit: int) -> Dist:
    if d.kind == "categorical":
        kept = tuple(c for c in d.choices if not isinstance(c, (int, float)) or c <= limit) or d.choices[:1]
        grid = tuple(g for g in d.grid if g in kept) if d.grid is not None else None
        return replace(d, choices=kept, grid=grid or None)
    high = max(d.low, min(d.high, float(limit)))
    grid = tuple(g for g in d.grid if g <= high) if d.grid is not None else None
    return replace(d, high=high, grid=grid or None)


def fix_regularization(space: SearchSpace, epochs: float) -> tuple[SearchSpace, list[str]]:
    """A model that sees its corpus fewer than ``SHORT_RUN_EPOCHS`` times cannot overfit it, and dropout
    only slows its learning: then ``model.dropout`` is fixed at 0 instead of searched."""
    if epochs >= SHORT_RUN_EPOCHS:
        return space, []
    blocks, hit = [], False
    for b in space.blocks:
        dists = [d for d in b.dists if d.path != "model.dropout"]
        fixed = dict(b.fixed)
        if len(dists) != len(b.dists):
            hit = True
            fixed["model.dropout"] = 0.0
        blocks.append(replace(b, dists=dists, fixed=fixed))
    if not hit:
        return space, []
    note = (
        f"model.dropout fixed at 0: the budget trains the final model on about {epochs:.1f} passes over the "
        "corpus, too few to overfit it"
    )
    return replace(space, blocks=blocks), [note]
