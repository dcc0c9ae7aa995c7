"""How big a model the budget can train: parameter counts, a quick throughput measurement, a size cap,
and the default space narrowed to it.

The cap keeps the final model trainable for about ``TOKENS_PER_PARAM`` tokens per parameter within the
budget (compute-optimal training uses about 20; small budgets do better with slightly larger models, so 10),
and below ``CORPUS_PARAMS_PER_TOKEN`` parameters per training token (more memorises a small corpus).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from lmforge.config import ConfigError, RunConfig, build_config
from lmforge.data import BlockSampler
from lmforge.models import build_model
from lmforge.search.curves import EVAL_NOISE
from lmforge.search.space import Dist, SearchSpace, apply_values, repair_config
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
    """The sizes ``d`` can take: its numeric choices, every value of an int range (so that a range whose
    top does not fit keeps the depths that do), the ends of a float range."""
    if d.kind == "categorical":
        return [c for c in d.choices if isinstance(c, (int, float)) and not isinstance(c, bool)]
    if d.kind == "int":
        return list(range(int(d.low), int(d.high) + 1, int(d.step or 1)))
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


# ------------------------------------------------------------------------- sizing from the run's trials
SURFACE_B_GRID = 60
"""Exponent grid of the pooled token term (log-spaced over [0.05, 2])."""
SURFACE_MIN_TRIALS = 2
"""Trials with at least two curve points needed to fit the token term."""


@dataclass(frozen=True)
class LossSurface:
    """Loss against parameters ``N`` and trained tokens ``D``, fitted on the run's own trials::

        L_i(D) = o_i + B * (D / d_ref) ** (-beta)       every trial i: its own offset o_i, a shared token term
        o(N)   = E + A * (N / n_ref) ** (-alpha)         the offsets against the trials' sizes

    The token term is pooled over all trials (one ``B``, ``beta``), so a trial with a one- or two-point
    curve is extrapolated with what the longer curves show; the size term is the lower envelope of the
    offsets (the trials differ in more than size: the best trial of a size says what that size can do).
    ``L(N, D) = E + A (N/n_ref)^-alpha + B (D/d_ref)^-beta`` is Chinchilla's form (Hoffmann et al. 2022).
    """

    e: float
    a: float
    alpha: float
    b: float
    beta: float
    n_ref: float
    d_ref: float
    rmse: float
    """Residual standard deviation of the pooled token-term fit (at least ``curves.EVAL_NOISE``)."""
    offsets: dict[str, float]
    points: int
    alternatives: tuple[tuple[float, float, float, dict[str, float]], ...] = ()
    """``(weight, b, beta, offsets)`` of every exponent of the grid, weighted by its likelihood: the spread
    of their predictions is the exponent's share of a prediction's uncertainty."""

    def token_term(self, d: float) -> float:
        return self.b * (max(d, 1.0) / self.d_ref) ** (-self.beta)

    def size_term(self, n: float) -> float:
        return self.e + self.a * (max(n, 1.0) / self.n_ref) ** (-self.alpha)

    def loss(self, n: float, d: float) -> float:
        return self.size_term(n) + self.token_term(d)

    def extrapolate(self, trial: str, d: float) -> float:
        """Trial ``trial``'s loss at ``d`` tokens: its own offset plus the pooled token term."""
        return self.offsets[trial] + self.token_term(d)

    def extrapolate_std(self, trial: str, d: float) -> float:
        """Uncertainty of :meth:`extrapolate`: the residual deviation and the likelihood-weighted spread of
        the same extrapolation under the other exponents of the grid."""
        mean = self.extrapolate(trial, d)
        x = max(d, 1.0) / self.d_ref
        spread = sum(w * (off[trial] + b * x ** (-beta) - mean) ** 2 for w, b, beta, off in self.alternatives)
        return math.sqrt(self.rmse**2 + spread)

    def record(self) -> dict[str, float]:
        return {
            k: round(float(getattr(self, k)), 6) for k in ("e", "a", "alpha", "b", "beta", "n_ref", "d_ref", "rmse")
        }


