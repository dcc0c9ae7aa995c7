"""``train.compile``: when ``torch.compile`` pays, and where its artefacts live between runs.

**On-disk cache.** torch 2.13 keeps two local caches on by default: inductor's FX graph cache
(``torch._inductor.config.fx_graph_cache``: generated kernels keyed by the graph, the inductor config and the
torch version) and the AOTAutograd cache (``torch._functorch.config.enable_autograd_cache``: the joint
forward/backward graph). Both live under ``TORCHINDUCTOR_CACHE_DIR``, whose default is a temporary folder
(``/tmp/torchinductor_USER``) lost at reboot. :func:`enable_disk_cache` points it at
``LMFORGE_CACHE_DIR/inductor`` (default ``~/.cache/lmforge/inductor``) unless the user set it, so every trial
and run on the machine reuses what an earlier one compiled: a second compile of the same shape costs dynamo's
tracing only (measured: 31 s cold, 4.7 s warm for the 4x128 CPU model). ``torch.compiler.save_cache_artifacts``
/ ``load_cache_artifacts`` ("mega-cache") serialize the same caches to move them to *another* machine; one
machine does not need them.

**Two ways to compile** (:func:`compile_for_training`, :func:`compile_ways`):

- *whole*: ``torch.compile`` of the model (fuses everything, embeddings, head and loss included);
- *regional*, for a model with repeated blocks (a ``nn.ModuleList`` of blocks of one class): each block is
  compiled in place (``nn.Module.compile``): every block runs the same code object, and since dynamo treats a
  module's parameters as graph inputs (``inline_inbuilt_nn_modules``, always on in torch >= 2.5) the blocks
  of one shape share one compiled graph: one block's forward and backward are compiled whatever the depth.
  Embeddings, final norm, head and loss stay eager.

Measured (``benchmarks/train_throughput.py``, 4x128 CPU model, 1 thread; see RESULTS.md): regional compiles
cheaper (about half the seconds for a new shape) but its steps gain less over eager than a whole compile's.
Which pays more depends on the planned length, so ``train.compile: auto`` weighs both ways from their own
measurements (:func:`choose`); ``train.compile: true`` compiles whole. (Hierarchical whole compilation,
``torch.compiler.nested_compile_region`` on the transformer block, was tried: cheaper than a plain whole
compile, but in torch 2.13 its training steps left eager's losses after the first step, so it is not used.) Evaluation runs compiled modules eagerly (:func:`eager_calls`): an ``inference_mode`` call
would compile a second graph.

**The pays-off decision** (``train.compile: auto``) uses measured numbers only. A :class:`CompileLedger` (a
JSON file beside the cache) records, per :func:`compile_key` (model config, batch, block, dtype, device, torch
version, a hash of the model's source file and the way it is compiled), the median eager step time, the median compiled step time
and the seconds the first compiled step cost beyond a normal one (cold: nothing cached; warm: cached).
The loop runs eager, times :data:`PROBE_STEPS` steps, then asks :func:`decide`: compile when
``remaining steps x (eager - compiled step time) > compile seconds``. The compiled/eager ratio and the
compile cost come from this key's record, else from the median of the records of other shapes on the same
device kind compiled the same way; with no record at all the answer is eager (``train.compile: true`` once, or
``benchmarks/train_throughput.py``, writes the first records). A time limit turns into steps through the
measured eager step time, so the rule is the same: compiling must leave more steps within the time.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import statistics
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn

from lmforge.atomic import atomic_write_text

CACHE_ENV = "LMFORGE_CACHE_DIR"
"""Environment variable naming lmforge's cache folder (default ``~/.cache/lmforge``)."""
LEDGER_FILE = "compile-ledger.json"
MAX_RECORDS = 1000
"""The ledger keeps the newest this many keys (every trial shape adds one)."""
PROBE_STEPS = 5
"""Eager steps timed (after one warm-up step) before ``auto`` decides."""


def cache_dir() -> Path:
    """lmforge's cache folder: ``$LMFORGE_CACHE_DIR``, else ``$XDG_CACHE_HOME/lmforge``, else ``~/.cache/lmforge``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lmforge"


def enable_disk_cache() -> Path:
    """Keep inductor's compiled artefacts under :func:`cache_dir` across processes and reboots (unless
    ``TORCHINDUCTOR_CACHE_DIR`` is already set); the folder used. Call before the first compile."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


