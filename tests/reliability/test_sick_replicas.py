"""Sick but alive (issue #20), behind a real `kvrouter serve` and a `kvrouter sim` fleet: a slow
replica loses its traffic and gets it back through slow start, a stuck engine is caught by the
canary while /health is 200, a stopped stream is ended within the idle timeout, a joining replica
ramps, slow probes do not eject a serving replica, an equally slow fleet ejects nobody.

Engines use the h100-llama3-8b profile (steps of ~6 ms) so that 5x is far above loopback noise."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.harness import SimFleet, call, classify_sse, debug_replicas, wait_for
from tests.support.procs import RouterProc, http

PROMPT = "the quick brown fox jumps over the lazy dog and keeps running through the field " * 8
SIM = ("--profile", "h100-llama3-8b", "--model", "tiny", "--seed", "3")
FAST = ("--outlier-interval", "0.25", "--outlier-min-samples", "5", "--outlier-eject-after", "1")


def _body(i: int, max_tokens: int = 12) -> dict[str, Any]:
    return {"model": "tiny", "prompt": f"u{i} {PROMPT}", "max_tokens": max_tokens, "stream": True}


async def drive(
    url: str, seconds: float, conc: int = 4, max_tokens: int = 12
) -> list[tuple[float, str, str]]:
    """Closed-loop streaming load for ``seconds``: (start time, replica, outcome kind) per request."""
    out: list[tuple[float, str, str]] = []
    deadline = time.monotonic() + seconds
    counter = iter(range(10**6))
    async with aiohttp.ClientSession() as s:

        async def worker() -> None:
            while time.monotonic() < deadline:
                i = next(counter)
                t0 = time.monotonic()
                try:
                    async with asyncio.timeout(15):
                        async with s.post(url + "/v1/completions", json=_body(i, max_tokens)) as resp:
                            raw = await resp.read()
                            rep = resp.headers.get("x-kvrouter-replica", "")
                            kind = classify_sse(raw)[0] if resp.status == 200 else f"http_{resp.status}"
                except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                    rep, kind = "", f"lost:{type(exc).__name__}"
                out.append((t0, rep, kind))

        await asyncio.gather(*(worker() for _ in range(conc)))
    return out


def share(
    rows: list[tuple[float, str, str]], rid: str, since: float = 0.0, until: float = float("inf")
) -> float:
    sel = [r for r in rows if since <= r[0] < until]
    return sum(1 for r in sel if r[1] == rid) / max(1, len(sel))


def ids(r: RouterProc) -> dict[str, str]:
    """replica URL -> router id."""
    return {row["url"]: row["id"] for row in debug_replicas(r.url)["replicas"]}


def state(r: RouterProc, rid: str) -> dict[str, Any]:
    for row in debug_replicas(r.url)["replicas"]:
        if row["id"] == rid:
            return dict(row["outlier"])
    raise KeyError(rid)


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def sim3(logs: Path) -> Iterator[SimFleet]:
    sim = SimFleet(logs, 3, *SIM)
    yield sim
    sim.proc.stop()


def _router(logs: Path, sim: SimFleet, *extra: str) -> RouterProc:
    r = RouterProc(logs, sim.urls, "--enable-debug", "--seed", "1", "--drain-grace", "0", *FAST, *extra)
    wait_for(
        lambda: all(row["healthy"] for row in debug_replicas(r.url)["replicas"]), 10, "replicas admitted"
    )
    return r


async def test_slowed_replica_loses_traffic_then_returns_through_slow_start(
    logs: Path, sim3: SimFleet
) -> None:
    r = _router(logs, sim3, "--slow-start", "3", "--outlier-ejection-time", "3", "--canary-after", "0")
    try:
        slow = ids(r)[sim3.replicas[0].url]
        base = await drive(r.url, 2.0)
        assert share(base, slow) > 0.15, "a healthy fleet shares traffic"
        sim3.replicas[0].faults(slow_factor=5.0)
        t_fault = time.monotonic()
        sick = await drive(r.url, 8.0)
        st = state(r, slow)
        # within bounded time (min samples + eject_after + evaluation period) it lost its share
        late = share(sick, slow, since=t_fault + 5.0)
        assert late < 0.05, (late, st)
        assert st["state"] in ("ejected", "degraded", "slow_start"), st
        assert 'kvrouter_outlier_ejections_total{reason="itl",replica="' in r.metrics() or (
            'kvrouter_outlier_ejections_total{reason="ttft_per_token"' in r.metrics()
        )
        assert all(k == "ok" for *_, k in sick), {k for *_, k in sick}
        sim3.replicas[0].faults()  # recovered
        t_heal = time.monotonic()
        healed = await drive(r.url, 10.0)
        # back through slow start: first a small share, at the end a fair one
        assert share(healed, slow, since=t_heal + 7.0) > 0.15, state(r, slow)
        assert all(k == "ok" for *_, k in healed)
        log = r.proc.log(tail=None)
        assert "-> slow_start (ejection_over)" in log and "-> ejected" in log, log[-2000:]
    finally:
        r.proc.stop()


async def test_stuck_engine_is_caught_by_the_canary_while_health_is_200(logs: Path) -> None:
    sim = SimFleet(logs, 2, *SIM)
    r = _router(logs, sim, "--canary-after", "1", "--canary-timeout", "0.5", "--slow-start", "1")
    try:
        stuck = ids(r)[sim.replicas[0].url]
        sim.replicas[0].faults(stuck=True)
        wait_for(lambda: state(r, stuck)["state"] == "canary_failed", 10, "canary marks the stuck engine")
        assert http("GET", sim.replicas[0].url + "/health")[0] == 200
        assert next(row for row in debug_replicas(r.url)["replicas"] if row["id"] == stuck)["healthy"]
        # traffic avoids it: every request is answered by the other replica
        rows = await drive(r.url, 1.5, conc=2)
        assert rows and all(k == "ok" for *_, k in rows)
        assert share(rows, stuck) == 0.0
        assert 'state="canary_failed"} 1.0' in r.metrics()
        sim.replicas[0].faults()
        wait_for(lambda: state(r, stuck)["state"] in ("slow_start", "healthy"), 10, "canary re-admits")
    finally:
        r.proc.stop()
        sim.proc.stop()


async def test_stopped_stream_is_ended_within_idle_timeout_and_upstream_closed(logs: Path) -> None:
    sim = SimFleet(logs, 1, *SIM)
    r = _router(logs, sim, "--idle-timeout", "1.0", "--canary-after", "0")
    try:
        sim.replicas[0].faults(stop_after_chunks=2)
        async with aiohttp.ClientSession() as s:
            out = await call(s, r.url + "/v1/completions", _body(0, 64), timeout=10)
        assert out.kind == "failed_clean", out  # SSE error event, then [DONE]
        assert 1.0 <= out.latency_s < 3.0, out.latency_s
        assert sim.replicas[0].injected().get("stop") == 1

        # the router closed the upstream connection: the engine's handler saw the client go
        wait_for(lambda: sim.replicas[0].injected().get("stop_closed") == 1, 5, "upstream connection closed")
        assert 'kvrouter_requests_total{replica="' in r.metrics() and 'status="idle_timeout"' in r.metrics()
    finally:
        r.proc.stop()
        sim.proc.stop()


async def test_joining_replica_ramps_up(logs: Path, sim3: SimFleet) -> None:
    sim3.replicas[2].faults(refuse_connections=True, refuse_for_s=8.0)
    r = RouterProc(
        logs,
        sim3.urls,
        "--enable-debug",
        "--seed",
        "1",
        "--drain-grace",
        "0",
        "--policy",
        "round_robin",
        *FAST,
        "--slow-start",
        "4",
        "--canary-after",
        "0",
        wait_ready=True,
    )
    try:
        joiner = ids(r)[sim3.replicas[2].url]
        wait_for(
            lambda: state(r, joiner)["state"] == "slow_start", 20, "the joiner starts slow"
        )  # peers joined >= 4 s before
        t_join = time.monotonic()
        rows = await drive(r.url, 5.0, conc=3, max_tokens=4)
        early = share(rows, joiner, until=t_join + 1.0)
        late = share(rows, joiner, since=t_join + 4.0)
        assert early < 0.15, (early, late)
        assert late > 0.25, (early, late)  # a fair third once ramped
        assert all(k == "ok" for *_, k in rows)
    finally:
        r.proc.stop()


async def test_slow_probes_do_not_eject_a_serving_replica(logs: Path, sim3: SimFleet) -> None:
    r = _router(logs, sim3, "--canary-after", "0")
    try:
        loaded = ids(r)[sim3.replicas[0].url]
        sim3.replicas[0].faults(health_stall_s=1.5)  # probe timeout is 1 s: every probe fails
        rows = await drive(r.url, 5.0)
        assert all(k == "ok" for *_, k in rows)
        assert share(rows, loaded, since=rows[0][0] + 3.0) > 0.1
        row = next(x for x in debug_replicas(r.url)["replicas"] if x["id"] == loaded)
        assert row["healthy"], row
        assert 'kvrouter_ejections_total{replica="' + loaded not in r.metrics()
    finally:
        r.proc.stop()


async def test_equally_slow_fleet_loses_nothing_and_ejects_nobody(logs: Path, sim3: SimFleet) -> None:
    for rep in sim3.replicas:
        rep.faults(slow_factor=4.0)
    r = _router(logs, sim3, "--canary-after", "0")
    try:
        rows = await drive(r.url, 6.0)
        assert rows and all(k == "ok" for *_, k in rows), {k for *_, k in rows}
        states = {row["id"]: row["outlier"]["state"] for row in debug_replicas(r.url)["replicas"]}
        assert set(states.values()) <= {"healthy", "slow_start"}, states
        assert "kvrouter_outlier_ejections_total{" not in r.metrics()
        assert "-> degraded" not in r.proc.log(tail=None)
    finally:
        r.proc.stop()


async def test_client_cancel_is_counted_by_outcome(logs: Path) -> None:
    sim = SimFleet(logs, 1, *SIM, "--fault-slow-factor", "10")
    r = _router(logs, sim, "--canary-after", "0")
    try:
        async with (
            aiohttp.ClientSession() as s,
            s.post(r.url + "/v1/completions", json=_body(0, 200)) as resp,
        ):
            assert resp.status == 200
            await resp.content.readany()  # first chunk, then the client walks away
        wait_for(lambda: 'status="client_cancelled"} 1.0' in r.metrics(), 5, "client_cancelled counted")
    finally:
        r.proc.stop()
        sim.proc.stop()
