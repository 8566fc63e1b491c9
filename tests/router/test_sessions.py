"""Agent sessions: keys and hints, the bounded table, continuity inference, and placement that
weighs the pause (stick while the KV survives, move when the home is saturated or its blocks are
gone, close releases)."""

from __future__ import annotations

import asyncio
import json
import random

import pytest

from router.admission import Admission
from router.errors import BadRequest
from router.index import PrefixIndex
from router.replicas.registry import Replica, ReplicaRegistry
from router.routing import Router
from router.scoring.guard import BoundedLoadFilter
from router.scoring.policies import build_policy
from router.scoring.session import SessionBoundedLoadFilter, rendezvous_weight
from router.sessions.identity import extract_hints, rewrite_body
from router.sessions.survival import surviving_fraction
from router.sessions.table import SessionTable
from router.sessions.tracker import SessionTracker
from router.types import BlockHash, ReplicaId, ReplicaSpec

# ---- identity -------------------------------------------------------------------------------


def test_header_precedence_and_nvext() -> None:
    h = extract_hints(b"X-Session-Id: abc\r\nx-smg-routing-key: smg\r\n", b"{}")
    assert (h.session_id, h.source) == ("abc", "x-session-id")
    h = extract_hints(b"X-Tenant: t\r\nx-smg-routing-key: smg\r\n", b"{}")
    assert h.session_id == "smg"
    h = extract_hints(b"My-Key: mine\r\nX-Session-Id: abc\r\n", b"{}", header="my-key")
    assert h.session_id == "mine"
    h = extract_hints(b"x-session-token: tok\r\n", b"{}")
    assert h.session_id == "tok"
    body = {
        "model": "m",
        "prompt": "hi",
        "nvext": {
            "session_control": {"session_id": "dyn", "action": "close"},
            "agent_hints": {"priority": 5, "osl": 300, "speculative_prefill": True},
        },
    }
    h = extract_hints(b"", json.dumps(body).encode())
    assert (h.session_id, h.source, h.action) == ("dyn", "nvext", "close")
    assert h.priority == -5  # Dynamo: higher first; kept in vLLM's order (smaller first)
    assert h.osl == 300 and h.speculative_prefill
    assert h.strip == ("nvext",)
    # a header wins over the body's key
    assert extract_hints(b"x-session-id: hdr\r\n", json.dumps(body).encode()).session_id == "hdr"


def test_body_field_and_plain_priority() -> None:
    raw = json.dumps({"model": "m", "prompt": "x", "conversation": "c1", "priority": 3}).encode()
    h = extract_hints(b"", raw, body_field="conversation")
    assert (h.session_id, h.priority) == ("c1", 3)
    assert set(h.strip) == {"priority", "conversation"}
    # `user` is an OpenAI field: a key, never stripped
    h = extract_hints(
        b"", json.dumps({"model": "m", "prompt": "x", "user": "u7"}).encode(), body_field="user"
    )
    assert h.session_id == "u7" and h.strip == ()


def test_rewrite_body_strips_rejected_fields_and_sends_priority_only_where_scheduled() -> None:
    raw = json.dumps(
        {"model": "m", "prompt": "x", "priority": 2, "nvext": {"agent_hints": {"osl": 9}}}
    ).encode()
    h = extract_hints(b"", raw)
    plain = json.loads(rewrite_body(raw, h, priority_scheduling=False))
    assert plain == {"model": "m", "prompt": "x"}
    sched = json.loads(rewrite_body(raw, h, priority_scheduling=True))
    assert sched == {"model": "m", "prompt": "x", "priority": 2}
    untouched = b'{"model":"m","prompt":"x"}'
    assert rewrite_body(untouched, extract_hints(b"", untouched), priority_scheduling=True) is untouched


@pytest.mark.parametrize(
    "body",
    [
        {"nvext": "x"},
        {"nvext": {"agent_hints": {"priority": "high"}}},
        {"nvext": {"session_control": {"session_id": "s", "action": "pause"}}},
        {"priority": 1.5},
        {"nvext": {"session_control": {"session_id": "k" * 300}}},
    ],
)
def test_bad_hints_are_400(body: dict[str, object]) -> None:
    with pytest.raises(BadRequest):
        extract_hints(b"", json.dumps({"model": "m", "prompt": "x", **body}).encode())


# ---- table ----------------------------------------------------------------------------------


def test_a_million_idle_sessions_stay_bounded() -> None:
    table = SessionTable(capacity=10_000, idle_ttl_s=1e9)
    for i in range(1_000_000):
        s = table.touch(f"s{i}", float(i))
        table.set_tail(s, BlockHash(i))
    assert len(table) == 10_000
    assert len(table._tails) == 10_000
    assert table.evicted == 990_000
    assert "s999999" in table and "s0" not in table


def test_idle_ttl_and_close_release() -> None:
    table = SessionTable(capacity=100, idle_ttl_s=10.0)
    table.touch("a", 0.0)
    table.touch("b", 5.0)
    assert table.get("a", 9.0) is not None
    assert table.get("a", 11.0) is None and table.expired == 1
    assert table.close("b") and table.get("b", 6.0) is None and not table.close("b")


