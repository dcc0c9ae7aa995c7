"""The thread policy: cores / processes, set once; --n-jobs auto's layouts, measured and cached."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from lmforge.train.threads import ProbeSpec, fastest_layout, layouts, measure_layout, threads_per_process

SPEC = ProbeSpec(model={"family": "transformer", "n_layer": 1, "d_model": 16, "n_head": 2}, vocab=30, block=16,
                 batch=2, seconds=0.3)


def test_threads_per_process_divides_the_cores() -> None:
    assert threads_per_process(1, cores=8) == 8
    assert threads_per_process(2, cores=8) == 4
    assert threads_per_process(3, cores=8) == 2
    assert threads_per_process(16, cores=8) == 1


def test_layouts_cover_powers_of_two_and_the_cores() -> None:
    assert layouts(1) == [(1, 1)]
    assert layouts(2) == [(1, 2), (2, 1)]
    assert layouts(6) == [(1, 6), (2, 3), (4, 1), (6, 1)]


def test_fastest_layout_picks_the_highest_rate_and_measures_once(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []

    def fake(spec: ProbeSpec, p: int, t: int) -> float:
        calls.append((p, t))
        return {1: 100.0, 2: 150.0, 4: 120.0}[p]

    cache = tmp_path / "layouts.json"
    assert fastest_layout(SPEC, 4, cache=cache, measure=fake)[:2] == (2, 2)
    assert calls == [(1, 4), (2, 2), (4, 1)]
    assert fastest_layout(SPEC, 4, cache=cache, measure=fake)[:2] == (2, 2)
    assert len(calls) == 3  # the second search of the shape reads the cache
    assert len(json.loads(cache.read_text())) == 1
    fastest_layout(SPEC, 2, cache=cache, measure=fake)  # another core count is another measurement
    assert len(calls) == 5


def test_set_threads_holds_for_the_process() -> None:
    code = ("import torch; from lmforge.train.threads import set_threads; "
            "a = set_threads(1); b = set_threads(2); print(a, b, torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["1", "1", "1"]


def test_a_real_probe_reports_a_rate() -> None:
    assert measure_layout(SPEC, 1, 1) > 0
