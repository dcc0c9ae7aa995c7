"""Search spaces over dotted config paths: parse the YAML format, suggest a trial's values, enumerate a grid.

The format (documented with examples in ``default_space.yaml``)::

    params:                                   # sampled in every trial
      optim.lr: {float: [1.0e-4, 3.0e-2], log: true}
      model.family: [transformer, lstm]       # a list: one of these values
      model.n_layer: {int: [1, 6]}
    conditional:                              # sampled only where every `when` entry holds
      - when: {model.family: transformer}     # a value, or a list of accepted values
        params:
          model.n_head: [2, 4]
    fixed:                                    # the same in every trial (not searched)
      train.batch_size: 16
    start:                                    # configurations tried first (Optuna's enqueue_trial)
      - {model.family: lstm, optim.lr: 3.0e-3}  # values outside the space are clipped into it; the
                                                 # sampler chooses the paths a start point leaves out

A mapping without ``params``/``conditional``/``fixed`` is read as ``params``. A scalar instead of a
distribution fixes that path (also inside a conditional block). ``when`` may name any path sampled or fixed
before it (``params`` and ``fixed`` first, then the conditional blocks in order), so blocks can nest.
Range distributions take ``grid: [...]`` for ``--sampler grid``; lists and short int ranges need none.

A value is named in Optuna by its path; a path that appears in several blocks with different
distributions gets its block's condition appended (``model.n_layer|model.family=lstm``), because Optuna
refuses one name with two kinds of distribution.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from optuna.distributions import (
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    check_distribution_compatibility,
)

from lmforge.config import (
    SECTIONS,
    ConfigError,
    DataConfig,
    OptimConfig,
    RCNNConfig,
    RecurrentConfig,
    ScheduleConfig,
    TokenizerConfig,
    TrainConfig,
    TransformerConfig,
    set_dotted,
)

DEFAULT_SPACE_FILE = Path(__file__).with_name("default_space.yaml")
_GRID_INT_MAX = 64
"""An int range with at most this many values is enumerated by ``--sampler grid`` without ``grid:``."""

_FIELDS: dict[str, set[str]] = {
    "data": set(DataConfig.model_fields),
    "tokenizer": set(TokenizerConfig.model_fields),
    "model": set(TransformerConfig.model_fields)
    | set(RecurrentConfig.model_fields)
    | set(RCNNConfig.model_fields)
    | {"path"},
    "optim": set(OptimConfig.model_fields),
    "schedule": set(ScheduleConfig.model_fields),
    "train": set(TrainConfig.model_fields),
}


_FAMILY_FIELDS: dict[str, set[str]] = {
    "transformer": set(TransformerConfig.model_fields),
    "lstm": set(RecurrentConfig.model_fields),
    "gru": set(RecurrentConfig.model_fields),
    "rcnn": set(RCNNConfig.model_fields),
}


class SpaceError(ConfigError):
    """A search space that cannot be used; the message names the file, the path and the value."""


# ------------------------------------------------------------------------------------ structure
@dataclass(frozen=True)
class Dist:
    """One searched value: ``kind`` is ``categorical``, ``float`` or ``int``."""

    path: str
    kind: str
    choices: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None
    grid: tuple[Any, ...] | None = None
    name: str = ""
    """The Optuna parameter name (the path, or path|condition when the path is reused)."""

    def grid_values(self) -> list[Any]:
        if self.grid is not None:
            return list(self.grid)
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "int":
            step = int(self.step or 1)
            values = list(range(int(self.low), int(self.high) + 1, step))
            if len(values) <= _GRID_INT_MAX:
                return values
        raise SpaceError(
            f"search space: {self.path} is a {self.kind} range; --sampler grid needs listed values "
            f"(write a list, or add grid: [...] to the range)"
        )

    def optuna(self) -> Any:
        """The matching ``optuna.distributions`` object."""
        if self.kind == "categorical":
            return CategoricalDistribution(list(self.choices))
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def nearest(self, v: Any) -> Any:
        """``v`` moved into this distribution (the closest allowed value; None if there is none)."""
        if self.kind == "categorical":
            if v in self.choices:
                return v
            nums = [c for c in self.choices if _number(c)]
            if not _number(v) or not nums:
                return None
            return min(nums, key=lambda c: (abs(c - v), c))
        if not _number(v):
            return None
        x = min(max(float(v), self.low), self.high)
        if self.step:
            x = self.low + round((x - self.low) / self.step) * self.step
            x = min(x, self.high)
        return int(round(x)) if self.kind == "int" else x

    def describe(self) -> str:
        if self.kind == "categorical":
            return "[" + ", ".join(str(c) for c in self.choices) + "]"
        return f"{self.kind} [{self.low:g}, {self.high:g}]" + (" log" if self.log else "")


@dataclass
class Block:
    """Values sampled (``dists``) and set (``fixed``) when every condition holds (no conditions: always)."""

    when: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    dists: list[Dist] = field(default_factory=list)
    fixed: dict[str, Any] = field(default_factory=dict)

    def applies(self, values: dict[str, Any]) -> bool:
        return all(path in values and values[path] in accepted for path, accepted in self.when.items())

    def label(self) -> str:
        return ",".join(f"{p}={'/'.join(str(v) for v in vs)}" for p, vs in self.when.items())


@dataclass
class SearchSpace:
    """A parsed space: the unconditional block first, then the conditional ones in file order."""

    blocks: list[Block]
    source: str = "<space>"
    starts: list[dict[str, Any]] = field(default_factory=list)
    """Start points (``start:`` in the YAML): partial configurations the search tries first."""

    # -------------------------------------------------------------------------------- queries
    @property
    def dists(self) -> list[Dist]:
        return [d for b in self.blocks for d in b.dists]

    def paths(self) -> set[str]:
        return {d.path for d in self.dists} | {p for b in self.blocks for p in b.fixed}

    @property
    def conditional(self) -> bool:
        return any(b.when for b in self.blocks)

    def describe(self) -> str:
        lines = []
        for b in self.blocks:
            indent = "  " if b.when else ""
            if b.when:
                lines.append(f"when {b.label()}:")
            lines += [f"{indent}{d.path}: {d.describe()}" for d in b.dists]
            lines += [f"{indent}{p} = {v!r}" for p, v in b.fixed.items()]
        return "\n".join(lines)

    # ------------------------------------------------------------------------------- sampling
    def suggest(self, trial: Any) -> dict[str, Any]:
        """Ask ``trial`` (an ``optuna.Trial`` or anything with its ``suggest_*`` methods) for every value
        that applies; return ``{path: value}`` including the fixed ones."""

        def ask(d: Dist) -> Any:
            if d.kind == "categorical":
                return trial.suggest_categorical(d.name, list(d.choices))
            if d.kind == "int":
                return trial.suggest_int(d.name, int(d.low), int(d.high), step=int(d.step or 1), log=d.log)
            return trial.suggest_float(d.name, d.low, d.high, step=d.step, log=d.log)

        return self._walk(ask)

    def values_from_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """``{path: value}`` of a finished trial's Optuna ``params`` (the inverse of the naming)."""
        return self._walk(lambda d: params[d.name])

    def _walk(self, ask: Any) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for b in self.blocks:
            if not b.applies(values):
                continue
            for path, v in b.fixed.items():
                values[path] = v
            for d in b.dists:
                if d.path in values and b.when:
                    raise SpaceError(
                        f"{self.source}: {d.path} is set by two blocks whose conditions both hold "
                        f"({b.label()}); make the conditions exclusive"
                    )
                values[d.path] = ask(d)
        return values

    def start_params(self) -> list[dict[str, Any]]:
        """The start points as (partial) Optuna ``params``: each value moved into its distribution (so a
        space narrowed to the budget narrows them too), paths the space does not search left out, and
        duplicates dropped. Conditional values count only where their block applies."""
        out: list[dict[str, Any]] = []
        for point in self.starts:
            values: dict[str, Any] = {}
            params: dict[str, Any] = {}
            for b in self.blocks:
                if not b.applies(values):
                    continue
                values.update(b.fixed)
                for d in b.dists:
                    v = d.nearest(point[d.path]) if d.path in point else None
                    if v is not None:
                        values[d.path] = params[d.name] = v
            if params and params not in out:
                out.append(params)
        return out

    def grid(self) -> list[dict[str, Any]]:
        """Every combination as Optuna ``params`` (conditional values only where their block applies)."""
        points: list[tuple[dict[str, Any], dict[str, Any]]] = [({}, {})]  # (optuna params, path values)
        for b in self.blocks:
            new: list[tuple[dict[str, Any], dict[str, Any]]] = []
            for params, values in points:
                if not b.applies(values):
                    new.append((params, values))
                    continue
                base_values = {**values, **b.fixed}
                options = [d.grid_values() for d in b.dists]
                for combo in itertools.product(*options):
                    p = dict(params)
                    v = dict(base_values)
                    for d, x in zip(b.dists, combo, strict=True):
                        p[d.name] = x
                        v[d.path] = x
                    new.append((p, v))
            points = new
        return [p for p, _ in points]

    def restrict(self, fixed_paths: set[str]) -> SearchSpace:
        """A copy without the values whose paths the user fixed (e.g. by command-line overrides)."""
        blocks = [
            Block(
                when=b.when,
                dists=[d for d in b.dists if d.path not in fixed_paths],
                fixed={p: v for p, v in b.fixed.items() if p not in fixed_paths},
            )
            for b in self.blocks
        ]
        starts = [{p: v for p, v in point.items() if p not in fixed_paths} for point in self.starts]
        return SearchSpace(blocks=blocks, source=self.source, starts=[p for p in starts if p])

    def to_spec(self) -> dict[str, Any]:
        """The YAML-format dict of this space (stored with the study, so workers rebuild it)."""

        def dist_spec(d: Dist) -> Any:
            if d.kind == "categorical":
                return list(d.choices) if d.grid is None else {"categorical": list(d.choices), "grid": list(d.grid)}
            out: dict[str, Any] = {d.kind: [d.low, d.high]}
            if d.log:
                out["log"] = True
            if d.step is not None:
                out["step"] = d.step
            if d.grid is not None:
                out["grid"] = list(d.grid)
            return out

        spec: dict[str, Any] = {"params": {}, "conditional": [], "fixed": {}}
        for b in self.blocks:
            params = {d.path: dist_spec(d) for d in b.dists}
            if not b.when:
                spec["params"].update(params)
                spec["fixed"].update(b.fixed)
            else:
                when = {p: (list(vs) if len(vs) > 1 else vs[0]) for p, vs in b.when.items()}
                spec["conditional"].append({"when": when, "params": {**params, **b.fixed}})
        if self.starts:
            spec["start"] = [dict(p) for p in self.starts]
        return spec


