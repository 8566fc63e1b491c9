"""OutlierDetector and the probe grace, pure (virtual clock): what the detector decides from
samples, the caps that keep the fleet serving, slow start, canary state, engine signals."""

from __future__ import annotations

import random

from router.config import OutlierSettings
from router.index import PrefixIndex
from router.metrics import RouterMetrics
from router.replicas.outliers import (
    CANARY_FAILED,
    DEGRADED,
    EJECTED,
    HEALTHY,
    OUTCOME_BUCKET_S,
    SAMPLE_CAP,
    SLOW_START,
    OutlierDetector,
)
from router.replicas.passive import PassiveHealth
from router.replicas.registry import Replica, ReplicaRegistry
from router.types import ReplicaSpec


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def fleet(n: int, **kw: float) -> tuple[OutlierDetector, list[Replica], Clock]:
    clock = Clock()
    reg = ReplicaRegistry(PrefixIndex(1024, 30.0))
    cfg = OutlierSettings(min_samples=5, eject_after_s=2.0, slow_start_s=10.0, **kw)  # type: ignore[arg-type]
    det = OutlierDetector(cfg, reg, clock, random.Random(0))
    reps = [reg.add(ReplicaSpec(url=f"http://r{i}", name=f"r{i}", models=("m",))) for i in range(n)]
    for r in reps:  # as the monitor does: added unhealthy, admitted by the first passing probe
        reg.set_healthy(r, False)
        reg.set_healthy(r, True)
    return det, reps, clock


def feed(
    det: OutlierDetector, reps: list[Replica], clock: Clock, seconds: float, slow: dict[int, float]
) -> None:
    """One request per replica per 0.1 s: TTFT 0.1 s for 1000 tokens, ITL 10 ms, x slowness."""
    for _ in range(int(seconds * 10)):
        clock.t += 0.1
        for i, r in enumerate(reps):
            f = slow.get(i, 1.0)
            det.observe_ttft(r, 0.1 * f, 1000)
            det.observe_itl(r, 0.01 * f)
            det.record_success(r)
        if int(clock.t * 10) % 5 == 0:
            det.evaluate()


def test_slow_replica_is_degraded_then_ejected_with_numbers() -> None:
    det, reps, clock = fleet(4)
    feed(det, reps, clock, 1.0, {0: 5.0})
    assert det.state(reps[0].id) == DEGRADED
    feed(det, reps, clock, 3.0, {0: 5.0})
    assert det.state(reps[0].id) == EJECTED
    assert all(det.state(r.id) == HEALTHY for r in reps[1:])
    d = det.describe(reps[0].id)
    assert d["reason"] == "ttft_per_token" and d["numbers"]["ratio"] >= 4.0, d
    assert det.ejections == {(reps[0].id, "ttft_per_token"): 1}
    # never chosen while ejected
    assert all(reps[0] not in det.admit(list(reps)) for _ in range(50))


def test_equally_slow_fleet_has_no_outlier() -> None:
    det, reps, clock = fleet(4)
    feed(det, reps, clock, 5.0, {i: 6.0 for i in range(4)})
    assert all(det.state(r.id) == HEALTHY for r in reps)
    assert det.ejections == {}


def test_ejection_cap_keeps_the_fleet_serving() -> None:
    det, reps, clock = fleet(5, max_ejected_fraction=0.34)
    feed(det, reps, clock, 5.0, {0: 5.0, 1: 5.0})  # two of five sick: at most floor(1.7) = 1 out
    states = [det.state(r.id) for r in reps]
    assert states.count(EJECTED) == 1 and states.count(DEGRADED) == 1, states
    det2, two, clock2 = fleet(2, max_ejected_fraction=1.0)
    feed(det2, two, clock2, 5.0, {0: 5.0})
    assert det2.state(two[0].id) == EJECTED  # of two, one may go
    det1, one, clock1 = fleet(1)
    feed(det1, one, clock1, 5.0, {0: 50.0})
    assert det1.state(one[0].id) == HEALTHY  # no peers, no judgement, never the last one


