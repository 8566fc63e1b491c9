"""session-affinity earns what the session's own history saves: keep x overlap for a known
session (0 for a key whose requests do not extend each other), and a new session's rendezvous
never sends its first turn behind a queued prefill when a replica has less queued."""

from __future__ import annotations

import random

from router.index import PrefixIndex
from router.replicas.registry import Replica, ReplicaRegistry
from router.routing import Router
from router.scoring.policies import build_policy
from router.scoring.session import SessionAffinityScorer, rendezvous_weight
from router.sessions.tracker import SessionTracker, continuation
from router.types import BlockHash, KeyMode, ReplicaSpec, RequestInfo


def replicas(n: int) -> list[Replica]:
    reg = ReplicaRegistry(PrefixIndex(100))
    return [reg.add(ReplicaSpec(url=f"http://r{i}:8000", name=f"r{i}")) for i in range(n)]


def hashes(*ids: int) -> list[BlockHash]:
    return [BlockHash(i) for i in ids]


def session_req(key: str, home: int, keep: float = 1.0, overlap: float = 1.0) -> RequestInfo:
    r = RequestInfo(model="m", prompt_tokens=64, block_size=16, key_mode=KeyMode.TOKENS)
    r.session_id, r.session_home, r.session_keep, r.session_overlap = key, home, keep, overlap
    return r


# ---- continuation (pure) ------------------------------------------------------------------------


def test_a_prompt_that_extends_the_last_one_continues_it_by_its_share() -> None:
    assert continuation(hashes(1, 2, 3, 4), 2, BlockHash(2)) == 0.5
    assert continuation(hashes(1, 2, 3), 3, BlockHash(3)) == 1.0  # the same prompt again (a retry)


def test_a_prompt_that_shares_a_prefix_but_does_not_extend_is_no_continuation() -> None:
    # same system prompt and user context (blocks 1, 2), a new message: the last tail (3) is not there
    assert continuation(hashes(1, 2, 9, 10), 3, BlockHash(3)) == 0.0
    assert continuation(hashes(1, 2), 3, BlockHash(3)) == 0.0  # shorter than the last prompt
    assert continuation(hashes(1, 2, 3), 0, None) == 0.0  # the last turn had no full block
    assert continuation([], 2, BlockHash(2)) == 0.0


# ---- the scorer (pure) --------------------------------------------------------------------------


def test_known_session_earns_keep_times_overlap_at_home() -> None:
    reps = replicas(4)
    s = SessionAffinityScorer()
    assert s.score(session_req("k", 2, keep=1.0, overlap=0.5), reps) == [0.0, 0.0, 0.5, 0.0]
    assert s.score(session_req("k", 2, keep=0.5, overlap=0.5), reps) == [0.0, 0.0, 0.25, 0.0]


def test_known_key_without_continuation_or_kv_is_neutral() -> None:
    reps = replicas(4)
    s = SessionAffinityScorer()
    assert s.score(session_req("user-7", 1, keep=1.0, overlap=0.0), reps) == [1.0] * 4
    assert s.score(session_req("k", 1, keep=0.0, overlap=1.0), reps) == [1.0] * 4
    assert s.score(session_req("k", -2), reps) == [1.0] * 4  # home gone: the prefix scorers place it
    no_key = session_req("k", 1)
    no_key.session_id = None
    assert s.score(no_key, reps) == [1.0] * 4


def test_new_session_rendezvous_over_all_idle_replicas() -> None:
    reps = replicas(8)
    s = SessionAffinityScorer()
    for key in ("a", "b", "sess-1"):
        out = s.score(session_req(key, -1), reps)
        best = max(range(8), key=lambda i: rendezvous_weight(key, reps[i].id))
        assert out == [1.0 if i == best else 0.0 for i in range(8)]


def test_new_session_never_waits_behind_a_prefill_when_less_is_queued_elsewhere() -> None:
    reps = replicas(8)
    s = SessionAffinityScorer()
    for key in (f"s{i}" for i in range(32)):
        winner = max(range(8), key=lambda i: rendezvous_weight(key, reps[i].id))
        for r in reps:
            r.pending_prefill_tokens = 0
        reps[winner].pending_prefill_tokens = 4096  # the key's rendezvous replica is prefilling
        out = s.score(session_req(key, -1), reps)
        assert out[winner] == 0.0 and sum(out) == 1.0
        free = [i for i in range(8) if i != winner]
        assert out.index(1.0) == max(free, key=lambda i: rendezvous_weight(key, reps[i].id))
    for i, r in enumerate(reps):  # all busy: the least queued
        r.pending_prefill_tokens = 1000 + 100 * ((i * 5) % 8)
    assert s.score(session_req("x", -1), reps) == [1.0 if i == 0 else 0.0 for i in range(8)]


# ---- through the router -------------------------------------------------------------------------

SYSTEM = [BlockHash(1000 + i) for i in range(8)]


def fleet(n: int = 4) -> tuple[Router, list[Replica]]:
    index = PrefixIndex(1000, speculative_ttl_s=10)
    reg = ReplicaRegistry(index)
    reps = []
    for i in range(n):
        r = reg.add(ReplicaSpec(url=f"http://r{i}", name=f"r{i}", models=("m",)))
        r.has_kv_events = True
        r.num_gpu_blocks = 100
        reps.append(r)
        index.store(r.id, SYSTEM)
    router = Router(
        index,
        reg,
        build_policy("cache_aware", rng=random.Random(0)),
        block_size=16,
        sessions=SessionTracker(),
    )
    return router, reps


def send(router: Router, key: str, blocks: list[BlockHash]) -> tuple[Replica, RequestInfo]:
    req = router.request_info("m", block_hashes=blocks, session_id=key, max_tokens=16)
    rep = router.select(req)
    router.finish(router.dispatch(req, rep))
    router.index.store(rep.id, blocks)
    return rep, req


def test_a_user_key_on_single_turn_requests_is_not_pinned_to_a_busier_home() -> None:
    router, reps = fleet()
    ctx = SYSTEM + hashes(50)  # the user's context, then one fresh message block per request
    home, _ = send(router, "user-1", ctx + hashes(60))
    for r in reps:
        r.in_flight = 0
    home.in_flight = 1  # busier than the rest
    chosen, req = send(router, "user-1", ctx + hashes(61))
    assert req.session_home == home.slot and req.session_overlap == 0.0
    assert chosen is not home


def test_a_conversation_key_still_sticks_to_its_busier_home() -> None:
    router, reps = fleet()
    prompt = SYSTEM + hashes(50, 51)
    home, _ = send(router, "chat-1", prompt)
    for k in range(2, 6):
        for r in reps:
            r.in_flight = 0
        home.in_flight = 2
        prompt = prompt + hashes(100 * k, 100 * k + 1)
        chosen, req = send(router, "chat-1", prompt)
        assert req.session_overlap > 0.5
        assert chosen is home
