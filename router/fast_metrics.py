"""Prometheus histograms and counters cheap enough to update on every request.

Why: prometheus_client's ``Histogram.observe`` checks observability, walks the bucket bounds in
Python and takes a lock twice (bucket, sum): ~4 us per call on the bench machine, and a proxied
request observed three histograms (decision time, upstream TTFB, duration), ~8% of the router's
CPU per request at c=32 (bench-proxy). Here an observation is one ``bisect`` and two additions;
the cumulative buckets are computed when Prometheus scrapes.

Its ``Counter.inc`` (checks, exemplar validation, a lock) was ~2 us, and a request made two to four
(requests by status, prompt tokens, predicted and reported cached tokens): ``FastCounter`` adds to
a float.

Same exposition as prometheus_client's (``_bucket{le=...}``, ``_count``, ``_sum``, ``_total``, the
same ``le`` formatting) except the ``_created`` series. Updated from the event loop thread; an
update racing with a scrape in another thread may land in the next scrape.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

INF = float("inf")


class HistogramChild:
    """One label set: per-bucket counts (not cumulative) and the sum."""

    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self._bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self._bounds, amount)] += 1
        self.sum += amount


class FastHistogram:
    """``observe`` (no labels) or ``labels(...).observe`` like prometheus_client's Histogram;
    registers itself as a collector of ``registry``."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        bounds = sorted(float(b) for b in buckets)
        if not bounds or bounds[-1] != INF:
            bounds.append(INF)
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._bounds = tuple(bounds)
        # the le strings prometheus_client writes (floatToGoString has no type hints)
        self._les: list[str] = [floatToGoString(b) for b in bounds]  # type: ignore[no-untyped-call]
        self._children: dict[tuple[str, ...], HistogramChild] = {}
        self._plain = None if self.labelnames else self.labels()
        registry.register(self)

    def labels(self, *values: str) -> HistogramChild:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = HistogramChild(self._bounds)
        return child

    def observe(self, amount: float) -> None:
        if self._plain is None:
            raise ValueError(f"{self.name} has labels {self.labelnames}: use labels(...).observe")
        self._plain.observe(amount)

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            counts = list(child.counts)  # one snapshot: the buckets and _count agree
            acc = 0
            cumulative = []
            for le, n in zip(self._les, counts, strict=True):
                acc += n
                cumulative.append((le, float(acc)))
            family.add_metric(list(values), cumulative, child.sum)
        yield family


class CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount


class FastCounter:
    """``labels(...).inc(n)`` like prometheus_client's Counter (``name`` without ``_total``)."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], *, registry: CollectorRegistry
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], CounterChild] = {}
        registry.register(self)

    def labels(self, *values: str) -> CounterChild:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = CounterChild()
        return child

    def describe(self) -> list[Metric]:
        return [CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            family.add_metric(list(values), child.value)
        yield family
