"""``/metrics``' live gauges: read from the batcher or its scheduler when they have the counters, left
out when they do not; a registry per app."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from lmforge.serve.metrics import ServerMetrics  # noqa: E402


def samples(metrics: ServerMetrics) -> dict[str, float]:
    text = metrics.render().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def test_scheduler_gauges_are_read_defensively():
    scheduler = SimpleNamespace(rows_running=5, rows_waiting=2, cache_tokens=40, slots_total=32, slots_used=6)
    batcher = SimpleNamespace(queued=3, batches_run=7, jobs_run=9, scheduler=scheduler)
    m = ServerMetrics()
    m.watch(lambda: 4, lambda: batcher)
    got = samples(m)
    assert got["lmforge_requests_running"] == 4 and got["lmforge_requests_waiting"] == 3
    assert got["lmforge_batch_rows"] == 5 and got["lmforge_rows_waiting"] == 2
    assert got["lmforge_cache_tokens"] == 40 and got["lmforge_batch_slots_total"] == 32
    assert got["lmforge_generate_calls"] == 7 and got["lmforge_requests_generated"] == 9
    # a batcher without those counters (or no server yet): the series are simply absent
    bare = ServerMetrics()
    bare.watch(lambda: 0, lambda: None)
    got = samples(bare)
    assert got["lmforge_requests_running"] == 0 and got["lmforge_requests_waiting"] == 0
    assert "lmforge_batch_rows" not in got and "lmforge_cache_tokens" not in got


def test_each_app_has_its_own_registry():
    a, b = ServerMetrics(), ServerMetrics()
    a.finished("chat", 0.5, 0.1, {"prompt_tokens": 3, "completion_tokens": 10})
    assert samples(a)["lmforge_generation_tokens_total"] == 10
    assert samples(b)["lmforge_generation_tokens_total"] == 0
    assert samples(a)["lmforge_time_to_first_token_seconds_count"] == 1
