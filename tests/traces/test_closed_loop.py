"""Closed-loop scheduling of session traces (traces/closed_loop.py) and its use by the simulator."""

from __future__ import annotations

import math

import pytest

from traces.closed_loop import ArrivalQueue, ClosedLoop, session_completion
from traces.generators import generate
from traces.model import Trace, TraceRequest
from traces.records import RequestRecord
from traces.simulate import SimConfig, run_policy


def _r(
    rid: str, ts: float, sid: str | None, parent: str | None = None, out: int = 50, turn: int | None = None
) -> TraceRequest:
    return TraceRequest(
        timestamp_s=ts,
        input_length=100,
        output_length=out,
        request_id=rid,
        session_id=sid,
        parent_id=parent,
        turn=turn,
    )


def test_next_turn_waits_for_the_previous_one_plus_its_pause() -> None:
    # Trace: turn 1 at 0 s with 50 output tokens (1 s at 50 tok/s), then a 4 s tool pause.
    reqs = [_r("a1", 0.0, "a", out=50), _r("a2", 5.0, "a", "a1"), _r("x", 1.0, None)]
    loop = ClosedLoop(reqs, decode_tps=50.0)
    assert loop.pause_s == {"a2": pytest.approx(4.0)}
    assert [(t, r.request_id) for t, r in loop.roots()] == [(0.0, "a1"), (1.0, "x")]
    # Turn 1 took 10 s in the replay: turn 2 goes at 10 + 4, not at its trace time 5.
    ((t, r),) = loop.finished("a1", 10.0)
    assert r.request_id == "a2" and t == pytest.approx(14.0)
    assert loop.finished("a1", 11.0) == []  # released once
    assert loop.pending == 0


def test_speedup_scales_roots_and_pauses() -> None:
    reqs = [_r("a1", 10.0, "a", out=0), _r("a2", 18.0, "a", "a1"), _r("b1", 14.0, "b")]
    loop = ClosedLoop(reqs, speedup=2.0)
    assert [(t, r.request_id) for t, r in loop.roots()] == [(0.0, "a1"), (2.0, "b1")]
    assert loop.finished("a1", 1.0)[0][0] == pytest.approx(1.0 + 8.0 / 2)


def test_parent_resumes_after_its_last_sub_agent() -> None:
    # p1 spawns two sub-agents (first requests name p1 as parent); p2 continues p's session.
    reqs = [
        _r("p1", 0.0, "p", out=0),
        _r("c1", 0.0, "p/sub0", "p1"),
        _r("d1", 0.0, "p/sub1", "p1"),
        _r("d2", 3.0, "p/sub1", "d1", out=0),
        _r("p2", 4.0, "p", "p1"),
    ]
    loop = ClosedLoop(reqs, decode_tps=50.0)
    assert [r.request_id for _, r in loop.roots()] == ["p1"]
    released = sorted(r.request_id for _, r in loop.finished("p1", 1.0))
    assert released == ["c1", "d1"]  # children start when the spawning turn is done
    assert loop.finished("c1", 2.0) == []  # p2 still waits for d2
    assert [r.request_id for _, r in loop.finished("d1", 2.5)] == ["d2"]
    # Trace: d2 ended at 3 s and p2 came at 4 s: a 1 s pause after the later of c1's and d2's end.
    ((t, r),) = loop.finished("d2", 7.0)
    assert r.request_id == "p2" and t == pytest.approx(8.0)


def test_without_parent_ids_turns_chain_by_session_order() -> None:
    reqs = [_r("a", 0.0, "s", out=0), _r("b", 2.0, "s", out=0), _r("c", 3.0, "t", out=0)]
    loop = ClosedLoop(reqs)
    assert [r.request_id for _, r in loop.roots()] == ["a", "c"]
    ((t, r),) = loop.finished("a", 5.0)
    assert r.request_id == "b" and t == pytest.approx(7.0)


def test_a_parent_outside_the_run_makes_a_root() -> None:
    loop = ClosedLoop([_r("a2", 5.0, "a", "a1")])
    assert [r.request_id for _, r in loop.roots()] == ["a2"]


def test_arrival_queue_orders_by_time_then_release() -> None:
    q = ArrivalQueue([(2.0, _r("b", 0, None)), (1.0, _r("a", 0, None))])
    q.push(2.0, _r("c", 0, None))
    assert [q.pop()[1].request_id for _ in range(3)] == ["a", "b", "c"]
    assert q.peek() == math.inf and len(q) == 0


def test_session_completion_spans_first_send_to_last_token() -> None:
    reqs = [_r("a1", 0, "a"), _r("a2", 0, "a", "a1"), _r("b1", 0, "b"), _r("x", 0, None)]
    recs = {
        "a1": RequestRecord(request_id="a1", target="t", send_s=1.0, prompt_tokens=1, ttft_s=0.1, e2e_s=2.0),
        "a2": RequestRecord(request_id="a2", target="t", send_s=5.0, prompt_tokens=1, ttft_s=0.1, e2e_s=1.0),
        "b1": RequestRecord(request_id="b1", target="t", send_s=0.0, prompt_tokens=1, error="x"),
        "x": RequestRecord(request_id="x", target="t", send_s=0.0, prompt_tokens=1, ttft_s=0.1, e2e_s=9.0),
    }
    out = session_completion(reqs, recs)
    assert out["sessions"] == 1  # b failed, x has no session
    assert out["session_completion_mean_s"] == pytest.approx(5.0)


def test_simulator_closed_loop_follows_the_replay_not_the_trace() -> None:
    trace: Trace = generate("agentic", sessions=4, rate=1.0, pause="short", turns_mean=4.0, seed=3)
    cfg = SimConfig(replicas=2, closed_loop=True)
    run = run_policy(trace, cfg, "cache_aware")
    recs = {r.request_id: r for r in run.records}
    assert all(r.ok for r in run.records)
    loop = ClosedLoop(trace.requests)  # the generator's decode speed is the default 50 tok/s
    for rid, deps in loop.deps.items():
        done = max(recs[d].send_s + (recs[d].e2e_s or 0.0) for d in deps)
        # Sent when what it waits for finished, plus the pause (late by at most one 20 ms step).
        assert done + loop.pause_s[rid] - 1e-9 <= recs[rid].send_s <= done + loop.pause_s[rid] + 0.03
    assert run.extra["sessions"] >= 4
    assert run.extra["session_completion_mean_s"] > 0
