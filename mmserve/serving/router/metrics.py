"""Prometheus metrics: the router's own (requests, tokens, TTFT, ITL, in flight) plus the
backend's gauges (queue depths, free pages, ...), read from ``backend.metrics()`` at scrape time.

Each app has its own registry, so two apps in one process do not share counts.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "mmserve"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class BackendGauges(Collector):
    """Turns each key of ``backend.metrics()`` into a gauge ``mmserve_backend_<key>``."""

    def __init__(self, read: Callable[[], dict[str, float]]):
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for key, value in sorted(self._read().items()):
            name = re.sub(r"[^a-zA-Z0-9_]", "_", f"{PREFIX}_backend_{key}")
            yield GaugeMetricFamily(name, f"backend gauge {key!r}", value=float(value))


class RouterMetrics:
    def __init__(self, backend_metrics: Callable[[], dict[str, float]]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "requests by endpoint and outcome "
                                "(finished, rejected, overloaded, error, aborted, cut, timeout)", ["endpoint", "outcome"], registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "prompt tokens of requests prefilled (counted "
                                     "with their first token)", registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "tokens generated", registry=r)
        # Timed from the prepared request (body read, media fetched, prompt built; queueing
        # included), as vLLM times from its engine's arrival: a slow upload is not server time.
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "prepared request to first token (each "
                              "choice)", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds", "time between a request's tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(f"{PREFIX}_request_latency_seconds", "prepared request to last token of finished "
                             "requests (each choice)", buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge(f"{PREFIX}_requests_in_flight", "requests the backend is working on", registry=r)
        r.register(BackendGauges(backend_metrics))

    def watch_admission(self, admission) -> None:
        """Queue depth and capacity of the router's admission, read at scrape time."""
        Gauge(f"{PREFIX}_requests_queued", "requests waiting for capacity",
              registry=self.registry).set_function(lambda: admission.queued)
        Gauge(f"{PREFIX}_requests_capacity", "requests the backend can hold at once",
              registry=self.registry).set_function(admission.capacity)
        Gauge(f"{PREFIX}_kv_tokens_admitted", "KV tokens the running requests reserve in decode (prompt + max_tokens)",
              registry=self.registry).set_function(lambda: admission.kv_held)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