CompileHow = Literal["regional", "whole"]


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks regional compilation compiles: the modules of the model's ``nn.ModuleList``\\ s that hold
    two or more modules of one class (torch's own recurrent layers excluded: dynamo does not trace their
    fused kernels); empty when the model has none."""
    found: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2:
            kinds = {type(m) for m in module}
            if len(kinds) == 1 and not issubclass(next(iter(kinds)), nn.RNNBase):
                found.extend(module)
    return found


def compile_ways(model: nn.Module) -> list[CompileHow]:
    """The ways ``model`` can be compiled: ``whole``, and ``regional`` when it repeats blocks."""
    return ["whole", "regional"] if repeated_blocks(model) else ["whole"]


def compile_for_training(model: nn.Module, how: CompileHow) -> tuple[nn.Module, Callable[[], None]]:
    """Compile ``model`` -> (what to call for a training forward, a function that undoes the compile).

    ``regional`` compiles each of :func:`repeated_blocks` in place and returns ``model`` itself (so a
    DistributedDataParallel wrapper goes around it as around an eager model); the undo function restores
    the eager blocks, so the caller's model leaves training as it came. ``whole`` returns
    ``torch.compile(model)`` and leaves the model untouched."""
    if how == "whole":
        return cast(nn.Module, torch.compile(model)), lambda: None
    blocks = repeated_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no repeated blocks to compile regionally")
    for block in blocks:
        block.compile()

    def undo() -> None:
        for block in blocks:
            block._compiled_call_impl = None

    return model, undo


def eager_calls() -> AbstractContextManager[Any]:
    """Run compiled modules eagerly inside (evaluation of a regionally compiled model)."""
    return torch.compiler.set_stance("force_eager")


def compile_key(model: nn.Module, batch: int, block: int, dtype: str, device: torch.device,
                how: CompileHow | None = None) -> str:
    """What a compiled graph depends on: the model's config and source code, the batch shape, the precision,
    the device kind, the torch version and how it is compiled (``whole`` unless ``how`` says)."""
    cfg = getattr(model, "config", None)
    dump = getattr(cfg, "model_dump_json", None)
    cfg_text = dump() if callable(dump) else repr(cfg)
    module = inspect.getmodule(type(model))
    try:
        src = inspect.getsource(module) if module is not None else type(model).__qualname__
    except (OSError, TypeError):
        src = type(model).__qualname__
    parts = [cfg_text, f"{batch}x{block}", dtype, device.type, torch.__version__,
             hashlib.sha256(src.encode()).hexdigest(), how or "whole"]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


@dataclass
class Record:
    """Measurements of one key (seconds; None: not measured yet)."""

    device: str
    eager_step_s: float | None = None
    how: str | None = None
    """How the compiled numbers were compiled (``regional``/``whole``; None: a record from before regional
    compilation, i.e. whole)."""
    compiled_step_s: float | None = None
    compile_cold_s: float | None = None
    compile_warm_s: float | None = None

    @property
    def ratio(self) -> float | None:
        if self.eager_step_s and self.compiled_step_s:
            return self.compiled_step_s / self.eager_step_s
        return None


class CompileLedger:
    """The measurements of earlier runs on this machine (a JSON file; a torn or foreign file reads as empty).
    Concurrent writers may lose one another's update (last writer wins), never corrupt the file."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or cache_dir() / LEDGER_FILE

    def load(self) -> dict[str, Record]:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        out: dict[str, Record] = {}
        if isinstance(raw, dict):
            for key, rec in raw.items():
                if isinstance(rec, dict):
                    try:
                        out[key] = Record(**rec)
                    except TypeError:
                        continue
        return out

    def get(self, key: str) -> Record | None:
        return self.load().get(key)

    def update(self, key: str, device: str, how: CompileHow | None = None, **values: float | None) -> Record:
        """Merge ``values`` (the ones that are not None) into ``key``'s record and write the ledger."""
        records = self.load()
        rec = records.get(key) or Record(device=device)
        if how is not None:
            rec.how = how
        for name, value in values.items():
            if value is not None and math.isfinite(value):
                setattr(rec, name, float(value))
        records.pop(key, None)
        records[key] = rec  # newest last
        for old in list(records)[: max(0, len(records) - MAX_RECORDS)]:
            del records[old]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps({k: vars(r) for k, r in records.items()}, indent=1) + "\n")
        except OSError:  # a read-only cache folder costs the measurements, not the run
            pass
        return rec


