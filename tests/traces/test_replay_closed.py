"""Live closed-loop replay (traces/replay_closed.py) against a fake streaming server."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from traces.model import Trace, TraceRequest
from traces.replay import ReplayConfig, Target, plan, run_target
from traces.replay_closed import NOT_SENT

from .test_replay import Fake, fake_factory  # noqa: F401  (the fixture, by name)

Factory = Callable[[Fake], Awaitable[str]]


def _req(rid: str, ts: float, sid: str | None, parent: str | None = None) -> TraceRequest:
    return TraceRequest(
        timestamp_s=ts,
        input_length=16,
        output_length=4,
        hash_ids=(hash(rid) & 0xFFFF,),
        request_id=rid,
        session_id=sid,
        parent_id=parent,
    )


async def test_next_turn_waits_for_the_answer_plus_the_pause(fake_factory: Factory) -> None:  # noqa: F811
    url = await fake_factory(Fake(delay=0.4))
    # Trace: a1 at 0 (4 tokens = 0.04 s at 100 tok/s), a2 0.2 s later; x (no session) at 0.05.
    trace = Trace(
        requests=(_req("a1", 0.0, "a"), _req("x", 0.05, None), _req("a2", 0.24, "a", "a1")),
        block_tokens=16,
        name="t",
    )
    cfg = ReplayConfig(model="m", closed_loop=True, decode_tps=100.0, grace_s=5)
    run = await run_target(Target("fake", url), plan(trace, cfg, "m"), cfg)
    recs = {r.request_id: r for r in run.records}
    assert [r.request_id for r in run.records] == ["a1", "x", "a2"]  # plan order
    assert all(r.ok for r in run.records)
    assert abs(recs["x"].send_s - 0.05) < 0.1  # a root: on the trace clock
    a1_done = recs["a1"].send_s + (recs["a1"].e2e_s or 0.0)
    # Open loop would send a2 at 0.24 s, before a1's answer (>= 0.4 s) is back.
    assert a1_done + 0.2 - 0.01 <= recs["a2"].send_s <= a1_done + 0.2 + 0.15


async def test_a_turn_behind_a_stalled_one_is_recorded_not_sent(fake_factory: Factory) -> None:  # noqa: F811
    from traces.synth import PromptSynth

    trace = Trace(requests=(_req("a1", 0.0, "a"), _req("a2", 0.1, "a", "a1")), block_tokens=16, name="t")
    stall = PromptSynth(16).token_ids(trace.requests[0])[-1]
    url = await fake_factory(Fake(stall_ids=frozenset({stall})))
    cfg = ReplayConfig(model="m", closed_loop=True, duration_s=0.2, grace_s=0.3)
    run = await run_target(Target("fake", url), plan(trace, cfg, "m"), cfg)
    recs = {r.request_id: r for r in run.records}
    assert recs["a1"].error is not None and recs["a1"].error.startswith("cancelled")
    assert recs["a2"].error == NOT_SENT
    assert run.cancelled == 1 and run.wall_s < 3.0


async def test_a_turn_that_fails_unexpectedly_still_releases_the_next(fake_factory: Factory) -> None:  # noqa: F811
    # A malformed usage block makes reading the answer raise; the run must still settle (no
    # duration bound here: a lost release would wait forever) and send the session's next turn.
    url = await fake_factory(Fake(bad_usage=True))
    trace = Trace(requests=(_req("a1", 0.0, "a"), _req("a2", 0.1, "a", "a1")), block_tokens=16, name="t")
    cfg = ReplayConfig(model="m", closed_loop=True, grace_s=1)
    run = await asyncio.wait_for(run_target(Target("fake", url), plan(trace, cfg, "m"), cfg), 10)
    recs = {r.request_id: r for r in run.records}
    assert recs["a1"].error is not None and recs["a1"].error.startswith("ValueError")
    assert recs["a2"].error is not None and recs["a2"].error != NOT_SENT  # sent, failed the same way
