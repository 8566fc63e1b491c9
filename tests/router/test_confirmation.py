"""The loud parity check: keys no event can confirm keep their own TTL, speculative blocks that
expire unconfirmed are counted per replica, and a replica with KV events that confirms almost
nothing the router matches is reported (log, metrics, /ready detail)."""

from __future__ import annotations

import logging
import random

import pytest

from router.hashing import hash_token_blocks, model_seed
from router.index import PrefixIndex
from router.metrics import RouterMetrics
from router.parity import CONFIRM_ALARM_RATIO, MIN_MATCHED_BLOCKS, WINDOW_S, ParityTracker
from router.replicas.registry import ReplicaRegistry
from router.routing import Router, Ticket
from router.scoring.policies import build_policy
from router.types import ReplicaSpec


class Clock:
    t = 100.0

    def __call__(self) -> float:
        return self.t


def make(events: bool) -> tuple[Router, Clock, RouterMetrics]:
    clock = Clock()
    index = PrefixIndex(1000, speculative_ttl_s=30, clock=clock)
    reg = ReplicaRegistry(index)
    rep = reg.add(ReplicaSpec(url="http://r0", name="r0", models=("m",)))
    rep.has_kv_events = events
    metrics = RouterMetrics()
    router = Router(
        index,
        reg,
        build_policy("cache_aware", rng=random.Random(0)),
        block_size=16,
        clock=clock,
        speculative_ttl_s=30,
        approximate_ttl_s=300,
    )
    metrics.add_state_collector(lambda: reg, index)
    return router, clock, metrics


def _serve(router: Router, **prompt: object) -> Ticket:
    req = router.request_info("m", **prompt)  # type: ignore[arg-type]
    ticket = router.dispatch(req, router.select(req))
    router.finish(ticket)
    return ticket


@pytest.mark.parametrize("events", [False, True])
def test_byte_keys_keep_the_approximate_ttl_whether_or_not_events_flow(events: bool) -> None:
    router, clock, _ = make(events)
    text = "a conversation the engine tokenises differently " * 40
    _serve(router, text=text)
    clock.t += 60  # past speculative_ttl_s, well within approximate_ttl_s
    req = router.request_info("m", text=text)
    router.select(req)
    assert req.gpu_blocks[0] == len(req.block_hashes) > 0


def test_unconfirmed_token_keys_expire_and_are_counted_per_replica() -> None:
    router, clock, metrics = make(events=True)
    _serve(router, token_ids=list(range(160)))  # 10 blocks, never confirmed by an event
    clock.t += 31
    router.index.expire()
    assert router.index.expired_by_replica == {"r0": 10}
    assert 'kvrouter_index_unconfirmed_expired_blocks_total{replica="r0"} 10.0' in metrics.render().decode()


def test_tickets_split_matched_blocks_into_confirmed_and_speculative() -> None:
    router, _, _ = make(events=True)
    toks = list(range(16 * 8 + 1))
    confirmed = hash_token_blocks(toks, 16, model_seed("m"))[:5]
    router.index.store("r0", confirmed)  # a KV event confirmed the first 5 blocks  # type: ignore[arg-type]
    _serve(router, token_ids=toks)  # the router speculates the other 3
    t = _serve(router, token_ids=toks)
    assert (t.matched_blocks, t.confirmed_blocks) == (8, 5)
    assert t.confirmed_tokens == 5 * 16 and t.predicted_cached_tokens == 8 * 16


def _tracker() -> tuple[ParityTracker, Clock, Ticket, Ticket]:
    clock = Clock()
    metrics = RouterMetrics()
    tracker = ParityTracker(metrics, clock)
    metrics.add_state_collector(lambda: [], PrefixIndex(10), tracker.collect)
    rep = ReplicaRegistry(PrefixIndex(10)).add(ReplicaSpec(url="http://r0", name="r0"))
    rep.has_kv_events = True
    wrong = Ticket(rep, 2000, 1600, 400, 0, matched_blocks=100, confirmed_blocks=0, confirmed_tokens=0)
    right = Ticket(rep, 2000, 1600, 400, 0, matched_blocks=100, confirmed_blocks=100, confirmed_tokens=1600)
    return tracker, clock, wrong, right


def test_replica_with_events_confirming_nothing_is_loud(caplog: pytest.LogCaptureFixture) -> None:
    tracker, clock, wrong, _ = _tracker()
    for _ in range(MIN_MATCHED_BLOCKS // 100 + 1):
        tracker.on_finish(wrong, True, 1600)  # the engine reuses (speculation was right)...
    clock.t += WINDOW_S + 1
    with caplog.at_level(logging.WARNING, logger="kvrouter.parity"):
        tracker.on_finish(wrong, True, 1600)  # ...but its events never confirm the router's keys
    assert any("keys are not the engine's" in r.message for r in caplog.records)
    assert tracker.confirmed_ratio("r0") == 0.0 < CONFIRM_ALARM_RATIO
    assert "r0" in tracker.warnings()
    text = tracker.metrics.render().decode()
    assert 'kvrouter_prefix_confirmed_ratio{replica="r0"} 0.0' in text
    assert 'kvrouter_prefix_unconfirmed_warning{replica="r0"} 1.0' in text


def test_confirmed_predictions_are_what_parity_compares(caplog: pytest.LogCaptureFixture) -> None:
    tracker, clock, wrong, right = _tracker()
    for _ in range(4):
        tracker.on_finish(right, True, 1600)
        tracker.on_finish(wrong, True, 0)  # speculative-only predictions are not parity's business
    assert tracker.confirmed_ratio("r0") == pytest.approx(0.5)
    clock.t += WINDOW_S + 1
    with caplog.at_level(logging.WARNING, logger="kvrouter.parity"):
        tracker.on_finish(right, True, 1600)
    assert tracker.ratio("r0") == pytest.approx(1.0)
    assert not tracker.warnings() and not caplog.records