# -------------------------------------------------------------------------------------- parsing
def load_space(path: str | Path | None = None) -> SearchSpace:
    """Read a space file (default: the shipped ``default_space.yaml``)."""
    p = Path(path) if path is not None else DEFAULT_SPACE_FILE
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpaceError(f"search space file not found: {p}") from None
    except yaml.YAMLError as err:
        raise SpaceError(f"search space file {p} is not valid YAML: {err}") from None
    return parse_space(raw, source=str(p))


def parse_space(raw: Any, source: str = "<space>") -> SearchSpace:
    """Validate the YAML-format dict ``raw`` into a :class:`SearchSpace`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpaceError(f"{source}: a search space is a mapping, got {type(raw).__name__}")
    sections = {"params", "conditional", "fixed", "start"}
    if not sections & set(raw):
        raw = {"params": raw}
    unknown = set(raw) - sections
    if unknown:
        raise SpaceError(
            f"{source}: unknown section(s) {sorted(unknown)}; known: params, conditional, fixed, start"
        )
    top = Block()
    _fill_block(top, raw.get("params") or {}, source, "params")
    for path, v in _mapping(raw.get("fixed") or {}, source, "fixed").items():
        _check_path(path, source)
        top.fixed[path] = v
    blocks = [top]
    conds = raw.get("conditional") or []
    if not isinstance(conds, list):
        raise SpaceError(f"{source}: 'conditional' must be a list of {{when: ..., params: ...}} entries")
    for i, entry in enumerate(conds):
        where = f"conditional[{i}]"
        if not isinstance(entry, dict) or set(entry) - {"when", "params"} or "when" not in entry:
            raise SpaceError(f"{source}: {where} must be a mapping with 'when' and 'params'")
        b = Block()
        for path, accepted in _mapping(entry["when"], source, f"{where}.when").items():
            _check_path(path, source)
            b.when[path] = tuple(accepted) if isinstance(accepted, list) else (accepted,)
        _fill_block(b, entry.get("params") or {}, source, f"{where}.params")
        blocks.append(b)
    starts = raw.get("start") or []
    if not isinstance(starts, list):
        raise SpaceError(f"{source}: 'start' must be a list of {{path: value}} mappings")
    for i, point in enumerate(starts):
        for path, v in _mapping(point, source, f"start[{i}]").items():
            _check_path(path, source)
            if not _scalar(v):
                raise SpaceError(f"{source}: start[{i}].{path} = {v!r}: a start point gives plain values")
    space = SearchSpace(blocks=blocks, source=source, starts=[dict(p) for p in starts])
    _check_conditions(space)
    _name_params(space)
    return space


def _mapping(v: Any, source: str, where: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise SpaceError(f"{source}: {where} must be a mapping of dotted config paths, got {v!r}")
    return v


def _check_path(path: str, source: str) -> None:
    parts = str(path).split(".")
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise SpaceError(f"{source}: {path!r} is not a config path (section.field, sections {list(SECTIONS)})")
    if parts[1] not in _FIELDS[parts[0]]:
        raise SpaceError(f"{source}: {path!r}: unknown field of section '{parts[0]}'")


def _fill_block(block: Block, params: Any, source: str, where: str) -> None:
    for path, spec in _mapping(params, source, where).items():
        _check_path(path, source)
        d = _parse_dist(path, spec, source)
        if d is None:
            block.fixed[path] = spec
        else:
            block.dists.append(d)


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def _parse_dist(path: str, spec: Any, source: str) -> Dist | None:
    where = f"{source}: {path}"
    if isinstance(spec, list):
        spec = {"categorical": spec}
    if not isinstance(spec, dict):
        if not _scalar(spec):
            raise SpaceError(f"{where}: cannot use {spec!r}")
        return None
    kinds = [k for k in ("categorical", "float", "int") if k in spec]
    if len(kinds) != 1:
        raise SpaceError(
            f"{where}: give exactly one of categorical: [...], float: [lo, hi], int: [lo, hi]; got {spec!r}"
        )
    kind = kinds[0]
    extra = set(spec) - {kind, "log", "step", "grid"}
    if extra:
        raise SpaceError(f"{where}: unknown option(s) {sorted(extra)} (known: log, step, grid)")
    grid = spec.get("grid")
    if grid is not None and (not isinstance(grid, list) or not grid):
        raise SpaceError(f"{where}: grid must be a non-empty list, got {grid!r}")
    if kind == "categorical":
        choices = spec["categorical"]
        if not isinstance(choices, list) or not choices or not all(_scalar(c) for c in choices):
            raise SpaceError(f"{where}: a choice list must be a non-empty list of plain values, got {choices!r}")
        if len(set(map(repr, choices))) != len(choices):
            raise SpaceError(f"{where}: repeated choices in {choices!r}")
        if grid is not None and any(g not in choices for g in grid):
            raise SpaceError(f"{where}: grid values {grid!r} must be among the choices {choices!r}")
        return Dist(path=path, kind="categorical", choices=tuple(choices), grid=tuple(grid) if grid else None)
    bounds = spec[kind]
    if not isinstance(bounds, list) or len(bounds) != 2 or not all(_number(b) for b in bounds):
        raise SpaceError(f"{where}: {kind} needs [low, high], got {bounds!r}")
    low, high = float(bounds[0]), float(bounds[1])
    if kind == "int" and not all(float(b).is_integer() for b in bounds):
        raise SpaceError(f"{where}: int bounds must be integers, got {bounds!r}")
    if not low <= high:
        raise SpaceError(f"{where}: low {bounds[0]} is above high {bounds[1]}")
    log = bool(spec.get("log", False))
    if log and low <= 0:
        raise SpaceError(f"{where}: a log range needs low > 0, got {bounds[0]}")
    step = spec.get("step")
    if step is not None and (not _number(step) or step <= 0):
        raise SpaceError(f"{where}: step must be a positive number, got {step!r}")
    if step is not None and log:
        raise SpaceError(f"{where}: step and log cannot be combined")
    if grid is not None:
        if not all(_number(g) and low <= g <= high for g in grid):
            raise SpaceError(f"{where}: grid values {grid!r} must be numbers within [{bounds[0]}, {bounds[1]}]")
        if kind == "int" and not all(float(g).is_integer() for g in grid):
            raise SpaceError(f"{where}: grid values of an int range must be integers, got {grid!r}")
        grid = [int(g) for g in grid] if kind == "int" else [float(g) for g in grid]
    return Dist(
        path=path,
        kind=kind,
        low=low,
        high=high,
        log=log,
        step=None if step is None else float(step),
        grid=tuple(grid) if grid else None,
    )


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_conditions(space: SearchSpace) -> None:
    known: set[str] = set()
    top = space.blocks[0]
    for b in space.blocks:
        for path in b.when:
            if path not in known:
                raise SpaceError(
                    f"{space.source}: condition on {path!r}, which is not sampled or fixed before this block"
                )
        if b is not top:
            clash = {d.path for d in b.dists} & ({d.path for d in top.dists} | set(top.fixed))
            if clash:
                raise SpaceError(
                    f"{space.source}: {sorted(clash)} appear both unconditionally and in a conditional block "
                    f"({b.label()}); keep each path in one place, or in conditional blocks only"
                )
        known |= {d.path for d in b.dists} | set(b.fixed)


def _name_params(space: SearchSpace) -> None:
    first: dict[str, Dist] = {}
    for b in space.blocks:
        named = []
        for d in b.dists:
            name = d.path
            prev = first.get(d.path)
            if prev is not None:
                try:
                    check_distribution_compatibility(prev.optuna(), d.optuna())
                except ValueError:
                    name = f"{d.path}|{b.label()}"
            else:
                first[d.path] = d
            named.append(replace(d, name=name))
        b.dists = named


# ------------------------------------------------------------------------------ into a config
def apply_values(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """The nested raw config ``base`` with ``{path: value}`` set. ``model.family`` goes first: a new family
    drops the base's model options it does not have (a transformer's ``n_head`` for a GRU) and keeps the
    others (``d_model``, ``n_layer``, ``dropout``...)."""
    raw = copy.deepcopy(base)
    if "model.family" in values:
        before = dict(raw.get("model") or {})
        set_dotted(raw, "model.family", values["model.family"])
        # the base's model options that the new family also has (e.g. a fixed d_model) stay
        fields = _FAMILY_FIELDS.get(str(values["model.family"]), set())
        for k, v in before.items():
            if k in fields and k != "family":
                raw["model"][k] = v
    for path, v in values.items():
        if path != "model.family":
            set_dotted(raw, path, v)
    return raw


def repair_config(raw: dict[str, Any]) -> list[str]:
    """Make sampled values consistent where the space cannot express the rule (in place); return what was
    changed. A transformer's ``n_head`` must divide ``d_model`` (with an even head size for rotary
    positions) and ``n_kv_head`` must divide ``n_head``: the nearest smaller valid count is taken."""
    notes: list[str] = []
    m = raw.get("model") or {}
    if m.get("family", "transformer") != "transformer":
        return notes
    d = int(m.get("d_model", TransformerConfig.model_fields["d_model"].default))
    h = int(m.get("n_head", TransformerConfig.model_fields["n_head"].default))
    rope = m.get("position") == "rope"

    def ok(n: int) -> bool:
        return d % n == 0 and (not rope or (d // n) % 2 == 0)

    if not ok(h):
        new = next((n for n in range(min(h, d), 0, -1) if ok(n)), 1)
        notes.append(f"model.n_head {h} -> {new} (d_model {d})")
        m["n_head"] = h = new
    kv = m.get("n_kv_head")
    if kv is not None and h % int(kv):
        new = next(n for n in range(min(int(kv), h), 0, -1) if h % n == 0)
        notes.append(f"model.n_kv_head {kv} -> {new} (n_head {h})")
        m["n_kv_head"] = new
    return notes
