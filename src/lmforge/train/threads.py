"""CPU threads: one policy, set once per process, and the layout ``--n-jobs auto`` measures.

Threads per process = cores this process may use / processes training at once (:func:`threads_per_process`).
Oversubscribing costs far more than it looks: two threads in each of several processes on 2 cores ran up
to 100x slower (OpenMP threads spin waiting for each other while the other process holds the core).

``--n-jobs auto`` (:func:`fastest_layout`) measures, at start-up, the tokens per second the machine gives
for every layout it allows (``p`` processes x ``cores / p`` threads, ``p`` a power of two up to the cores, and
the cores themselves) with the search's model shape: ``p`` probe processes train it at once for a moment and
report their rates, whose sum is the layout's throughput. The answer is cached per machine, shape and torch
version (``LMFORGE_CACHE_DIR/layouts.json``), so only the first search of a shape pays the probe.

    python -m lmforge.train.threads --probe SPEC_JSON   # one probe process (what fastest_layout starts)
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.atomic import atomic_write_text
from lmforge.train.compile import cache_dir

LAYOUT_FILE = "layouts.json"
_threads_set: int | None = None


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def threads_per_process(processes: int, cores: int | None = None) -> int:
    """``cores / processes``, at least 1: the threads each of ``processes`` concurrent trainers should use."""
    return max(1, (cores or available_cores()) // max(1, processes))


def set_threads(threads: int) -> int:
    """Set this process's torch intra-op threads (and OpenMP's, for libraries started later) once; a later
    call with another number is ignored, so one policy holds for the process's life. Returns the number
    in force."""
    global _threads_set
    if _threads_set is not None:
        return _threads_set
    threads = max(1, threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    try:  # only possible before any inter-op parallel work started
        torch.set_num_interop_threads(threads)
    except RuntimeError:
        pass
    _threads_set = threads
    return threads


def layouts(cores: int) -> list[tuple[int, int]]:
    """(processes, threads each) layouts for ``cores``: processes 1, 2, 4, ... and ``cores`` itself."""
    procs = {cores}
    p = 1
    while p < cores:
        procs.add(p)
        p *= 2
    return [(p, cores // p) for p in sorted(procs)]


@dataclass(frozen=True)
class ProbeSpec:
    """What a probe trains: a model config (as the run config's ``model`` section), its shape and how long."""

    model: dict[str, Any]
    vocab: int
    block: int
    batch: int
    seconds: float = 1.5


def _probe(spec: ProbeSpec, threads: int) -> float:
    """Tokens per second of AdamW training steps on random tokens, after two warm-up steps."""
    from lmforge.config import build_config
    from lmforge.models import build_model

    set_threads(threads)
    cfg = build_config({"model": spec.model, "data": {"block_size": spec.block}})
    model = build_model(cfg.model, vocab_size=spec.vocab, max_seq_len=cfg.max_seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, spec.vocab, (spec.batch, spec.block))
    y = torch.randint(0, spec.vocab, (spec.batch, spec.block))

    def step() -> None:
        _, loss = model(x, y)
        assert loss is not None
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    step()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < spec.seconds:
        step()
        n += 1
    return n * spec.batch * spec.block / (time.perf_counter() - t0)


def measure_layout(spec: ProbeSpec, processes: int, threads: int) -> float:
    """Summed tokens per second of ``processes`` probe processes with ``threads`` threads each, run at once."""
    payload = json.dumps({"spec": vars(spec), "threads": threads})
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    procs = [subprocess.Popen([sys.executable, "-m", "lmforge.train.threads", "--probe", payload],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
             for _ in range(processes)]
    total = 0.0
    for p in procs:
        out, _ = p.communicate()
        try:
            total += float(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):  # a probe that failed counts as nothing
            pass
    return total


def _layout_key(spec: ProbeSpec, cores: int) -> str:
    text = json.dumps([vars(spec), cores, torch.__version__], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def fastest_layout(spec: ProbeSpec, cores: int | None = None, *, cache: Path | None = None,
                   measure: Any = measure_layout) -> tuple[int, int, dict[str, float]]:
    """(processes, threads each, tokens/s by ``"PxT"`` layout): the layout with the highest summed rate,
    measured once per machine and shape (cached in ``cache``, default ``LMFORGE_CACHE_DIR/layouts.json``)."""
    cores = cores or available_cores()
    path = cache or cache_dir() / LAYOUT_FILE
    key = _layout_key(spec, cores)
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    rates = known.get(key)
    if not isinstance(rates, dict) or not rates:
        rates = {f"{p}x{t}": measure(spec, p, t) for p, t in layouts(cores)}
        known[key] = rates
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(known, indent=1) + "\n")
        except OSError:
            pass
    best = max(rates, key=lambda k: rates[k])
    p, t = (int(v) for v in best.split("x"))
    return p, t, rates


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "--probe":
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    payload = json.loads(args[1])
    print(_probe(ProbeSpec(**payload["spec"]), int(payload["threads"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
