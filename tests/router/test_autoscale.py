"""Autoscaling signals: per-model aggregation and the saturation ratio's three terms."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from router.index import PrefixIndex
from router.replicas.autoscale import AutoscaleCollector, model_loads
from router.replicas.registry import ReplicaRegistry
from router.types import ReplicaSpec


def _registry() -> ReplicaRegistry:
    reg = ReplicaRegistry(PrefixIndex(1024, 30.0))
    for i, model in enumerate(("a", "a", "b")):
        reg.add(ReplicaSpec(url=f"http://r{i}", name=f"r{i}", models=(model,)))
    return reg


def test_saturation_is_the_tightest_resource() -> None:
    reg = _registry()
    r0, r1, r2 = list(reg)
    r0.set_engine_load(4.0, 10.0, 0.4)
    r1.set_engine_load(4.0, 0.0, 0.6)
    r0.prefill_tps = r1.prefill_tps = 10_000.0
    r0.pending_prefill_tokens = 5_000
    r2.set_engine_load(1.0, 0.0, 0.96)
    loads = {m.model: m for m in model_loads(reg)}
    a, b = loads["a"], loads["b"]
    assert a.replicas == 2 and a.waiting == 10.0 and a.backlog_tokens == 5_000
    assert a.queue_wait_s == 5_000 / 20_000.0
    assert abs(a.kv_pressure - 0.5) < 1e-9
    assert abs(a.saturation - 1.0) < 1e-9  # 10 waiting / 2 replicas / 5
    assert abs(b.saturation - 0.96 / 0.8) < 1e-9  # KV-bound
    # a replica out of routing does not count as capacity
    reg.set_healthy(r1, False)
    assert {m.model: m for m in model_loads(reg)}["a"].saturation == 2.0


def test_exported_per_model() -> None:
    reg = _registry()
    prom = CollectorRegistry()
    prom.register(AutoscaleCollector(reg))
    text = generate_latest(prom).decode()
    assert 'kvrouter_autoscale_saturation{model="a"} 0.0' in text
    assert 'kvrouter_autoscale_replicas{model="b"} 1.0' in text