def test_continuity_is_inferred_from_the_prefix() -> None:
    table = SessionTable()
    s = table.touch("conv", 0.0)
    table.set_tail(s, BlockHash(13))
    turn2 = [BlockHash(h) for h in (11, 12, 13, 14, 15)]  # extends the last prompt (ends at 13)
    found = table.infer(turn2, 1.0)
    assert found is not None and found.key == "conv"
    assert table.infer([BlockHash(11), BlockHash(12)], 1.0) is None  # a shorter prompt: not a continuation


def test_survival_estimate_follows_lru_turnover() -> None:
    assert surviving_fraction(0, 10, 100) == 1.0
    assert surviving_fraction(90, 10, 100) == 1.0  # exactly room for it
    assert surviving_fraction(95, 10, 100) == 0.5  # half of its oldest blocks gone
    assert surviving_fraction(100, 10, 100) == 0.0


# ---- placement --------------------------------------------------------------------------------

SYSTEM = [BlockHash(1000 + i) for i in range(8)]


class Clock:
    t = 100.0

    def __call__(self) -> float:
        return self.t


def fleet(n: int = 8, events: bool = True) -> tuple[Router, list[Replica], Clock]:
    clock = Clock()
    index = PrefixIndex(1000, speculative_ttl_s=10, clock=clock)
    reg = ReplicaRegistry(index)
    reps = []
    for i in range(n):
        r = reg.add(ReplicaSpec(url=f"http://r{i}", name=f"r{i}", models=("m",)))
        r.has_kv_events = events
        r.num_gpu_blocks = 100
        reps.append(r)
        index.store(r.id, SYSTEM)  # every replica holds the shared system prompt (confirmed)
    policy = build_policy("cache_aware", rng=random.Random(0))
    router = Router(index, reg, policy, block_size=16, clock=clock, sessions=SessionTracker(infer=True))
    return router, reps, clock


def turn(router: Router, key: str | None, blocks: list[BlockHash], confirm: bool = True) -> Replica:
    req = router.request_info("m", block_hashes=blocks, session_id=key, max_tokens=16)
    rep = router.select(req)
    ticket = router.dispatch(req, rep)
    router.first_token(ticket, 0.1)
    router.finish(ticket)
    if confirm:
        router.index.store(rep.id, blocks)  # the engine's BlockStored
    return rep


def grow(prev: list[BlockHash], base: int, k: int = 4) -> list[BlockHash]:
    return prev + [BlockHash(base + i) for i in range(k)]


def test_new_session_goes_to_its_rendezvous_replica() -> None:
    router, reps, _ = fleet()
    home = turn(router, "sess-1", grow(SYSTEM, 1))
    assert home.id == max(reps, key=lambda r: rendezvous_weight("sess-1", r.id)).id


def test_turns_stick_while_the_kv_survives_even_when_home_is_busier() -> None:
    router, reps, clock = fleet()
    prompt = grow(SYSTEM, 1)
    home = turn(router, "s", prompt)
    for k in range(2, 8):
        for r in reps:
            r.in_flight = 1
        home.in_flight = 3  # busier than every other replica, within the bounded-load limit
        clock.t += 30.0  # a tool pause
        prompt = grow(prompt, 100 * k)
        assert turn(router, "s", prompt) is home


def test_turn_stays_at_light_load_where_plain_bounded_load_would_move_it() -> None:
    # 8 replicas, the home runs 3 requests and the rest of the fleet 1: the plain limit
    # 4 * (3 + 1) / 8 = 2 removes the home, but leaving it would recompute the session's history.
    router, reps, clock = fleet()
    prompt = grow(SYSTEM, 1)
    home = turn(router, "s", prompt)
    others = [r for r in reps if r is not home]
    for r in reps:
        r.in_flight = 0
    home.in_flight = 3
    others[0].in_flight = 1
    plain = BoundedLoadFilter(4.0)
    req = router.request_info("m", block_hashes=grow(prompt, 100), session_id="s", max_tokens=16)
    assert home not in plain.filter(req, reps)
    clock.t += 30.0
    prompt = grow(prompt, 100)
    assert turn(router, "s", prompt) is home
    # A sessionless request sees the plain rule.
    anon = router.request_info("m", block_hashes=prompt, max_tokens=16)
    assert list(SessionBoundedLoadFilter(4.0).filter(anon, reps)) == list(plain.filter(anon, reps))


def test_turn_moves_when_home_is_saturated() -> None:
    router, _reps, _ = fleet()
    prompt = grow(SYSTEM, 1)
    home = turn(router, "s", prompt)
    home.in_flight = 40  # far beyond the bounded-load limit of 8 replicas
    assert turn(router, "s", grow(prompt, 200)) is not home


