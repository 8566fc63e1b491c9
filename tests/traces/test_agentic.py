"""Agentic workload: the session generator, session fields in Mooncake JSONL, x-session-id in live
replay, the session-feature peer emulations' placement rules, and simulate on a generated file."""

from __future__ import annotations

import itertools
import json
import math
import random
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web

from router.cli import main
from router.index import PrefixIndex
from router.replicas.registry import Replica, ReplicaRegistry
from router.types import BlockHash, ReplicaSpec, RequestInfo
from traces.agentic import (
    PAUSE_PRESETS,
    AgenticParams,
    agentic_sessions,
    lognormal_pause,
    session_prefix_reuse,
)
from traces.generators import generate
from traces.loaders import dump_mooncake, load_trace, parse_trace, write_mooncake, write_trace
from traces.model import Trace, TraceRequest
from traces.peer_policies import PEER_POLICIES, LlmdSessionAffinity, StickyLeastLoaded, StickyRoutingKey
from traces.replay import SESSION_HEADER, ReplayConfig, Target, plan, run_target
from traces.simulate import SimConfig, simulate_runs

SMALL: dict[str, Any] = {"sessions": 12, "turns_mean": 10.0, "rate": 0.5}


def _trace(**kw: Any) -> Trace:
    return generate("agentic", **{**SMALL, **kw})


# --- generator ------------------------------------------------------------------------------------


def test_deterministic_for_a_seed() -> None:
    a = _trace(seed=3)
    assert a == _trace(seed=3)
    assert a.requests != _trace(seed=4).requests
    ts = [r.timestamp_s for r in a.requests]
    assert ts == sorted(ts) and ts[0] == 0.0
    assert a.block_tokens == 512 and a.meta["generator"] == "agentic"


def test_every_request_has_session_and_turns_count_up() -> None:
    t = _trace(seed=1)
    by_session: dict[str, list[TraceRequest]] = defaultdict(list)
    for r in t.requests:
        assert r.session_id is not None and r.turn is not None
        by_session[r.session_id].append(r)
    for reqs in by_session.values():
        assert [r.turn for r in reqs] == list(range(1, len(reqs) + 1))
        # Each turn is the whole previous prompt + answer + tool result: prompts only grow, and
        # the previous turn's full blocks are a prefix of this one's.
        for prev, cur in itertools.pairwise(reqs):
            assert cur.parent_id == prev.request_id
            full = prev.input_length // t.block_tokens
            assert cur.hash_ids[:full] == prev.hash_ids[:full]
            assert cur.input_length > prev.input_length + prev.output_length


def test_prefix_reuse_above_ninety_percent() -> None:
    t = _trace(seed=2, sessions=40, turns_mean=30.0)
    assert session_prefix_reuse(t) > 0.90


