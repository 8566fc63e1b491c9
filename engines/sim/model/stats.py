"""The engine's own counters and histograms (vLLM's meaning and buckets), no Prometheus.

``EngineStats`` is what one ``EngineModel`` counts; ``MetricsSnapshot`` is its gauges and
counters at one instant. The replica exports them (``engines.sim.replica.metrics``); the offline
simulator reads them directly. (The router's view of an engine is ``router`` 's own
``EngineMetrics``: a different thing, scraped over HTTP.)
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

import msgspec

from .step_time import series_bucket_counts


class MetricsSnapshot(msgspec.Struct, frozen=True, gc=False):
    """Gauges and counters under vLLM's meaning (``vllm:`` metric names without the prefix)."""

    num_requests_running: int
    num_requests_waiting: int
    kv_cache_usage_perc: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    external_prefix_cache_queries: int
    external_prefix_cache_hits: int
    num_preemptions: int
    prompt_tokens: int
    prompt_tokens_cached: int
    generation_tokens: int
    request_success: int
    cpu_cache_usage_perc: float


TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                           60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip


@dataclass(slots=True)
class Histogram:
    """Prometheus-style histogram: ``counts[i]`` observations in (bounds[i-1], bounds[i]], the
    last slot is +Inf. Not cumulative; the exporter accumulates."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, v: float) -> None:
        self.counts[bisect_left(self.bounds, v)] += 1
        self.sum += v
        self.count += 1

    def observe_series(self, first: float, step: float, n: int) -> None:
        """Observe ``first + j*step`` for j in [0, n) in O(buckets)."""
        if n <= 0:
            return
        cum = series_bucket_counts(first, step, n, self.bounds)
        prev = 0
        for i, c in enumerate(cum):
            self.counts[i] += c - prev
            prev = c
        self.counts[-1] += n - prev
        self.sum += n * first + step * n * (n - 1) / 2
        self.count += n


@dataclass(slots=True)
class EngineStats:
    """What one engine counted since it started (vLLM's counters and histograms)."""

    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    external_prefix_cache_queries: int = 0
    external_prefix_cache_hits: int = 0
    num_preemptions: int = 0
    prompt_tokens: int = 0
    prompt_tokens_cached: int = 0
    generation_tokens: int = 0
    request_success: int = 0
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    itl: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS))
    queue_time: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS))
