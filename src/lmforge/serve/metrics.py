"""``GET /metrics``: the server's numbers in Prometheus' text format (prometheus-client, one registry per
app, so two apps in one process, as in the tests, never share counters).

Request numbers are recorded by the handler as requests finish; the live ones (running, waiting, batch,
cache) are read from the server when Prometheus scrapes. The scheduler's own counters are read with
``getattr``, so a batcher without them simply leaves those series out."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_SPEED_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)

_SCHEDULER_GAUGES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    (
        "lmforge_batch_rows",
        ("rows_running", "running_rows", "active_rows"),
        "Decoding rows in the running batch (the batch size, in rows).",
    ),
    ("lmforge_rows_waiting", ("rows_waiting",), "Decoding rows of the requests waiting to start."),
    ("lmforge_batch_slots_used", ("slots_used",), "Rows of the scheduler's batch in use (running or prefilling)."),
    ("lmforge_batch_slots_total", ("slots_total",), "Rows the scheduler's batch holds."),
    ("lmforge_cache_tokens", ("cache_tokens",), "Positions of the decoding cache in use (its length)."),
    (
        "lmforge_cache_usage_ratio",
        ("cache_usage", "kv_cache_usage"),
        "Fraction of the decoding cache in use (0 to 1).",
    ),
    ("lmforge_generate_calls", ("batches_run",), "Batched generate calls (or scheduler steps) so far."),
    ("lmforge_requests_generated", ("jobs_run",), "Requests those calls served."),
)
"""(metric, the attributes that may hold it, help): the first attribute the batcher, or its ``scheduler``,
has is reported; a series none has is left out."""


class _Live(Collector):
    """Gauges read at scrape time: running / waiting requests and the scheduler's own counters."""

    def __init__(self, running: Callable[[], int], scheduler: Callable[[], object | None]) -> None:
        self.running = running
        self.scheduler = scheduler

    def collect(self) -> Iterator[Metric]:
        sched = self.scheduler()
        running = GaugeMetricFamily("lmforge_requests_running", "Requests holding a slot (being served) now.")
        running.add_metric([], self.running())
        yield running
        waiting = GaugeMetricFamily("lmforge_requests_waiting", "Requests waiting for the generation worker.")
        waiting.add_metric([], _number(getattr(sched, "queued", 0)) or 0)
        yield waiting
        sources = [sched, getattr(sched, "scheduler", None)]
        for name, attributes, doc in _SCHEDULER_GAUGES:
            value = next(
                (v for src in sources for a in attributes if (v := _number(getattr(src, a, None))) is not None),
                None,
            )
            if value is not None:
                g = GaugeMetricFamily(name, doc)
                g.add_metric([], value)
                yield g


def _number(value: object) -> float | None:
    if callable(value):
        try:
            value = value()
        except Exception:  # a scheduler method that cannot answer now: no sample
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class ServerMetrics:
    """The metrics of one app; :meth:`render` is the ``/metrics`` body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ttft = Histogram(
            "lmforge_time_to_first_token_seconds",
            "From a request's arrival to its first generated token (streamed) or its whole reply.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "lmforge_request_latency_seconds",
            "End-to-end time of a completed generation request.",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.speed = Histogram(
            "lmforge_tokens_per_second",
            "Generated tokens of a request divided by its end-to-end time.",
            buckets=_SPEED_BUCKETS,
            registry=r,
        )
        self.batch = Histogram(
            "lmforge_request_rows",
            "Decoding rows a request occupies (prompts x max(n, num_beams)).",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "Prompt tokens of completed requests.", registry=r)
        self.generation_tokens = Counter(
            "lmforge_generation_tokens", "Generated tokens of completed requests.", registry=r
        )
        self.rejected = Counter(
            "lmforge_requests_rejected",
            "Requests answered with an error, by HTTP status (400 invalid, 429 busy, 503 loading, 504 timeout...).",
            ["status"],
            registry=r,
        )
        self._live: _Live | None = None

    def watch(self, running: Callable[[], int], scheduler: Callable[[], object | None]) -> None:
        """Report the live gauges from these callables (once; the server may be built after the app)."""
        if self._live is None:
            self._live = _Live(running, scheduler)
            self.registry.register(self._live)

    def finished(self, endpoint: str, latency: float, first_token: float | None, usage: dict[str, int]) -> None:
        self.latency.labels(endpoint=endpoint).observe(latency)
        if first_token is not None:
            self.ttft.observe(first_token)
        self.prompt_tokens.inc(usage.get("prompt_tokens", 0))
        generated = usage.get("completion_tokens", 0)
        self.generation_tokens.inc(generated)
        if latency > 0:
            self.speed.observe(generated / latency)

    def render(self) -> bytes:
        return generate_latest(self.registry)
