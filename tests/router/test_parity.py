"""Parity: predicted vs actual cached tokens, and the warning for the silent zero-overlap failure."""

from __future__ import annotations

import logging

import pytest

from router.index import PrefixIndex
from router.metrics import RouterMetrics
from router.parity import ALARM_RATIO, MIN_PREDICTED, WINDOW_S, ParityTracker
from router.replicas.engine_metrics import EngineMetrics
from router.replicas.registry import ReplicaRegistry
from router.routing import Ticket
from router.types import ReplicaSpec


class Clock:
    t = 0.0

    def __call__(self) -> float:
        return self.t


def setup() -> tuple[ParityTracker, Clock, Ticket]:
    clock = Clock()
    metrics = RouterMetrics()
    tracker = ParityTracker(metrics, clock)
    rep = ReplicaRegistry(PrefixIndex(10)).add(ReplicaSpec(url="http://r0", name="r0"))
    return (
        tracker,
        clock,
        Ticket(rep, prompt_tokens=2000, predicted_cached_tokens=1600, pending_tokens=400, dispatched_at=0),
    )


def test_warns_when_predictions_never_materialise(caplog: pytest.LogCaptureFixture) -> None:
    tracker, clock, ticket = setup()
    for _ in range(MIN_PREDICTED // 1600 + 1):
        tracker.on_finish(ticket, True, 0)  # the engine reports 0 cached tokens every time
    clock.t += WINDOW_S + 1
    with caplog.at_level(logging.WARNING, logger="kvrouter.parity"):
        tracker.on_finish(ticket, True, 0)  # rolls the window and judges it
    assert tracker.ratio("r0") == 0.0
    assert any("Prefix keys probably do not match" in r.message for r in caplog.records)
    text = tracker.metrics.render().decode()
    assert 'kvrouter_predicted_cached_tokens_total{replica="r0"}' in text


def test_no_warning_when_engine_reuses_what_was_predicted(caplog: pytest.LogCaptureFixture) -> None:
    tracker, clock, ticket = setup()
    for _ in range(4):
        tracker.on_finish(ticket, True, 1600)
    clock.t += WINDOW_S + 1
    with caplog.at_level(logging.WARNING, logger="kvrouter.parity"):
        tracker.on_finish(ticket, True, 1600)
    assert tracker.ratio("r0") == pytest.approx(1.0)
    assert tracker.ratio("r0") > ALARM_RATIO
    assert not caplog.records


def test_engine_metric_deltas_are_the_fallback() -> None:
    tracker, _, ticket = setup()
    rep = ticket.replica
    tracker.on_engine_metrics(rep, EngineMetrics(prefix_hits=1000.0))
    tracker.on_finish(ticket, True, None)  # no usage.cached_tokens from this engine
    tracker.on_finish(ticket, True, None)
    tracker.on_finish(ticket, True, None)
    tracker.on_engine_metrics(rep, EngineMetrics(prefix_hits=5800.0))
    assert tracker.ratio("r0") == pytest.approx(4800 / 4800)
    tracker.on_engine_metrics(rep, EngineMetrics(prefix_hits=10.0))  # counter reset (restart): ignored
    assert tracker.ratio("r0") == pytest.approx(1.0)
