"""One slow replica in the offline simulator (docs/reliability.md): the slow window slows one
engine, the live outlier detector runs in virtual time under kvrouter's policies, and kvrouter's
p99 TTFT stays close to the healthy fleet's."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from traces.loaders import load_trace
from traces.model import Trace
from traces.simulate import SimConfig, run_policy

TRACE = Path(__file__).resolve().parents[2] / "traces" / "data" / "mooncake" / "conversation_trace.jsonl"


@pytest.fixture(scope="module")
def trace() -> Trace:
    return load_trace(str(TRACE))[0]


BASE = SimConfig(replicas=8, speedup=2.0, duration_s=400.0)
SLOW = msgspec.structs.replace(BASE, slow_replica=3, slow_factor=3.0, slow_window=(50.0, 400.0))


def _share(run: object) -> float:
    return float(run.extra["slow_replica_share_in_window"])  # type: ignore[attr-defined]


def test_detector_takes_traffic_off_the_slow_replica(trace: Trace) -> None:
    plain = run_policy(trace, SLOW, "round_robin")
    detected = run_policy(trace, msgspec.structs.replace(SLOW, outliers=True), "round_robin")
    assert abs(_share(plain) - 1 / 8) < 0.01  # round robin alone keeps sending its share
    assert _share(detected) < 0.06, _share(detected)
    assert detected.extra["outlier_ejections"] >= 1
    assert any("r3 degraded->ejected" in t for t in detected.extra["outlier_transitions"])
    assert detected.summary["ttft_p99_s"] < plain.summary["ttft_p99_s"] / 2


def test_kvrouter_p99_stays_within_20_percent_of_the_healthy_fleet(trace: Trace) -> None:
    healthy = run_policy(trace, msgspec.structs.replace(BASE, outliers=True), "cache_aware")
    slow = run_policy(trace, msgspec.structs.replace(SLOW, outliers=True), "cache_aware")
    assert slow.summary["ttft_p99_s"] <= 1.2 * healthy.summary["ttft_p99_s"], (
        slow.summary["ttft_p99_s"],
        healthy.summary["ttft_p99_s"],
    )
    assert healthy.extra["outlier_ejections"] == 0


def test_slow_window_is_validated() -> None:
    with pytest.raises(ValueError, match="slow_window"):
        SimConfig(slow_replica=0, slow_window=(5.0, 1.0))
    with pytest.raises(ValueError, match="slow_replica"):
        SimConfig(replicas=2, slow_replica=2)
