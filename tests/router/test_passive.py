"""Passive ejection: request failures take out at most health.max_ejected_fraction of a pool."""

from __future__ import annotations

from router.index import PrefixIndex
from router.metrics import RouterMetrics
from router.replicas.passive import PassiveHealth
from router.replicas.registry import Replica, ReplicaRegistry
from router.types import ReplicaSpec


def pool(
    n: int, fraction: float = 0.5, role: str = "both"
) -> tuple[PassiveHealth, list[Replica], RouterMetrics]:
    reg = ReplicaRegistry(PrefixIndex(1024, 30.0))
    reps = [
        reg.add(ReplicaSpec(url=f"http://r{i}", name=f"r{i}", models=("m",), role=role)) for i in range(n)
    ]
    metrics = RouterMetrics()
    return PassiveHealth(reg, metrics, 3, max_ejected_fraction=fraction), reps, metrics


def fail(passive: PassiveHealth, rep: Replica, reason: str = "connect", times: int = 3) -> None:
    for _ in range(times):
        passive.record_failure(rep, reason)


def capped(metrics: RouterMetrics, rep: Replica) -> float | None:
    return metrics.registry.get_sample_value("kvrouter_ejections_capped_total", {"replica": rep.id})


def test_request_failures_eject_at_most_the_fraction_of_the_pool() -> None:
    """Every replica of a starved fleet times out connects: half stay to serve (queue), the
    rest are ejected; the refusal is counted once per failure streak."""
    passive, reps, metrics = pool(4)
    for r in reps:
        fail(passive, r, times=5)
    assert [r.healthy for r in reps] == [False, False, True, True]
    assert capped(metrics, reps[2]) == 1.0 and capped(metrics, reps[3]) == 1.0
    passive.registry.set_healthy(reps[0], True)  # probes re-admit one: room for another ejection
    fail(passive, reps[2], times=1)
    assert not reps[2].healthy


def test_probe_failures_are_not_capped() -> None:
    """A replica failing /health is down, not loaded: probes eject past the cap."""
    passive, reps, _ = pool(2)
    fail(passive, reps[0])
    assert not reps[0].healthy
    fail(passive, reps[1])
    assert reps[1].healthy  # request failures: the last one serving stays
    fail(passive, reps[1], "probe")
    assert not reps[1].healthy


def test_a_single_replica_is_never_ejected_by_request_failures() -> None:
    passive, reps, _ = pool(1)
    fail(passive, reps[0], times=10)
    assert reps[0].healthy
    passive, reps, _ = pool(3, fraction=0.0)  # at least one of two or more
    fail(passive, reps[0])
    fail(passive, reps[1])
    assert [r.healthy for r in reps] == [False, True, True]


def test_pools_are_counted_per_model_and_role() -> None:
    passive, reps, _ = pool(2)
    reg = passive.registry
    other = reg.add(ReplicaSpec(url="http://p0", name="p0", models=("m",), role="prefill"))
    draining = reg.add(ReplicaSpec(url="http://r9", name="r9", models=("m",)))
    reg.set_draining(draining, True)
    fail(passive, other)
    assert other.healthy  # the only prefill replica
    fail(passive, reps[0])
    fail(passive, reps[1])
    assert [r.healthy for r in reps] == [False, True]  # the draining one does not widen the pool


def test_replicas_down_by_probes_do_not_keep_a_failing_one_serving() -> None:
    """The cap counts replicas ejected for failed requests only: one down by its probes and one
    not admitted yet leave room to eject a replica whose /health passes but whose requests fail."""
    passive, reps, _ = pool(4)
    fail(passive, reps[0], "probe")
    passive.registry.set_healthy(reps[1], False)  # added, no passing probe yet
    fail(passive, reps[2])
    assert not reps[2].healthy
    fail(passive, reps[3], times=5)
    assert reps[3].healthy  # the last one serving stays, whatever the cap