def test_turn_moves_when_events_show_its_blocks_gone() -> None:
    router, _reps, clock = fleet()
    prompt = grow(SYSTEM, 1)
    home = turn(router, "s", prompt)
    prompt = grow(prompt, 100)
    assert turn(router, "s", prompt) is home
    # the engine evicted the session's own blocks during the pause (BlockRemoved); the shared
    # system prompt is still everywhere
    for _ in range(2):  # one BlockRemoved per stored copy (both turns stored the first part)
        router.index.remove(home.id, prompt[len(SYSTEM) :])
    clock.t += 60.0  # a tool pause
    home.in_flight = 1  # and home is no longer the idlest: nothing keeps the session there
    req = router.request_info("m", block_hashes=grow(prompt, 300), session_id="s")
    chosen = router.select(req)
    assert req.session_keep == 0.0
    assert chosen is not home


def test_without_events_the_pause_is_judged_by_turnover() -> None:
    router, _reps, _clock = fleet(events=False)
    tracker = router.sessions
    assert tracker is not None
    prompt = grow(SYSTEM, 1)
    home = turn(router, "s", prompt, confirm=False)
    req = router.request_info("m", block_hashes=grow(prompt, 100), session_id="s")
    router.select(req)
    assert req.session_keep == 1.0
    tracker.meter.add(home.id, 95.0)  # the home wrote 95 of its 100 blocks since: mostly evicted
    req = router.request_info("m", block_hashes=grow(prompt, 100), session_id="s")
    router.select(req)
    assert 0.0 < req.session_keep < 1.0
    tracker.meter.add(home.id, 100.0)
    req = router.request_info("m", block_hashes=grow(prompt, 100), session_id="s")
    router.select(req)
    assert req.session_keep == 0.0


def test_close_releases_the_session() -> None:
    router, _reps, _ = fleet()
    turn(router, "s", grow(SYSTEM, 1))
    tracker = router.sessions
    assert tracker is not None and "s" in tracker.table
    assert tracker.close("s")
    assert "s" not in tracker.table


def test_keyless_turns_are_one_inferred_session() -> None:
    router, reps, _ = fleet()
    prompt = grow(SYSTEM, 1)
    home = turn(router, None, prompt)
    for k in range(2, 6):
        for r in reps:
            r.in_flight = 1
        home.in_flight = 3
        prompt = grow(prompt, 100 * k)
        req = router.request_info("m", block_hashes=prompt, max_tokens=16)
        rep = router.select(req)
        assert req.session_id is not None and req.session_id.startswith("~")
        assert rep is home
        router.finish(router.dispatch(req, rep))
        router.index.store(rep.id, prompt)


def test_unknown_key_adopts_the_replica_its_events_show() -> None:
    # Another router replica served the first turns: this router never saw the key, but the
    # engines' KV events show where the prompt lives.
    router, reps, _ = fleet()
    prompt = grow(grow(SYSTEM, 1, 20), 50)
    other = reps[3]
    router.index.store(other.id, prompt)
    req = router.request_info("m", block_hashes=grow(prompt, 300), session_id="from-b")
    assert router.select(req) is other
    assert req.session_home == other.slot


# ---- admission priority -------------------------------------------------------------------------


async def test_priority_reorders_the_admission_queue() -> None:
    adm = Admission(max_in_flight=1, max_queue=10, queue_timeout_s=5)
    await adm.acquire()
    order: list[str] = []

    async def waiter(name: str, prio: int) -> None:
        await adm.acquire(prio)
        order.append(name)
        adm.release()

    tasks = [
        asyncio.create_task(waiter(n, p)) for n, p in (("low", 5), ("default", 0), ("urgent", -3), ("d2", 0))
    ]
    await asyncio.sleep(0)
    assert adm.queued == 4
    adm.release()
    await asyncio.gather(*tasks)
    assert order == ["urgent", "default", "d2", "low"]
    assert adm.in_flight == 0 and adm.queued == 0


def test_ids_are_replica_ids() -> None:
    assert ReplicaId("r0") == "r0"


# ---- the request path's session glue ----------------------------------------------------------


def test_request_path_close_and_per_replica_body() -> None:
    from router.http.sessions import finish_session, session_request
    from router.sessions.config import SessionsConfig

    router, reps, _ = fleet()
    tracker = router.sessions
    assert tracker is not None
    cfg = SessionsConfig(priority_replicas=[reps[1].id])
    raw = json.dumps(
        {
            "model": "m",
            "prompt": "x",
            "nvext": {
                "session_control": {"session_id": "agent", "action": "close"},
                "agent_hints": {"priority": 2, "osl": 40},
            },
        }
    ).encode()
    req = router.request_info("m", block_hashes=grow(SYSTEM, 1))
    hints, body_for = session_request(cfg, req, b"", raw)
    assert req.session_id == "agent" and req.max_tokens == 40
    assert body_for is not None
    assert json.loads(body_for(reps[0])) == {"model": "m", "prompt": "x"}
    assert json.loads(body_for(reps[1])) == {"model": "m", "prompt": "x", "priority": -2}
    rep = router.select(req)
    router.finish(router.dispatch(req, rep))
    assert "agent" in tracker.table
    finish_session(router, hints, req)
    assert "agent" not in tracker.table