def test_shared_prompt_pool_is_skewed() -> None:
    t = _trace(seed=5, sessions=400, turns_mean=1.0, subagent_prob=0.0, prompts=32, prompt_zipf=1.0)
    first_block = [r.hash_ids[0] for r in t.requests if r.turn == 1]
    counts = sorted((first_block.count(h) for h in set(first_block)), reverse=True)
    # Zipf(1) over 32 prompts: the most popular takes ~25% of sessions, and all are distinct prompts.
    assert len(counts) > 10
    assert counts[0] / len(first_block) > 0.15
    assert counts[0] > 5 * counts[len(counts) // 2]


@pytest.mark.parametrize("preset", sorted(PAUSE_PRESETS))
def test_pause_quantiles(preset: str) -> None:
    median, sigma = PAUSE_PRESETS[preset]
    rng = random.Random(0)
    xs = sorted(lognormal_pause(rng, median, sigma) for _ in range(20000))
    q = statistics.quantiles(xs, n=100)
    assert q[49] == pytest.approx(median, rel=0.05)
    assert q[89] == pytest.approx(median * math.exp(1.2816 * sigma), rel=0.08)
    assert q[98] == pytest.approx(median * math.exp(2.3263 * sigma), rel=0.15)


def test_trace_pauses_follow_the_law_and_overrides_apply() -> None:
    t = _trace(seed=1, sessions=30, turns_mean=20.0, subagent_prob=0.0, pause_median_s=30.0, pause_sigma=0.5)
    assert (t.meta["pause_median_s"], t.meta["pause_sigma"]) == (30.0, 0.5)
    gaps = []
    by_id = {r.request_id: r for r in t.requests}
    for r in t.requests:
        if r.parent_id is not None:
            prev = by_id[r.parent_id]
            gaps.append(r.timestamp_s - prev.timestamp_s - prev.output_length / 50.0)
    assert statistics.median(gaps) == pytest.approx(30.0, rel=0.15)
    # Pause presets change timing only: same seed, same prompts.
    short, long = _trace(seed=9, pause="short"), _trace(seed=9, pause="long")

    def key(tr: Trace) -> list[tuple[str, tuple[int, ...], int]]:
        return sorted((r.request_id, r.hash_ids, r.output_length) for r in tr.requests)

    assert key(short) == key(long)
    assert long.duration_s > 10 * short.duration_s


def test_subagents_branch_from_parent_prefix() -> None:
    t = _trace(seed=4, sessions=20, subagent_prob=1.0)
    by_id = {r.request_id: r for r in t.requests}
    children = [r for r in t.requests if r.session_id and "/sub" in r.session_id and r.turn == 1]
    assert children
    for c in children:
        parent = by_id[c.parent_id or ""]
        assert c.session_id is not None and parent.session_id == c.session_id.rsplit("/", 1)[0]
        full = parent.input_length // t.block_tokens
        assert c.hash_ids[:full] == parent.hash_ids[:full]  # the child starts from the parent's prompt
        assert c.timestamp_s >= parent.timestamp_s
        # The parent's next turn waits for its children.
        nxt = [
            r for r in t.requests if r.parent_id == parent.request_id and r.session_id == parent.session_id
        ]
        kids = [r for r in t.requests if r.session_id and r.session_id.startswith(c.session_id)]
        assert all(n.timestamp_s >= max(k.timestamp_s for k in kids) for n in nxt)


def test_concurrency_keeps_a_closed_population() -> None:
    t = _trace(seed=1, sessions=60, concurrency=8, pause="short")
    spans: dict[str, list[float]] = {}
    for r in t.requests:
        root = (r.session_id or "").split("/", 1)[0]
        s = spans.setdefault(root, [r.timestamp_s, r.timestamp_s])
        s[0], s[1] = min(s[0], r.timestamp_s), max(s[1], r.timestamp_s)
    mid = t.duration_s / 2
    live = sum(1 for a, b in spans.values() if a <= mid <= b)
    assert 4 <= live <= 8


def test_invalid_pause_preset() -> None:
    with pytest.raises(msgspec.ValidationError, match="pause preset"):
        msgspec.convert({"pause": "forever"}, AgenticParams)
    assert agentic_sessions(AgenticParams(sessions=1, turns_mean=1.0, subagent_prob=0.0)).requests


# --- trace format ---------------------------------------------------------------------------------


def test_mooncake_round_trip_with_session_fields(tmp_path: Path) -> None:
    t = _trace(seed=6)
    f = tmp_path / "a.jsonl"
    write_mooncake(t, f)
    back, report = load_trace(f)
    assert report.format == "mooncake" and report.ok
    for a, b in zip(t.requests, back.requests, strict=True):
        assert (b.session_id, b.turn, b.request_id, b.parent_id) == (
            a.session_id,
            a.turn,
            a.request_id,
            a.parent_id,
        )
        assert (b.hash_ids, b.input_length, b.output_length) == (a.hash_ids, a.input_length, a.output_length)
        assert b.timestamp_s == pytest.approx(a.timestamp_s, abs=1e-3)
    # kvrouter JSONL carries the same fields.
    write_trace(t, tmp_path / "k.jsonl")
    k, _ = load_trace(tmp_path / "k.jsonl")
    assert [(r.session_id, r.turn) for r in k.requests] == [(r.session_id, r.turn) for r in t.requests]


def test_plain_mooncake_still_loads_and_integer_session_ids() -> None:
    plain = b'{"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [1, 2]}\n'
    tagged = b'{"timestamp": 10, "input_length": 600, "output_length": 5, "hash_ids": [1, 3], "session_id": 42, "turn": 2}\n'
    t, report = parse_trace(plain + tagged)
    assert report.format == "mooncake" and report.ok and report.loaded == 2
    assert (t.requests[0].session_id, t.requests[0].turn, t.requests[0].request_id) == (None, None, "1")
    assert (t.requests[1].session_id, t.requests[1].turn) == ("42", 2)
    # Plain requests are written back without session fields.
    assert b"session_id" not in dump_mooncake(t).splitlines()[0]


def test_mooncake_writer_needs_512_token_blocks() -> None:
    with pytest.raises(ValueError, match="512-token blocks"):
        dump_mooncake(generate("chat", sessions=2))


def test_cli_writes_agentic_mooncake(tmp_path: Path) -> None:
    out = tmp_path / "ag.jsonl"
    rc = main(
        [
            "trace",
            "generate",
            "agentic",
            "--sessions",
            "5",
            "--turns-mean",
            "6",
            "--pause",
            "long",
            "--pause-sigma",
            "0.3",
            "--seed",
            "2",
            "--format",
            "mooncake",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    first = json.loads(out.read_text().splitlines()[0])
    assert set(first) >= {"timestamp", "input_length", "output_length", "hash_ids", "session_id", "turn"}
    t, _ = load_trace(out)
    want = generate("agentic", sessions=5, turns_mean=6.0, pause="long", pause_sigma=0.3, seed=2)
    assert [(r.request_id, r.session_id, r.turn, r.hash_ids) for r in t.requests] == [
        (r.request_id, r.session_id, r.turn, r.hash_ids) for r in want.requests
    ]
    assert (
        main(["trace", "generate", "agentic", "--sessions", "2", "--pause", "forever", "--out", str(out)])
        == 2
    )


# --- live replay: x-session-id ----------------------------------------------------------------------


async def test_replay_sends_session_header() -> None:
    seen: list[str | None] = []

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append(request.headers.get(SESSION_HEADER))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(body["max_tokens"]):
            await resp.write(b"data: " + json.dumps({"choices": [{"text": f" t{i}"}]}).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        reqs = (
            TraceRequest(
                timestamp_s=0.0,
                input_length=32,
                output_length=2,
                hash_ids=(1, 2),
                request_id="a",
                session_id="sess-7",
                turn=1,
            ),
            TraceRequest(timestamp_s=0.01, input_length=32, output_length=2, hash_ids=(3, 4), request_id="b"),
        )
        trace = Trace(requests=reqs, block_tokens=16, name="s")
        cfg = ReplayConfig()
        run = await run_target(Target("fake", url), plan(trace, cfg, "m"), cfg)
        assert all(r.ok for r in run.records)
    finally:
        await runner.cleanup()
    assert sorted(seen, key=str) == sorted(["sess-7", None], key=str)


# --- peer emulations: placement rules ---------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _fleet(n: int) -> list[Replica]:
    reg = ReplicaRegistry(PrefixIndex(capacity_per_replica=1000))
    out = []
    for i in range(n):
        r = reg.add(ReplicaSpec(url=f"http://r{i}", name=f"r{i}"))
        reg.set_healthy(r, True)
        out.append(r)
    return out


def _req(blocks: tuple[int, ...] = (1, 2, 3)) -> RequestInfo:
    return RequestInfo(
        model="m", prompt_tokens=16 * len(blocks), block_size=16, block_hashes=[BlockHash(b) for b in blocks]
    )


def test_sticky_least_loaded_rule() -> None:
    clock = _Clock()
    p = StickyLeastLoaded(random.Random(0), clock)
    reps = _fleet(3)

    def pick(session: str | None, cands: list[Replica] = reps) -> Replica:
        p.set_session(session)
        return p.select(_req(), cands)

    # New sessions go to the replica with the fewest active sessions: three sessions, three replicas.
    homes = {s: pick(s) for s in ("a", "b", "c")}
    assert len({r.id for r in homes.values()}) == 3
    # Sticky whatever the load: the home stays even when it is the busiest replica.
    homes["a"].in_flight = 500
    assert pick("a") is homes["a"]
    # A fourth session ties at one session each and goes by the rendezvous hash, deterministically.
    d = pick("d")
    p2 = StickyLeastLoaded(random.Random(1), _Clock())
    for s in ("a", "b", "c"):
        p2.set_session(s)
        p2.select(_req(), reps)
    p2.set_session("d")
    assert p2.select(_req(), reps) is d
    # A stateless request is balanced but not recorded.
    before = dict(p.active)
    pick(None)
    assert p.active == before
    # Home gone -> re-placed on the least-loaded survivor.
    others = [r for r in reps if r is not homes["b"]]
    moved = pick("b", others)
    assert moved is not homes["b"] and p.sessions["b"][0] == moved.url
    # Expiry: idle longer than the TTL, the session is forgotten and its count released.
    clock.t = 7200.0 + 61.0
    pick("e")
    assert "a" not in p.sessions and sum(p.active.values()) == 1


def test_sglang_sticky_rule() -> None:
    clock = _Clock()
    p = StickyRoutingKey(random.Random(0), clock)
    reps = _fleet(4)
    # First-seen key is delegated to cache_aware, which puts a cold prompt on the min-load worker.
    reps[0].in_flight, reps[1].in_flight, reps[2].in_flight, reps[3].in_flight = 5, 3, 0, 4
    p.set_session("conv")
    home = p.select(_req((1, 2, 3)), reps)
    assert home is reps[2] and p.decisions == {"pinned": 0, "delegated": 1}
    # Pinned: later turns go home whatever the load and whatever the prefix says.
    reps[2].in_flight = 1000
    assert p.select(_req((9, 9, 9)), reps) is home
    assert p.decisions["pinned"] == 1
    # Without a key, the inner policy decides (the least loaded worker here).
    p.set_session(None)
    assert p.select(_req((7, 7)), reps) is not home
    # Idle past max_idle_s: the pin is evicted and the key delegated again.
    clock.t = 14_400.0 + 61.0
    p.set_session("other")
    p.select(_req(), reps)
    assert "conv" not in p.pins


def test_llmd_session_affinity_rule() -> None:
    clock = _Clock()
    p = LlmdSessionAffinity(random.Random(0), clock)
    reps = _fleet(3)
    for r in reps:
        r.engine_waiting, r.kv_usage = 0.0, 0.1
    p.set_session("s")
    first = p.select(_req(), reps)
    assert p.tokens["s"] == first.url
    # The session token (last serving pod) wins among otherwise equal pods.
    for _ in range(10):
        assert p.select(_req(), reps) is first
    # It is a score, not a pin: a home whose queue and KV are the worst loses to an idle pod.
    first.engine_waiting, first.kv_usage = 50.0, 0.99
    others = [r for r in reps if r is not first]
    for r in others:
        r.engine_waiting, r.kv_usage = 0.0, 0.0
    moved = p.select(_req(), reps)
    assert moved is not first and p.tokens["s"] == moved.url


def test_session_emulations_are_registered_and_see_trace_sessions() -> None:
    for name in ("vllm_sticky_least_loaded", "sglang_sticky", "llmd_session_affinity"):
        assert name in PEER_POLICIES
    t = _trace(seed=1, sessions=6, turns_mean=5.0, pause="short")
    runs = simulate_runs(t, SimConfig(replicas=4), ["vllm_sticky_least_loaded"])
    by_session: dict[str, set[str]] = defaultdict(set)
    sessions = {r.request_id: r.session_id for r in t.requests}
    for rec in runs[0].records:
        assert rec.ok
        by_session[sessions[rec.request_id] or ""].add(rec.replica or "")
    # Every session stayed on one replica: the simulator handed the trace's session ids over.
    assert all(len(v) == 1 for v in by_session.values())
    assert len(set().union(*by_session.values())) > 1


def test_cli_simulates_agentic_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "ag.jsonl"
    write_mooncake(_trace(seed=1, sessions=4, turns_mean=4.0, pause="short"), f)
    rc = main(
        [
            "simulate",
            "--trace",
            str(f),
            "--replicas",
            "2",
            "--json",
            "--policy",
            "cache_aware",
            "--policy",
            "sglang_sticky",
            "--policy",
            "llmd_session_affinity",
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["policies"]) == {"cache_aware", "sglang_sticky", "llmd_session_affinity"}
    assert all(p["errors"] == 0 and p["hit_ratio"] > 0.5 for p in out["policies"].values())
