"""Engine scrapes are spread over the interval, not fired for every replica at once."""

from __future__ import annotations

from router.replicas.monitor import scrape_phase


def test_phase_is_stable_in_range_and_spread() -> None:
    ids = [f"http://127.0.0.1:{8001 + i}" for i in range(16)]
    phases = [scrape_phase(r, 0.25) for r in ids]
    assert all(0.0 <= p < 0.25 for p in phases)
    assert phases == [scrape_phase(r, 0.25) for r in ids]  # same id, same phase (router restarts)
    assert scrape_phase(ids[0], 1.0) * 0.25 == scrape_phase(ids[0], 0.25)  # scales with the interval
    # 16 replicas found together land in many different 10 ms slots of the 250 ms, not one.
    assert len({int(p / 0.01) for p in phases}) >= 10
    assert min(phases) < 0.125 < max(phases)