def test_returns_through_slow_start_and_ramps() -> None:
    det, reps, clock = fleet(4, base_ejection_s=3.0)
    feed(det, reps, clock, 4.0, {0: 5.0})
    assert det.state(reps[0].id) == EJECTED
    feed(det, reps, clock, 3.5, {})
    assert det.state(reps[0].id) == SLOW_START
    w0 = det.weight(reps[0].id, clock.t)
    clock.t += 5.0
    w1 = det.weight(reps[0].id, clock.t)
    assert 0.0 < w0 < w1 < 1.0
    feed(det, reps, clock, 6.0, {})
    assert det.state(reps[0].id) == HEALTHY
    # its share when ramping: kept with probability weight / max
    det.health[reps[0].id].state = SLOW_START  # (state only: the ramp below reads since)
    det._abnormal = 1
    det.health[reps[0].id].since = clock.t
    kept = sum(reps[0] in det.admit(list(reps)) for _ in range(2000))
    assert kept < 2000 * 0.15


def test_joining_replica_starts_slow_only_behind_established_peers() -> None:
    det, reps, clock = fleet(2)
    assert all(det.state(r.id) == HEALTHY for r in reps)  # a fleet starting together
    clock.t += 20.0
    new = det.registry.add(ReplicaSpec(url="http://late", name="late", models=("m",)))
    det.registry.set_healthy(new, False)
    det.registry.set_healthy(new, True)
    assert det.state(new.id) == SLOW_START


def test_canary_failure_excludes_until_success() -> None:
    det, reps, _ = fleet(3)
    det.canary_result(reps[1], False, "TimeoutError")
    assert det.state(reps[1].id) == CANARY_FAILED
    assert all(reps[1] not in det.admit(list(reps)) for _ in range(50))
    det.canary_result(reps[1], True)
    assert det.state(reps[1].id) == SLOW_START


def test_engine_signals_degrade() -> None:
    det, reps, clock = fleet(3)
    for k in range(5):
        clock.t += 1.0
        det.observe_engine(reps[2], preemptions=100.0 * k, kv_usage=0.5, transfer_failures=0.0)
    det.evaluate()
    assert det.state(reps[2].id) == DEGRADED and det.describe(reps[2].id)["reason"] == "preemptions"
    det.observe_engine(reps[1], None, None, transfer_failures=0.0)
    det.observe_engine(reps[1], None, None, transfer_failures=3.0)
    det.evaluate()
    assert det.describe(reps[1].id)["reason"] == "kv_transfer"


def test_probe_failures_do_not_eject_a_replica_serving_requests() -> None:
    det, reps, clock = fleet(2)
    passive = PassiveHealth(
        det.registry, RouterMetrics(), 3, last_success=det.last_success, probe_grace_s=10.0, clock=clock
    )
    det.record_success(reps[0])
    for _ in range(5):
        clock.t += 1.0
        passive.record_failure(reps[0], "probe")
    assert reps[0].healthy and passive.probe_failures_ignored == 5
    for _ in range(3):  # no request succeeded on reps[1]: the probes count
        passive.record_failure(reps[1], "probe")
    assert not reps[1].healthy
    clock.t += 20.0  # the last success is old: probes count again
    for _ in range(3):
        passive.record_failure(reps[0], "probe")
    assert not reps[0].healthy


def test_windows_are_bounded_by_time_not_request_rate() -> None:
    """At thousands of requests per second the detector keeps a fixed number of latency samples
    and outcome buckets, and the success rate still counts every request of the window."""
    det, reps, clock = fleet(2)
    r = reps[0]
    for i in range(20_000):  # 2,000 requests per second for 10 s, every 10th failing
        clock.t += 0.0005
        det.observe_ttft(r, 0.1, 1000)
        det.observe_itl(r, 0.01)
        if i % 10 == 9:
            det.record_failure(r)
        else:
            det.record_success(r)
    h = det.health[r.id]
    assert len(h.ttft) == len(h.itl) == SAMPLE_CAP
    assert len(h.outcomes) == 20_000 and h.outcomes.ok == 18_000
    assert len(h.outcomes._buckets) <= 10 / OUTCOME_BUCKET_S + 1
    det.evaluate()
    assert det.describe(r.id)["state"] == HEALTHY
    clock.t += det.cfg.window_s - 5  # the first half of the traffic is older than the window
    det.evaluate()
    kept = len(h.outcomes)  # 10 s of 2,000/s, plus at most one bucket past the window
    assert 10_000 <= kept <= 10_000 + OUTCOME_BUCKET_S * 2_000 + 1, kept
    assert abs(h.outcomes.ok / kept - 0.9) < 0.01
    clock.t += 10
    det.evaluate()
    assert len(h.outcomes) == 0 and h.outcomes.ok == 0 and not h.ttft
