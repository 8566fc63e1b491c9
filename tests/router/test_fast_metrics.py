"""router/fast_metrics.py: the exposition matches prometheus_client's Histogram and Counter for
the same updates (buckets, count, sum, totals), labelled and not; ``_created`` is the one series
left out."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from router.fast_metrics import FastCounter, FastHistogram

BUCKETS = (0.001, 0.01, 0.1, 1, 10)
VALUES = (0.0, 0.001, 0.0011, 0.05, 0.1, 3.0, 10.0, 11.0, 1e9)


def _lines(registry: CollectorRegistry) -> set[str]:
    return {
        line
        for line in generate_latest(registry).decode().splitlines()
        if line and "_created" not in line and not line.startswith("#")
    }


@pytest.mark.parametrize("labelled", [False, True])
def test_same_exposition_as_prometheus_client(labelled: bool) -> None:
    ref_reg, fast_reg = CollectorRegistry(), CollectorRegistry()
    names = ["replica"] if labelled else []
    ref = Histogram("h_seconds", "doc", names, buckets=BUCKETS, registry=ref_reg)
    fast = FastHistogram("h_seconds", "doc", names, buckets=BUCKETS, registry=fast_reg)
    for v in VALUES:
        if labelled:
            ref.labels("r1").observe(v)
            fast.labels("r1").observe(v)
        else:
            ref.observe(v)
            fast.observe(v)
    assert _lines(fast_reg) == _lines(ref_reg)


def test_label_misuse_is_an_error() -> None:
    h = FastHistogram("x_seconds", "doc", ["replica"], buckets=BUCKETS, registry=CollectorRegistry())
    with pytest.raises(ValueError):
        h.observe(1.0)
    with pytest.raises(ValueError):
        h.labels("a", "b")


def test_counter_same_exposition_as_prometheus_client() -> None:
    ref_reg, fast_reg = CollectorRegistry(), CollectorRegistry()
    ref = Counter("kvrouter_requests", "doc", ["replica", "status"], registry=ref_reg)
    fast = FastCounter("kvrouter_requests", "doc", ["replica", "status"], registry=fast_reg)
    for labels, n in ((("r1", "200"), 1), (("r1", "200"), 2.5), (("r2", "502"), 1), (("r2", "200"), 0)):
        ref.labels(*labels).inc(n)
        fast.labels(*labels).inc(n)
    assert _lines(fast_reg) == _lines(ref_reg)
    with pytest.raises(ValueError):
        fast.labels("r1", "200").inc(-1)
