"""Every Prometheus name the router exports, in one place.

Counters and histograms are updated on the request path (children cached per replica so a
request costs dictionary lookups, not label parsing). Gauges that mirror state the router keeps
anyway (in-flight, health, index size, engine load) are computed at scrape time by a collector:
zero cost per request, and never out of sync.

Each RouterMetrics owns a CollectorRegistry, so several routers (tests, workers) never collide.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .fast_metrics import CounterChild, FastCounter, FastHistogram, HistogramChild
from .index import PrefixIndex
from .replicas.registry import Replica
from .types import Tier

DECISION_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2)
TTFB_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # Updated on every request: the cheap counters and histograms (fast_metrics.py).
        self.requests = FastCounter(
            "kvrouter_requests",
            "Proxied requests by replica and final HTTP status",
            ["replica", "status"],
            registry=r,
        )
        self.client_errors = Counter(
            "kvrouter_client_errors",
            "Requests refused before routing, by HTTP status",
            ["status"],
            registry=r,
        )
        self.decision_seconds = FastHistogram(
            "kvrouter_routing_decision_seconds",
            "Time to select a replica (hashing excluded: index match + scoring + pick)",
            buckets=DECISION_BUCKETS,
            registry=r,
        )
        self.plugin_seconds = FastHistogram(
            "kvrouter_plugin_seconds",
            "Per-plugin latency (sampled)",
            ["plugin"],
            buckets=DECISION_BUCKETS,
            registry=r,
        )
        self.ttfb = FastHistogram(
            "kvrouter_upstream_ttfb_seconds",
            "Upstream time to first body byte per replica (TTFT for streams)",
            ["replica"],
            buckets=TTFB_BUCKETS,
            registry=r,
        )
        self.latency = FastHistogram(
            "kvrouter_request_duration_seconds",
            "End-to-end proxied request duration",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            "kvrouter_retries", "Requests retried on another replica, by reason", ["reason"], registry=r
        )
        self.ejections = Counter(
            "kvrouter_ejections",
            "Replicas ejected from routing after consecutive failures",
            ["replica"],
            registry=r,
        )
        self.ejections_capped = Counter(
            "kvrouter_ejections_capped",
            "Ejections for request failures not made: the pool was at health.max_ejected_fraction",
            ["replica"],
            registry=r,
        )
        self.stream_aborts = Counter(
            "kvrouter_stream_aborts", "Streams ended early, by side", ["side"], registry=r
        )
        self.admission_rejected = Counter(
            "kvrouter_admission_rejected",
            "Requests refused with 429 by admission control",
            ["scope"],
            registry=r,
        )
        self.predicted_cached = FastCounter(
            "kvrouter_predicted_cached_tokens",
            "Prompt tokens the router predicted the engine would reuse",
            ["replica"],
            registry=r,
        )
        self.actual_cached = FastCounter(
            "kvrouter_actual_cached_tokens",
            "Prompt tokens the engine reported reused (usage.cached_tokens, or prefix_cache_hits deltas)",
            ["replica", "source"],
            registry=r,
        )
        self.prompt_tokens = FastCounter(
            "kvrouter_prompt_tokens", "Prompt tokens routed per replica", ["replica"], registry=r
        )
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._requests: dict[tuple[str, int | str], CounterChild] = {}
        self._ttfb: dict[str, HistogramChild] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached: prometheus_client's labels() validates and joins
        on every call, which the request path cannot afford per request."""
        key = (id(metric), labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c

    def count_request(self, replica: str, status: int | str) -> None:
        # Once per request: its own cache, keyed as called (no str() or key tuple of child()).
        c = self._requests.get((replica, status))
        if c is None:
            c = self._requests[(replica, status)] = self.requests.labels(replica, str(status))
        c.inc()

    def observe_ttfb(self, replica: str, seconds: float) -> None:
        c = self._ttfb.get(replica)
        if c is None:
            c = self._ttfb[replica] = self.ttfb.labels(replica)
        c.observe(seconds)

    def plugin_timer(self, plugin: str, seconds: float) -> None:
        self.plugin_seconds.labels(plugin).observe(seconds)

    def add_state_collector(
        self,
        replicas: Callable[[], Iterable[Replica]],
        index: PrefixIndex,
        extra: Callable[[], Iterable[Any]] | None = None,
    ) -> None:
        self.registry.register(_StateCollector(replicas, index, extra))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    def __init__(
        self,
        replicas: Callable[[], Iterable[Replica]],
        index: PrefixIndex,
        extra: Callable[[], Iterable[Any]] | None,
    ) -> None:
        self._replicas = replicas
        self._index = index
        self._extra = extra

    def collect(self) -> Iterator[Any]:
        in_flight = GaugeMetricFamily(
            "kvrouter_in_flight", "Requests in flight per replica", labels=["replica"]
        )
        pending = GaugeMetricFamily(
            "kvrouter_pending_prefill_tokens",
            "Uncached prompt tokens dispatched, first token not seen",
            labels=["replica"],
        )
        healthy = GaugeMetricFamily(
            "kvrouter_replica_healthy", "1 if the replica receives traffic", labels=["replica"]
        )
        blocks = GaugeMetricFamily(
            "kvrouter_index_blocks", "Indexed blocks per replica and tier", labels=["replica", "tier"]
        )
        uncertain = GaugeMetricFamily(
            "kvrouter_index_uncertain",
            "1 while a replica's index missed KV events and is not rebuilt",
            labels=["replica"],
        )
        running = GaugeMetricFamily(
            "kvrouter_engine_running", "Engine-reported running requests", labels=["replica"]
        )
        waiting = GaugeMetricFamily(
            "kvrouter_engine_waiting", "Engine-reported waiting requests", labels=["replica"]
        )
        kv = GaugeMetricFamily(
            "kvrouter_engine_kv_usage", "Engine-reported KV cache usage (0-1)", labels=["replica"]
        )
        tail = GaugeMetricFamily(
            "kvrouter_replica_ttft_p90_seconds", "Recent p90 TTFT seen by the router", labels=["replica"]
        )
        for rep in self._replicas():
            rid = rep.id
            in_flight.add_metric([rid], rep.in_flight)
            pending.add_metric([rid], rep.pending_prefill_tokens)
            healthy.add_metric([rid], 1.0 if rep.routable else 0.0)
            blocks.add_metric([rid, "gpu"], self._index.replica_blocks(rid, Tier.GPU))
            blocks.add_metric([rid, "cpu"], self._index.replica_blocks(rid, Tier.CPU))
            uncertain.add_metric([rid], 1.0 if self._index.is_uncertain(rid) else 0.0)
            if rep.engine_running is not None:
                running.add_metric([rid], rep.engine_running)
            if rep.engine_waiting is not None:
                waiting.add_metric([rid], rep.engine_waiting)
            if rep.kv_usage is not None:
                kv.add_metric([rid], rep.kv_usage)
            tail.add_metric([rid], rep.tail_ttft())
        yield from (in_flight, pending, healthy, blocks, uncertain, running, waiting, kv, tail)
        expired = CounterMetricFamily(
            "kvrouter_index_unconfirmed_expired_blocks",
            "Speculative blocks that expired without a KV event confirming them",
            labels=["replica"],
        )
        for rid, n in self._index.expired_by_replica.items():
            expired.add_metric([rid], n)
        yield expired
        if self._extra is not None:
            yield from self._extra()
