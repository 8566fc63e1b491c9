"""KV events: golden bytes from a real vLLM 0.32, every shipped shape, sequence rules, ZMQ."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
import zmq
import zmq.asyncio
from prometheus_client import CollectorRegistry

from router.hashing import hash_token_blocks, model_seed
from router.kv import wire as kv_wire
from router.kv.decode import (
    AllBlocksClearedView,
    BlockRemovedView,
    BlockStoredView,
    DecodeError,
    decode_batch,
)
from router.kv.metrics import KVEventMetrics
from router.kv.sources import EventSource, resolve_event_source
from router.kv.stream import ReplicaEvents
from router.kv.subscriber import KVEventManager
from router.types import ReplicaId, Tier
from tests.support.kv_fixtures import (
    FakeIndex,
    LoopbackPublisher,
    capture_frames,
    check_consistent,
    payload,
    removed,
    seq8,
    stored,
    wait_for,
)

R = ReplicaId("r1")
MODEL = "tiny"


def make(index: FakeIndex | None = None, **kw: object) -> tuple[ReplicaEvents, FakeIndex, CollectorRegistry]:
    idx = index if index is not None else FakeIndex()
    reg = CollectorRegistry()
    ev = ReplicaEvents(R, idx, model=MODEL, metrics=KVEventMetrics(reg), **kw)  # type: ignore[arg-type]
    return ev, idx, reg


def sample(reg: CollectorRegistry, name: str, **labels: str) -> float:
    v = reg.get_sample_value(name, labels)
    return 0.0 if v is None else v


def H(tokens: list[int], bs: int = 4, model: str = MODEL, salt: str | None = None) -> list[int]:
    return hash_token_blocks(tokens, bs, model_seed(model, salt))


# ---------------------------------------------------------------------------------------------
# Golden capture (vLLM 0.32, real bytes)


def test_golden_capture_decodes_every_frame_with_exact_counts() -> None:
    frames = capture_frames()
    assert len(frames) == 25
    n_stored_ev = n_stored = n_removed = 0
    for topic, _sq, data in frames:
        assert topic == b"kv-events"
        b = decode_batch(data)
        assert not b.arrays and b.unknown == 0
        # Cross-check against a schema-free decode of the same bytes.
        plain = msgspec.msgpack.decode(data)
        assert isinstance(plain, list) and len(plain) == 3 and plain[0] == b.ts
        assert [e["type"] for e in plain[1]] == [type(e).__name__.replace("View", "") for e in b.events]
        for e, p in zip(b.events, plain[1], strict=True):
            assert e.block_hashes == p["block_hashes"]  # type: ignore[union-attr]
            if isinstance(e, BlockStoredView):
                n_stored_ev += 1
                n_stored += len(e.block_hashes)
                assert e.token_ids == p["token_ids"] and e.block_size == 32
                assert len(e.token_ids) == 32 * len(e.block_hashes)
            else:
                n_removed += len(e.block_hashes)  # type: ignore[union-attr]
    assert (n_stored_ev, n_stored, n_removed) == (19, 255, 161)


def test_golden_capture_applies_and_chains_like_the_router_hashes_prompts() -> None:
    ev, idx, reg = make(block_size=32)
    prefix_of: dict[int, list[int]] = {}  # engine hash -> every token up to and including it
    parents_seen = 0
    for topic, sq, data in capture_frames():
        assert ev.handle_frames([topic, sq, data]) is None
        for e in decode_batch(data).events:
            if not isinstance(e, BlockStoredView):
                continue
            if e.parent_block_hash is None:
                prefix: list[int] = []
            else:
                parents_seen += 1
                prefix = prefix_of[e.parent_block_hash]  # type: ignore[index]
            salt = "tenantA" if e.extra_keys and e.extra_keys[0] == ["tenantA"] else None
            for i, eh in enumerate(e.block_hashes):
                full = prefix + e.token_ids[: (i + 1) * 32]
                prefix_of[eh] = full  # type: ignore[index]
                # A request whose prompt is `full` hashes to exactly what the event confirmed.
                assert ev.router_hash(eh) == H(full, 32, salt=salt)[-1]
        check_consistent(ev, idx)
    assert parents_seen == 9
    st = ev.stats
    assert (st.last_seq, st.batches, st.gaps, st.orphans, st.decode_errors) == (24, 25, 0, 0, 0)
    assert (st.blocks_stored, st.blocks_removed) == (255, 161)
    assert len(idx.held(R)) == 94  # the 96-block cache, minus what the last batches freed
    assert sample(reg, "kvrouter_kv_events_blocks_stored_total") == 255
    assert sample(reg, "kvrouter_kv_events_events_total", type="BlockRemoved") == 161
    assert sample(reg, "kvrouter_kv_events_block_size_mismatch_total") == 0


def test_golden_cache_salt_seeds_the_chain_and_isolates_it() -> None:
    ev, _idx, _ = make()
    frames = capture_frames()
    for f in frames:
        ev.handle_frames(list(f))
    last = decode_batch(frames[24][2]).events[-1]
    assert isinstance(last, BlockStoredView) and last.extra_keys is not None
    assert last.extra_keys[0] == ["tenantA"] and last.extra_keys[1:] == [None] * 23
    salted = [ev.router_hash(h) for h in last.block_hashes]
    assert salted == H(last.token_ids, 32, salt="tenantA")
    assert set(salted).isdisjoint(H(last.token_ids, 32))


def test_golden_reencoded_as_legacy_arrays_and_map_batches_gives_the_same_index() -> None:
    frames = capture_frames()
    wire = msgspec.msgpack.Decoder(kv_wire.KVEventBatch)
    results = []
    for shape in ("golden", "legacy", "map"):
        ev, idx, _ = make()
        for topic, sq, data in frames:
            b = wire.decode(data)
            if shape == "legacy":
                data = kv_wire.encode_batch(b.ts, b.events, b.data_parallel_rank, legacy=True)
                assert decode_batch(data).arrays
            elif shape == "map":
                data = msgspec.msgpack.encode(
                    {"ts": b.ts, "events": b.events, "data_parallel_rank": b.data_parallel_rank}
                )
                assert data[0] == 0x83
            ev.handle_frames([topic, sq, data])
        check_consistent(ev, idx)
        results.append(dict(idx.counts))
    assert results[0] == results[2]
    # Legacy events carry no extra_keys: the salted prompt (24 blocks) hashes like its unsalted
    # twin, so those keys are held twice; the number of confirmed copies is unchanged.
    assert sum(results[1].values()) == sum(results[0].values()) == 94
    assert len(results[1]) == 94 - 24


# ---------------------------------------------------------------------------------------------
# Shapes


def test_handwritten_legacy_five_field_event_with_u64_hash() -> None:
    # [1.5, [["BlockStored", [1, 2**64-1], nil, [1,2,3,4,5,6,7,8], 4, nil]], 0]
    golden = bytes.fromhex(
        "93cb3ff80000000000009196ab426c6f636b53746f7265649201cfffffffffffffffffc098010203040506070804c000"
    )
    b = decode_batch(golden)
    assert b.ts == 1.5 and b.arrays
    (e,) = b.events
    assert isinstance(e, BlockStoredView)
    assert e.block_hashes == [1, 2**64 - 1] and e.medium is None and e.lora_name is None
    ev, idx, _ = make()
    ev.on_message(0, golden)
    assert idx.held(R) == set(H(list(range(1, 9))))
    # ["BlockRemoved", [18446744073709551615]] handwritten too
    rm = bytes.fromhex("93cb3ff80000000000009192ac426c6f636b52656d6f76656491cfffffffffffffffff00")
    ev.on_message(1, rm)
    assert idx.held(R) == {H(list(range(1, 9)))[0]}
    check_consistent(ev, idx)


def test_map_batch_without_dp_rank_and_two_element_array_batch() -> None:
    ev_map = msgspec.msgpack.encode({"events": [stored([7], [1, 2, 3, 4])], "ts": 3.0, "extra": {"x": 1}})
    assert decode_batch(ev_map).events[0].block_hashes == [7]  # type: ignore[union-attr]
    two = msgspec.msgpack.encode([3.0, [removed([7])]])
    assert isinstance(decode_batch(two).events[0], BlockRemovedView)


def test_bytes_hashes_store_chain_and_remove() -> None:
    a, b = b"\x01" * 32, b"\x02" * 32
    ev, idx, _ = make()
    ev.on_message(0, payload([stored([a], [1, 2, 3, 4])]))
    ev.on_message(1, payload([stored([b], [5, 6, 7, 8], parent=a)]))
    assert idx.held(R) == set(H([1, 2, 3, 4, 5, 6, 7, 8]))
    ev.on_message(2, payload([removed([a, b])]))
    assert idx.held(R) == set()
    check_consistent(ev, idx)


def test_u64_hashes_above_i64_and_parent_lookup() -> None:
    big = [2**64 - 1, 2**63, 2**63 + 12345]
    ev, idx, _ = make()
    ev.on_message(0, payload([stored(big[:2], list(range(8)))]))
    ev.on_message(1, payload([stored(big[2:], [9, 9, 9, 9], parent=big[1])]))
    assert ev.router_hash(big[2]) == H([*range(8), 9, 9, 9, 9])[-1]
    check_consistent(ev, idx)


def test_unknown_fields_and_unknown_event_types_are_skipped_and_counted() -> None:
    events = [
        {
            "type": "BlockStored",
            "block_hashes": [1],
            "parent_block_hash": None,
            "token_ids": [1, 2, 3, 4],
            "block_size": 4,
            "lora_id": None,
            "medium": "GPU",
            "lora_name": None,
            "future": {"a": [1]},
        },
        {"type": "BlockPinned", "block_hashes": [1], "why": "new in vLLM 0.99"},
        ["BlockTouched", 1, 2],
        ["BlockRemoved", [1], "GPU", 0, "local", "own", "extra"],
    ]
    data = msgspec.msgpack.encode([5.0, events, 0])
    b = decode_batch(data)
    assert b.unknown == 2 and [type(e).__name__ for e in b.events] == [
        "BlockStoredView",
        "_BlockRemovedArray",
    ]
    ev, idx, reg = make()
    ev.on_message(0, data)
    assert sample(reg, "kvrouter_kv_events_events_total", type="unknown") == 2
    assert sample(reg, "kvrouter_kv_events_blocks_removed_total") == 1
    assert ev.stats.decode_errors == 0 and idx.counts == {}


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        b"\x93\xcb",  # truncated
        msgspec.msgpack.encode([1.0, [{"type": "BlockStored", "block_hashes": "nope"}], 0]),
        msgspec.msgpack.encode([1.0, [{"block_hashes": [1]}], 0]),  # no tag
        msgspec.msgpack.encode([1.0, [["BlockStored", [1], None, [-1], 1, None]], 0]),  # token < 0
        msgspec.msgpack.encode(["x", [], 0]),
        msgspec.msgpack.encode([1.0, [], 0]) + b"\x00",  # trailing bytes
        msgspec.msgpack.encode(42),
    ],
)
def test_malformed_payloads_raise_decode_error_only(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_batch(data)


def test_malformed_payload_is_counted_dropped_and_makes_a_holding_replica_uncertain() -> None:
    ev, idx, reg = make()
    ev.on_message(0, payload([stored([1], [1, 2, 3, 4])]))
    assert ev.handle_frames([b"t", b"short", b"x"]) is None
    assert ev.handle_frames([b"t", seq8(1), b"\xc1garbage"]) is None
    assert sample(reg, "kvrouter_kv_events_decode_errors_total", replica=R) == 2
    assert ev.stats.last_seq == 1 and ev.uncertain
    assert sample(reg, "kvrouter_kv_events_uncertain", replica=R) == 1
    ev.on_message(2, payload([stored([2], [5, 6, 7, 8], parent=1)]))  # stream goes on
    assert ev.stats.gaps == 0 and len(idx.held(R)) == 2


def test_inconsistent_token_count_skips_only_that_event() -> None:
    ev, idx, reg = make()
    ev.on_message(0, payload([stored([1, 2], [1, 2, 3, 4]), stored([3], [9, 9, 9, 9])]))
    assert idx.held(R) == set(H([9, 9, 9, 9]))
    assert sample(reg, "kvrouter_kv_events_decode_errors_total", replica=R) == 1


# ---------------------------------------------------------------------------------------------
# Mapping rules


def test_orphan_parent_is_counted_and_never_guessed() -> None:
    ev, idx, reg = make()
    ev.on_message(0, payload([stored([5, 6], list(range(8)), parent=999)]))
    assert idx.counts == {} and ev.stats.orphans == 2
    assert sample(reg, "kvrouter_kv_events_orphans_total") == 2


def test_medium_maps_to_tier_and_removal_is_per_tier() -> None:
    ev, idx, _ = make()
    ev.on_message(
        0, payload([stored([1], [1, 2, 3, 4], medium="GPU"), stored([1], [1, 2, 3, 4], medium="CPU")])
    )
    ev.on_message(
        1, payload([stored([2], [1, 1, 1, 1], medium=None), stored([3], [2, 2, 2, 2], medium="DISK")])
    )
    assert idx.held(R, Tier.GPU) == set(H([1, 2, 3, 4]) + H([1, 1, 1, 1]))
    assert idx.held(R, Tier.CPU) == set(H([1, 2, 3, 4]) + H([2, 2, 2, 2]))
    ev.on_message(2, payload([removed([1], medium="CPU")]))
    assert idx.held(R, Tier.CPU) == set(H([2, 2, 2, 2]))
    assert ev.router_hash(1) is not None  # still on GPU
    check_consistent(ev, idx)


def test_duplicate_stores_are_refcounted_like_vllm_emits_them() -> None:
    ev, idx, _ = make()
    ev.on_message(0, payload([stored([1], [1, 2, 3, 4])]))
    # two copies of a child block (two requests computed it at once): two removals retract it
    ev.on_message(1, payload([stored([2], [5, 6, 7, 8], parent=1), stored([2], [5, 6, 7, 8], parent=1)]))
    child = set(H([1, 2, 3, 4, 5, 6, 7, 8])) - set(H([1, 2, 3, 4]))
    ev.on_message(2, payload([removed([2])]))
    assert child <= idx.held(R)
    ev.on_message(3, payload([removed([2])]))
    assert idx.held(R) == set(H([1, 2, 3, 4])) and ev.router_hash(2) is None
    check_consistent(ev, idx)


def test_parentless_restore_of_held_blocks_is_a_reannouncement_not_a_copy() -> None:
    # kv_cache_report_mode="full" re-announces a reused prefix from block 0 with no later
    # BlockRemoved: one eviction must retract it (a genuine block-0 duplicate is then forgotten
    # one removal early: a missed hit, never a false one)
    ev, idx, _ = make()
    ev.on_message(0, payload([stored([1], [1, 2, 3, 4]), stored([1], [1, 2, 3, 4])]))
    ev.on_message(1, payload([removed([1])]))
    assert idx.held(R) == set() and ev.router_hash(1) is None
    check_consistent(ev, idx)


def test_lora_name_is_the_model_and_multimodal_keys_are_not_confirmed() -> None:
    ev, idx, reg = make()
    toks = list(range(12))
    ev.on_message(
        0, payload([stored([1, 2, 3], toks, lora_name="sql", extra_keys=[["sql"], ["sql"], ["sql"]])])
    )
    assert idx.held(R) == set(H(toks, model="sql"))
    ev.on_message(1, payload([stored([4, 5], toks[:8], extra_keys=[None, [["img", 0]]])]))
    assert ev.router_hash(4) == H(toks[:4])[0] and ev.router_hash(5) is None
    ev.on_message(2, payload([stored([6], toks[:4], lora_id=3)]))  # legacy LoRA without a name
    assert ev.router_hash(6) is None
    assert sample(reg, "kvrouter_kv_events_unmodeled_blocks_total") == 2
    # salt together with a LoRA: vLLM orders lora + mm + salt
    ev.on_message(3, payload([stored([7], toks[:4], lora_name="sql", extra_keys=[["sql", "t1"]])]))
    assert ev.router_hash(7) == H(toks[:4], model="sql", salt="t1")[0]


def test_block_size_mismatch_is_counted_but_still_hashed_with_the_event_size() -> None:
    ev, idx, reg = make(block_size=16)
    ev.on_message(0, payload([stored([1, 2], list(range(8)), bs=4)]))
    assert idx.held(R) == set(H(list(range(8)), 4))
    assert sample(reg, "kvrouter_kv_events_block_size_mismatch_total") == 1


def test_lru_capacity_evicts_from_map_and_index_together() -> None:
    ev, idx, _ = make(capacity=3)
    ev.on_message(0, payload([stored([1, 2], list(range(8)))]))
    ev.on_message(1, payload([stored([3], [7, 7, 7, 7], parent=2)]))  # touches 2 as a parent
    ev.on_message(2, payload([stored([4], [5, 5, 5, 5])]))  # over capacity: 1 is oldest
    assert ev.router_hash(1) is None and ev.router_hash(2) is not None and len(ev) == 3
    ev.on_message(3, payload([removed([1])]))  # unknown now: ignored, never a bad remove
    check_consistent(ev, idx)


def test_all_blocks_cleared_clears_index_map_and_uncertainty() -> None:
    ev, idx, _ = make()
    ev.on_message(0, payload([stored([1], [1, 2, 3, 4])]))
    ev.on_message(5, payload([stored([2], [4, 4, 4, 4])]))
    assert ev.uncertain
    ev.on_message(6, payload([kv_wire.AllBlocksCleared(), stored([3], [3, 3, 3, 3])]))
    assert not ev.uncertain and idx.held(R) == set(H([3, 3, 3, 3])) and len(ev) == 1
    assert (R, None) in idx.clears
    assert isinstance(decode_batch(payload([kv_wire.AllBlocksCleared()])).events[0], AllBlocksClearedView)


# ---------------------------------------------------------------------------------------------
# Sequence rules (no sockets)


def test_gap_without_replay_marks_uncertain_until_pre_gap_entries_are_gone() -> None:
    ev, _idx, reg = make()
    ev.on_message(0, payload([stored([1, 2], list(range(8)))]))
    ev.on_message(3, payload([stored([3], [9, 9, 9, 9])]))  # 1, 2 missed
    assert ev.uncertain and ev.stats.gaps == 1
    assert sample(reg, "kvrouter_kv_events_gaps_total", replica=R) == 1
    ev.on_message(4, payload([removed([3, 1])]))  # a post-gap entry and one suspect
    assert ev.uncertain
    ev.on_message(5, payload([removed([2])]))  # last suspect gone: nothing can be stale
    assert not ev.uncertain and sample(reg, "kvrouter_kv_events_uncertain", replica=R) == 0


def test_gap_on_an_empty_replica_is_not_uncertain() -> None:
    ev, _, _ = make()
    ev.on_message(0, payload([]))
    ev.on_message(9, payload([stored([1], [1, 2, 3, 4])]))
    assert ev.stats.gaps == 1 and not ev.uncertain


def test_restart_seq_back_to_zero_clears_replica() -> None:
    ev, idx, reg = make()
    ev.on_message(0, payload([stored([1], [1, 2, 3, 4])], ts=10.0))
    ev.on_message(1, payload([stored([2], [5, 5, 5, 5])], ts=11.0))
    ev.on_message(0, payload([stored([7], [7, 7, 7, 7])], ts=50.0))  # new process
    assert idx.held(R) == set(H([7, 7, 7, 7])) and ev.stats.last_seq == 0
    assert sample(reg, "kvrouter_kv_events_restarts_total", replica=R) == 1
    check_consistent(ev, idx)


def test_restart_seen_late_is_detected_by_the_batch_clock() -> None:
    ev, idx, _ = make()
    for s in range(6):
        ev.on_message(s, payload([stored([s + 1], [s] * 4)], ts=10.0 + s))
    ev.on_message(2, payload([stored([99], [9] * 4)], ts=100.0))  # joined the new process at 2
    assert ev.stats.restarts == 1 and idx.held(R) == set(H([9] * 4))


def test_duplicate_with_old_clock_is_stale_not_a_restart() -> None:
    ev, idx, reg = make()
    p1 = payload([stored([1], [1, 2, 3, 4])], ts=10.0)
    ev.on_message(0, p1)
    ev.on_message(1, payload([removed([1])], ts=11.0))
    ev.on_message(0, p1)  # replay overlap delivers it again
    assert idx.counts == {} and ev.stats.restarts == 0 and ev.stats.stale == 1
    assert sample(reg, "kvrouter_kv_events_stale_total") == 1


def test_seq_far_below_last_is_a_restart_even_with_an_old_clock() -> None:
    ev, _, _ = make(restart_window=100)
    ev.on_message(500, payload([stored([1], [1, 2, 3, 4])], ts=10.0))
    ev.on_message(3, payload([], ts=1.0))
    assert ev.stats.restarts == 1 and len(ev) == 0


def test_replay_request_then_finish_applies_in_order_and_dedupes() -> None:
    ev, idx, _ = make(replay=True)
    p = [
        payload([stored([1], [1, 2, 3, 4])], ts=1),
        payload([removed([1])], ts=2),
        payload([stored([1], [1, 2, 3, 4])], ts=3),
        payload([stored([2], [5] * 4, parent=1)], ts=4),
    ]
    assert ev.on_message(0, p[0]) is None
    req = ev.on_message(3, p[3])
    assert req is not None and req.start == 1 and len(ev) == 1  # nothing applied yet
    ev.finish_replay(req, [(1, p[1]), (2, p[2]), (3, p[3])], True)
    assert ev.stats.last_seq == 3 and not ev.uncertain and ev.stats.gaps == 0
    assert idx.held(R) == set(H([1, 2, 3, 4, 5, 5, 5, 5]))
    check_consistent(ev, idx)


def test_replay_that_cannot_cover_the_gap_leaves_replica_uncertain() -> None:
    ev, _, _reg = make(replay=True)
    ev.on_message(0, payload([stored([1], [1, 2, 3, 4])], ts=1))
    req = ev.on_message(5, payload([], ts=5))
    assert req is not None
    ev.finish_replay(req, [(4, payload([], ts=4))], True)  # buffer no longer holds 1..3
    assert ev.uncertain and ev.stats.gaps == 1 and ev.stats.last_seq == 5
    ev2, _, reg2 = make(replay=True)
    ev2.on_message(0, payload([stored([1], [1, 2, 3, 4])], ts=1))
    req2 = ev2.on_message(5, payload([], ts=5))
    assert req2 is not None
    ev2.finish_replay(req2, [], False)  # replay endpoint down
    assert ev2.uncertain and sample(reg2, "kvrouter_kv_events_replays_total", result="failed") == 1


def test_late_join_asks_for_backfill_from_zero() -> None:
    ev, idx, _ = make(replay=True)
    req = ev.on_message(7, payload([], ts=7))
    assert req is not None and req.start == 0
    ev.finish_replay(req, [(5, payload([stored([1], [1, 2, 3, 4])], ts=5))], True)  # buffer starts at 5
    assert ev.stats.last_seq == 7 and ev.stats.gaps == 1  # 6 missing: unseen, replica holds 1
    assert idx.held(R) == set(H([1, 2, 3, 4]))


# ---------------------------------------------------------------------------------------------
# Discovery


@pytest.mark.parametrize(
    ("body", "expect"),
    [
        (
            '{"0":{"endpoint":"tcp://*:15557","replay_endpoint":"tcp://*:15657","topic":"kv-events","hwm":1}}',
            [EventSource("tcp://10.1.2.3:15557", "tcp://10.1.2.3:15657", "kv-events", False)],
        ),
        (
            [
                {
                    "data_parallel_rank": 1,
                    "endpoint": "tcp://0.0.0.0:5558",
                    "replay_endpoint": None,
                    "topic": "",
                },
                {"data_parallel_rank": 0, "endpoint": "tcp://[::]:5557", "topic": None},
            ],
            [  # 0.0.0.0 has no "*" or "::": vLLM connects to it, so the router binds it
                EventSource("tcp://10.1.2.3:5557", None, "", False),
                EventSource("tcp://0.0.0.0:5558", None, "", True),
            ],
        ),
        (
            b'{"endpoint":"tcp://10.9.9.9:5557","replay_endpoint":"tcp://*:5657","topic":"t"}',
            [EventSource("tcp://10.9.9.9:5557", "tcp://10.1.2.3:5657", "t", True)],
        ),
        (
            '{"0":{"endpoint":"ipc:///tmp/kv"},"1":{"endpoint":"inproc://x"}}',
            [EventSource("ipc:///tmp/kv", None, "", False)],
        ),
        ("{}", []),
    ],
)
def test_resolve_event_source(body: object, expect: list[EventSource]) -> None:
    assert resolve_event_source("http://10.1.2.3:8000/", body) == expect


def test_resolve_event_source_ipv6_host_and_errors() -> None:
    got = resolve_event_source("http://[fd00::1]:8000", '{"0":{"endpoint":"tcp://*:5557"}}')
    assert got == [EventSource("tcp://[fd00::1]:5557", None, "", False)]
    with pytest.raises(ValueError):
        resolve_event_source("http://h:1", "not json")
    with pytest.raises(ValueError):
        resolve_event_source("http://h:1", "3")


# ---------------------------------------------------------------------------------------------
# ZMQ on loopback


async def test_end_to_end_pub_to_manager_with_golden_frames(zctx: zmq.asyncio.Context) -> None:
    pub = LoopbackPublisher(zctx)
    idx = FakeIndex()
    mgr = KVEventManager(idx, registry=CollectorRegistry())
    try:
        mgr.add(R, pub.endpoint, topic="kv-events", model=MODEL, block_size=32)
        await pub.wait_subscriber()
        frames = capture_frames()
        for _, sq, data in frames:
            await pub.publish(int.from_bytes(sq, "big"), data)
        await wait_for(lambda: (s := mgr.stats(R)) is not None and s.last_seq == 24)
        st = mgr.stats(R)
        assert st is not None and st.connected and st.blocks_stored == 255 and st.gaps == 0
        assert len(idx.held(R)) == 94 and not mgr.is_uncertain(R)
        ev = mgr.events_of(R)
        assert ev is not None
        check_consistent(ev, idx)
    finally:
        await mgr.close()
        await pub.close()


@pytest.mark.parametrize("framing", ["v032", "old"])
async def test_gap_is_filled_by_replay_from_a_real_router(zctx: zmq.asyncio.Context, framing: str) -> None:
    pub = LoopbackPublisher(zctx, framing=framing)
    idx = FakeIndex()
    reg = CollectorRegistry()
    mgr = KVEventManager(idx, registry=reg)
    try:
        mgr.add(R, pub.endpoint, pub.replay_endpoint, model=MODEL)
        await pub.wait_subscriber()
        # cold start: the subscriber first backfills from seq 0 (an empty buffer here)
        await wait_for(lambda: pub.replay_requests == [0])
        await pub.publish(0, payload([stored([1], [1, 2, 3, 4])], ts=1))
        await pub.publish(1, payload([stored([2], [5] * 4, parent=1)], ts=2))
        await pub.publish(2, payload([removed([1, 2])], ts=3), live=False)  # lost on the wire
        await pub.publish(3, payload([stored([3], [6] * 4)], ts=4), live=False)
        await pub.publish(4, payload([stored([4], [7] * 4, parent=3)], ts=5))
        await wait_for(lambda: (s := mgr.stats(R)) is not None and s.last_seq == 4)
        assert pub.replay_requests == [0, 2]
        assert idx.held(R) == set(H([6] * 4 + [7] * 4))
        assert not mgr.is_uncertain(R) and mgr.stats(R).gaps == 0  # type: ignore[union-attr]
        assert sample(reg, "kvrouter_kv_events_replays_total", result="ok") == 2
        await pub.publish(5, payload([removed([4])], ts=6))  # live continues after the replay
        await wait_for(lambda: mgr.stats(R).last_seq == 5)  # type: ignore[union-attr]
        assert idx.held(R) == set(H([6] * 4))
    finally:
        await mgr.close()
        await pub.close()


async def test_gap_without_replay_endpoint_marks_uncertain(zctx: zmq.asyncio.Context) -> None:
    pub = LoopbackPublisher(zctx)
    idx = FakeIndex()
    reg = CollectorRegistry()
    mgr = KVEventManager(idx, registry=reg)
    try:
        mgr.add(R, pub.endpoint, model=MODEL)
        await pub.wait_subscriber()
        await pub.publish(0, payload([stored([1], [1, 2, 3, 4])], ts=1))
        await pub.publish(2, payload([], ts=3))
        await wait_for(lambda: mgr.stats(R).last_seq == 2)  # type: ignore[union-attr]
        assert mgr.is_uncertain(R) and pub.replay_requests == []
        assert sample(reg, "kvrouter_kv_events_gaps_total", replica=R) == 1
        assert sample(reg, "kvrouter_kv_events_uncertain", replica=R) == 1
        mgr.remove(R)
        assert mgr.stats(R) is None and sample(reg, "kvrouter_kv_events_uncertain", replica=R) == 0
    finally:
        await mgr.close()
        await pub.close()


async def test_late_join_backfills_from_replay_buffer(zctx: zmq.asyncio.Context) -> None:
    pub = LoopbackPublisher(zctx)
    for s in range(3):  # published before the router existed
        await pub.publish(s, payload([stored([s + 1], [s] * 4)], ts=s), live=False)
    idx = FakeIndex()
    mgr = KVEventManager(idx, registry=CollectorRegistry())
    try:
        mgr.add(R, pub.endpoint, pub.replay_endpoint, model=MODEL)
        await pub.wait_subscriber()
        await pub.publish(3, payload([removed([1])], ts=3))
        await wait_for(lambda: mgr.stats(R).last_seq == 3)  # type: ignore[union-attr]
        assert pub.replay_requests == [0]
        assert idx.held(R) == set(H([1] * 4) + H([2] * 4))
    finally:
        await mgr.close()
        await pub.close()


async def test_bind_mode_engine_connects_to_the_router(zctx: zmq.asyncio.Context) -> None:
    idx = FakeIndex()
    mgr = KVEventManager(idx, registry=CollectorRegistry())
    pub = zctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.LINGER, 0)
    try:
        mgr.add(R, "tcp://127.0.0.1:*", bind=True, model=MODEL)
        await wait_for(lambda: (s := mgr.stats(R)) is not None and s.connected)
        ep = mgr.stats(R).endpoint  # type: ignore[union-attr]
        assert ep is not None and not ep.endswith(":*")
        pub.connect(ep)
        await asyncio.wait_for(pub.recv(), 3.0)  # the router's subscription arrived
        await pub.send_multipart([b"", seq8(0), payload([stored([1], [1, 2, 3, 4])])])
        await wait_for(lambda: idx.held(R) == set(H([1, 2, 3, 4])))
        mgr.add(R, "tcp://127.0.0.1:*", bind=True, model=MODEL)  # same settings: no-op
        assert mgr.replicas() == [R] and len(idx.held(R)) == 1
    finally:
        pub.close(linger=0)
        await mgr.close()


async def test_bind_conflict_retries_with_backoff_and_close_cancels(zctx: zmq.asyncio.Context) -> None:
    blocker = zctx.socket(zmq.PUB)
    blocker.setsockopt(zmq.LINGER, 0)
    port = blocker.bind_to_random_port("tcp://127.0.0.1")
    mgr = KVEventManager(FakeIndex(), registry=CollectorRegistry(), backoff=(0.01, 0.02))
    try:
        mgr.add(R, f"tcp://127.0.0.1:{port}", bind=True, model=MODEL)
        await wait_for(lambda: len(mgr.stats(R).errors) >= 2)  # type: ignore[union-attr]
        assert not mgr.stats(R).connected  # type: ignore[union-attr]
    finally:
        blocker.close(linger=0)
        await mgr.close()
    with pytest.raises(RuntimeError):
        mgr.add(R, "tcp://127.0.0.1:1", model=MODEL)


# ---------------------------------------------------------------------------------------------
# Against the real PrefixIndex


def test_golden_capture_into_the_real_prefix_index_matches_the_fake() -> None:
    from router.index import PrefixIndex

    real = PrefixIndex(capacity_per_replica=4096)
    slot = real.add_replica(R)
    ev_real = ReplicaEvents(R, real, model=MODEL, metrics=KVEventMetrics(CollectorRegistry()))
    ev_fake, fake, _ = make()
    chains: list[list[int]] = []  # router chain of every stored prompt, from the raw tokens
    for f in capture_frames():
        ev_real.handle_frames(list(f))
        ev_fake.handle_frames(list(f))
        real.check_invariants()
        for e in decode_batch(f[2]).events:
            if isinstance(e, BlockStoredView) and e.parent_block_hash is None:
                salt = "tenantA" if e.extra_keys and e.extra_keys[0] == ["tenantA"] else None
                chains.append(H(e.token_ids, 32, salt=salt))
    held = fake.held(R)
    assert len(held) == 94
    for chain in chains:
        expect = next((i for i, h in enumerate(chain) if h not in held), len(chain))
        gpu, _ = real.match(chain)
        assert gpu[slot] == expect
    assert any(real.match(c)[0][slot] == len(c) for c in chains)  # some prompt fully cached
    # uncertainty reaches the index's own flag (its metrics and the router read it there)
    ev_real.on_message(99, payload([], ts=2e9))
    assert ev_real.uncertain and real.is_uncertain(R)