def fit_loss_surface(trials: dict[str, tuple[float, list[float], list[float]]]) -> LossSurface | None:
    """Fit :class:`LossSurface` on ``{trial: (params, tokens, losses)}``; None when fewer than
    ``SURFACE_MIN_TRIALS`` trials have two or more points at distinct token counts (nothing pins the token
    term). Exact least squares on exponent grids (linear in the other parameters), as in
    :mod:`lmforge.search.curves`."""
    names: list[str] = []
    sizes: list[float] = []
    rows_i: list[int] = []
    ds: list[float] = []
    ys: list[float] = []
    for name, (n, toks, losses) in trials.items():
        pts = [(float(d), float(y)) for d, y in zip(toks, losses, strict=True) if d > 0 and math.isfinite(y)]
        if not pts or not (n > 0):
            continue
        idx = len(names)
        names.append(name)
        sizes.append(float(n))
        for d, y in pts:
            rows_i.append(idx)
            ds.append(d)
            ys.append(y)
    multi = sum(1 for i in range(len(names)) if len({d for j, d in zip(rows_i, ds, strict=True) if j == i}) >= 2)
    if multi < SURFACE_MIN_TRIALS:
        return None
    ri, d_arr, y_arr = np.asarray(rows_i), np.asarray(ds), np.asarray(ys)
    d_ref = float(np.exp(np.mean(np.log(d_arr))))
    k = len(names)
    betas = np.exp(np.linspace(math.log(0.05), math.log(2.0), SURFACE_B_GRID))
    fits = []
    for beta in betas:
        phi = (d_arr / d_ref) ** (-beta)
        off, b, sse = _offsets_fit(ri, phi, y_arr, k)
        fits.append((sse, float(beta), b, off))
    sses = np.array([f[0] for f in fits])
    best = int(np.argmin(sses))
    sse, beta, b, off = fits[best]
    dof = max(1, len(y_arr) - k - 2)
    s2 = max(sse / dof, EVAL_NOISE**2)
    w = np.exp(-(sses - sse) / (2.0 * s2))
    w /= w.sum()
    alts = tuple(
        (float(wi), f[2], f[1], dict(zip(names, (float(o) for o in f[3]), strict=True)))
        for wi, f in zip(w, fits, strict=True)
        if wi > 1e-6
    )
    offsets = dict(zip(names, (float(o) for o in off), strict=True))
    e, a, alpha, n_ref = _size_fit(np.asarray(sizes), off)
    return LossSurface(e, a, alpha, b, beta, n_ref, d_ref, math.sqrt(s2), offsets, len(y_arr), alts)


def _offsets_fit(ri: np.ndarray, phi: np.ndarray, y: np.ndarray, k: int) -> tuple[np.ndarray, float, float]:
    """Least squares ``y = o[ri] + b * phi`` with ``b >= 0``: per trial, o is its mean residual."""

    def offsets(b: float) -> np.ndarray:
        r = y - b * phi
        return np.bincount(ri, weights=r, minlength=k) / np.maximum(np.bincount(ri, minlength=k), 1)

    # within-trial centring: b is the slope of the centred y on the centred phi
    cnt = np.maximum(np.bincount(ri, minlength=k), 1)
    pc = phi - (np.bincount(ri, weights=phi, minlength=k) / cnt)[ri]
    yc = y - (np.bincount(ri, weights=y, minlength=k) / cnt)[ri]
    den = float(np.sum(pc * pc))
    b = max(0.0, float(np.sum(pc * yc)) / den) if den > 0 else 0.0
    off = offsets(b)
    sse = float(np.sum((y - off[ri] - b * phi) ** 2))
    return off, b, sse


def _size_fit(n: np.ndarray, off: np.ndarray) -> tuple[float, float, float, float]:
    """``E + A (N/n_ref)^-alpha`` through the lower envelope of the offsets: the best offset per size,
    then (``A >= 0``) least squares over an exponent grid; one size only: the flat ``E``."""
    n_ref = float(np.exp(np.mean(np.log(n))))
    sizes = np.unique(n)
    env = np.array([off[n == s].min() for s in sizes])
    if len(sizes) < 2:
        return float(env.min()), 0.0, 0.5, n_ref
    best = (math.inf, float(env.min()), 0.0, 0.5)
    for alpha in np.exp(np.linspace(math.log(0.05), math.log(2.0), 40)):
        x = (sizes / n_ref) ** (-alpha)
        xm, ym = float(x.mean()), float(env.mean())
        var = float(np.sum((x - xm) ** 2))
        a = max(0.0, float(np.sum((x - xm) * (env - ym)) / var)) if var > 0 else 0.0
        e = ym - a * xm
        sse = float(np.sum((e + a * x - env) ** 2))
        if sse < best[0]:
            best = (sse, e, a, float(alpha))
    return best[1], best[2], best[3], n_ref


