"""The scenario suite: deterministic cells, loads calibrated to capacity, bursty arrivals, mixed fleets."""

from __future__ import annotations

import msgspec
import pytest

from traces.generators import generate
from traces.scenarios import LOADS, SCENARIOS, build_cell, bursty, offered_rps, run_cell
from traces.simulate import SimConfig, run_policy


def test_bursty_keeps_requests_and_mean_rate_and_concentrates_arrivals() -> None:
    base = generate("rag", seed=1, rate=10.0, requests=2000, documents=50, block_tokens=512)
    b = bursty(base, 10.0, 0.2, 4.0)
    assert len(b.requests) == len(base.requests)
    assert [r.request_id for r in b.requests] == [r.request_id for r in base.requests]
    assert b.duration_s == pytest.approx(base.duration_s, rel=0.05)
    in_burst = sum(1 for r in b.requests if r.timestamp_s % 10.0 < 2.0)
    assert in_burst / len(b.requests) == pytest.approx(0.8, abs=0.04)  # 4x the rate for 20% of the time


def test_cells_are_deterministic_and_hit_their_load() -> None:
    a = build_cell("long-context", "saturated")
    build_cell.cache_clear()
    b = build_cell("long-context", "saturated")
    assert msgspec.json.encode(a.trace) == msgspec.json.encode(b.trace)
    assert a.utilization == pytest.approx(LOADS["saturated"], rel=0.04)
    light = build_cell("long-context", "light")
    assert offered_rps(light.trace) < offered_rps(a.trace) / 2


def test_mixed_fleet_prices_the_slow_replicas() -> None:
    """On the H100 + A100 fleet, cache_aware learns the A100s' slower prefill and sends them less."""
    sc = SCENARIOS["hetero"]
    cell = build_cell("hetero", "medium")
    cfg = cell.config()
    assert cfg.replicas == 8 and cfg.fleet == sc.fleet
    run = run_policy(cell.trace, cfg, "cache_aware")
    per = run.summary["load_spread"]["per_replica"]
    fast = sum(per.get(f"r{i}", 0) for i in range(4))
    slow = sum(per.get(f"r{i}", 0) for i in range(4, 8))
    assert fast > 1.3 * slow


def test_mismatched_fleet_is_refused() -> None:
    with pytest.raises(ValueError, match="profiles for"):
        SimConfig(replicas=3, fleet=("h100-llama3-8b",))


def test_run_cell_reports_every_policy() -> None:
    r = run_cell("long-context", "light", ["cache_aware", "round_robin", "sglang_cache_aware"])
    assert set(r.policies) == {"cache_aware", "round_robin", "sglang_cache_aware"}
    mean, p99 = r.ratios()
    assert mean > 0 and p99 > 0