@dataclass(frozen=True)
class Decision:
    compile: bool
    why: str
    how: CompileHow = "whole"
    net_s: float = 0.0
    """Seconds saved less seconds to compile."""


def decide(records: dict[str, Record], key: str, device: str, eager_step_s: float,
           remaining_steps: float | None, how: CompileHow | None = None) -> Decision:
    """Whether compiling now pays: ``remaining_steps x (eager - compiled step time) > compile seconds``,
    from this key's record or, failing that, the median of other shapes' records on ``device`` compiled
    the same way (``how``; None: any way)."""
    if remaining_steps is None or not math.isfinite(remaining_steps):
        return Decision(False, "no planned length (train.max_steps, max_tokens or max_time) to repay a compile")
    own = records.get(key)
    same_device = [r for r in records.values()
                   if r.device == device and (how is None or (r.how or "whole") == how)]
    ratio = own.ratio if own is not None and own.ratio is not None else _median(r.ratio for r in same_device)
    cost = None
    if own is not None:
        cost = own.compile_warm_s if own.compile_warm_s is not None else own.compile_cold_s
    if cost is None:
        cost = _median(r.compile_cold_s for r in same_device)
    if ratio is None or cost is None:
        return Decision(False, f"no compile measurement on {device} yet (run once with train.compile true)")
    saving = remaining_steps * eager_step_s * (1.0 - ratio)
    verdict = saving > cost
    return Decision(verdict, f"{how or 'whole'}: {remaining_steps:.0f} steps x {eager_step_s * 1e3:.1f} ms x "
                             f"(1 - {ratio:.2f}) = {saving:.1f} s saved {'>' if verdict else '<='} {cost:.1f} s to "
                             "compile", how or "whole", saving - cost)


def choose(records: dict[str, Record], keys: dict[CompileHow, str], device: str, eager_step_s: float,
           remaining_steps: float | None) -> Decision:
    """:func:`decide` for each way in ``keys`` (way -> its :func:`compile_key`); the way that saves the most
    net seconds among those that pay, else the first way's "no"."""
    verdicts = [decide(records, key, device, eager_step_s, remaining_steps, how=how) for how, key in keys.items()]
    paying = [v for v in verdicts if v.compile]
    return max(paying, key=lambda v: v.net_s) if paying else verdicts[0]


def _median(values: Any) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return statistics.median(vals) if vals else None


def remaining_steps(*, step: int, max_steps: int | None, max_tokens: int | None, tokens: int, tokens_per_step: int,
                    max_time: float | None, elapsed_s: float, eager_step_s: float) -> float | None:
    """Steps left by the tightest of the planned limits (None: no limit that says)."""
    left: list[float] = []
    if max_steps is not None:
        left.append(max_steps - step)
    if max_tokens is not None and tokens_per_step > 0:
        left.append(math.ceil((max_tokens - tokens) / tokens_per_step))
    if max_time is not None and eager_step_s > 0:
        left.append((max_time - elapsed_s) / eager_step_s)
    return max(0.0, min(left)) if left else None


class StepTimes:
    """Wall times of training steps, by mode; the median of the steady ones (the first of a mode is not)."""

    def __init__(self) -> None:
        self.eager: list[float] = []
        self.compiled: list[float] = []
        self.first_compiled: float | None = None

    def add(self, seconds: float, compiled: bool) -> None:
        if not compiled:
            self.eager.append(seconds)
        elif self.first_compiled is None:
            self.first_compiled = seconds
        else:
            self.compiled.append(seconds)

    def eager_median(self) -> float | None:
        """Median eager step time, leaving out the first step (allocations, lazy initialisation)."""
        return statistics.median(self.eager[1:]) if len(self.eager) > 1 else None

    def compiled_median(self) -> float | None:
        return statistics.median(self.compiled) if self.compiled else None

    def compile_cost(self) -> float | None:
        """What the first compiled step cost beyond a steady compiled one."""
        med = self.compiled_median()
        if self.first_compiled is None or med is None:
            return None
        return max(0.0, self.first_compiled - med)