@dataclass(frozen=True)
class Speed:
    """Training speed against size, fitted on the trials: ``tokens/s = rate * (N / n_ref) ** (-power)``."""

    rate: float
    power: float
    n_ref: float

    def tokens_per_s(self, n: float) -> float:
        return self.rate * (max(n, 1.0) / self.n_ref) ** (-self.power)


def fit_speed(params: list[float], tokens_per_s: list[float]) -> Speed | None:
    """Least squares on logs, the exponent kept in [0, 1] (FLOP-bound models: 1; overhead-bound: 0)."""
    pts = [(math.log(n), math.log(s)) for n, s in zip(params, tokens_per_s, strict=True) if n > 0 and s > 0]
    if not pts:
        return None
    x = np.array([p[0] for p in pts])
    y = np.array([p[1] for p in pts])
    xm, ym = float(x.mean()), float(y.mean())
    var = float(np.sum((x - xm) ** 2))
    power = min(1.0, max(0.0, -float(np.sum((x - xm) * (y - ym)) / var))) if var > 0 else 0.0
    return Speed(rate=math.exp(ym), power=power, n_ref=math.exp(xm))


def optimal_size(surface: LossSurface, speed: Speed, seconds: float, low: float, high: float) -> tuple[float, float]:
    """(N, predicted loss): the size in ``[low, high]`` whose model, trained ``seconds`` at its speed, the
    surface predicts lowest: ``min_N E + A N^-alpha + B (seconds * speed(N))^-beta`` (a log grid, refined)."""
    grid = np.exp(np.linspace(math.log(max(low, 1.0)), math.log(max(high, low, 1.0)), 400))
    losses = [surface.loss(float(n), seconds * speed.tokens_per_s(float(n))) for n in grid]
    i = int(np.argmin(losses))
    return float(grid[i]), float(losses[i])


def shrink_starts(space: SearchSpace, base: dict[str, Any], vocab_size: int, cap: int) -> tuple[SearchSpace, list[str]]:
    """Start points made to fit ``cap`` parameters: depth first, then width, lowered to the largest values
    of the (narrowed) space that fit. Width and depth are capped one at a time (:func:`cap_space`), so a
    start point's combination of both (a deep narrow model) may still be too large, and the search would
    stop it before it trains."""
    dists = {d.path: d for d in space.dists if d.path in ("model.d_model", "model.n_layer")}
    new: list[dict[str, Any]] = []
    notes: list[str] = []
    for point in space.starts:
        q = dict(point)
        for path, d in dists.items():
            if path in q and d.nearest(q[path]) is not None:
                q[path] = d.nearest(q[path])

        def size(q: dict[str, Any] = q) -> int:
            return _point_params(base, q, vocab_size)

        nl, dm = dists.get("model.n_layer"), dists.get("model.d_model")
        while nl is not None and "model.n_layer" in q and q["model.n_layer"] > nl.low and size() > cap:
            q["model.n_layer"] = nl.nearest(q["model.n_layer"] - 1)
        widths = sorted(_values(dm)) if dm is not None else []
        while "model.d_model" in q and size() > cap and [w for w in widths if w < q["model.d_model"]]:
            q["model.d_model"] = max(w for w in widths if w < q["model.d_model"])
        if q != point:
            changed = {k: v for k, v in q.items() if point.get(k) != v and k in ("model.d_model", "model.n_layer")}
            if changed:
                notes.append(
                    f"start point {q.get('model.family', '?')}: "
                    + ", ".join(f"{k} {point.get(k)} -> {v}" for k, v in changed.items())
                    + f" (about {cap:,} parameters fit the budget)"
                )
        new.append(q)
    return replace(space, starts=new), notes


def _point_params(base: dict[str, Any], values: dict[str, Any], vocab_size: int) -> int:
    raw = apply_values(base, values)
    repair_config(raw)
    try:
        return count_params(build_config(raw), vocab_size)[0]
    except ConfigError:
        return 0
