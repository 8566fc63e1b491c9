"""Helpers for the KV-event tests: a refcounting fake index, event builders, the golden capture,
and a loopback vLLM-style publisher (XPUB + replay ROUTER). Imported explicitly by the tests."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from router.kv import wire as kv_wire
from router.kv.stream import ReplicaEvents
from router.types import BlockHash, ReplicaId, Tier

GOLDEN = Path(__file__).parent.parent / "router" / "golden"
CAPTURE = GOLDEN / "vllm-0.32-kv-events.json"


def capture_frames() -> list[tuple[bytes, bytes, bytes]]:
    """Every ZMQ message vLLM 0.32 sent in the capture, byte for byte: (topic, seq8, payload)."""
    data = json.loads(CAPTURE.read_text())
    return [tuple(base64.b64decode(x) for x in f) for f in data["frames"]]  # type: ignore[misc]


class FakeIndex:
    """The IndexSink part of PrefixIndex: per-(replica, hash, tier) refcounts, as PrefixIndex's
    index keeps them. Removing an absent entry is recorded, so tests can assert it never happens."""

    def __init__(self) -> None:
        self.counts: dict[tuple[ReplicaId, BlockHash, Tier], int] = {}
        self.bad_removes: list[tuple[ReplicaId, BlockHash, Tier]] = []
        self.clears: list[tuple[ReplicaId, Tier | None]] = []

    def store(
        self,
        replica: ReplicaId,
        hashes: Sequence[BlockHash],
        tier: Tier = Tier.GPU,
        *,
        speculative: bool = False,
    ) -> None:
        assert not speculative
        for h in hashes:
            k = (replica, h, tier)
            self.counts[k] = self.counts.get(k, 0) + 1

    def remove(self, replica: ReplicaId, hashes: Sequence[BlockHash], tier: Tier = Tier.GPU) -> None:
        for h in hashes:
            k = (replica, h, tier)
            n = self.counts.get(k, 0)
            if n == 0:
                self.bad_removes.append(k)
            elif n == 1:
                del self.counts[k]
            else:
                self.counts[k] = n - 1

    def clear(self, replica: ReplicaId, tier: Tier | None = None) -> None:
        self.clears.append((replica, tier))
        for k in [k for k in self.counts if k[0] == replica and (tier is None or k[2] == tier)]:
            del self.counts[k]

    def held(self, replica: str, tier: Tier = Tier.GPU) -> set[int]:
        return {h for (r, h, t) in self.counts if r == replica and t == tier}


def check_consistent(ev: ReplicaEvents, idx: FakeIndex) -> None:
    """The applier's map and the index agree exactly on confirmed copies (a full recount)."""
    expect: dict[tuple[int, Tier], int] = {}
    for ent in ev._map.values():
        for tier, n in ((Tier.GPU, ent[1]), (Tier.CPU, ent[2])):
            if n:
                expect[(ent[0], tier)] = expect.get((ent[0], tier), 0) + n
    got = {(h, t): n for (r, h, t), n in idx.counts.items() if r == ev.replica}
    assert got == expect
    assert not idx.bad_removes
    assert len(ev._map) <= ev.capacity


def stored(
    hashes: list[Any],
    tokens: list[int],
    parent: Any = None,
    bs: int = 4,
    medium: str | None = "GPU",
    lora_name: str | None = None,
    extra_keys: list[Any] | None = None,
    lora_id: int | None = None,
) -> kv_wire.BlockStored:
    return kv_wire.BlockStored(hashes, parent, tokens, bs, lora_id, medium, lora_name, extra_keys)


def removed(hashes: list[Any], medium: str | None = "GPU") -> kv_wire.BlockRemoved:
    return kv_wire.BlockRemoved(hashes, medium)


def payload(events: list[kv_wire.KVEvent], ts: float = 1000.0, legacy: bool = False) -> bytes:
    return kv_wire.encode_batch(ts, events, 0, legacy=legacy)


def seq8(seq: int) -> bytes:
    return kv_wire.seq_bytes(seq)


async def wait_for(cond: Callable[[], bool], timeout: float = 3.0) -> None:
    """Poll a condition on the loop (bounded): loopback ZMQ delivers in milliseconds."""
    for _ in range(int(timeout / 0.005)):
        if cond():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not met in time")


class LoopbackPublisher:
    """A vLLM ZmqEventPublisher in miniature: PUB (as XPUB, to see the subscription arrive and
    dodge the slow-joiner loss) and a replay ROUTER, both on 127.0.0.1 random ports.

    ``framing="v032"`` answers replays as vLLM 0.32 does (``[b"", topic, seq8, payload]``, end
    ``[b"", b"", -1, b""]``); ``"old"`` as older vLLM/SGLang/LMCache (``[b"", seq8, payload]``)."""

    def __init__(self, ctx: zmq.asyncio.Context, topic: bytes = b"kv-events", framing: str = "v032") -> None:
        self.topic = topic
        self.framing = framing
        self.pub = ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.port = self.pub.bind_to_random_port("tcp://127.0.0.1")
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.replay_port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.buffer: list[tuple[int, bytes]] = []
        self.replay_requests: list[int] = []
        self._task = asyncio.get_running_loop().create_task(self._serve_replay())

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    @property
    def replay_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.replay_port}"

    async def wait_subscriber(self) -> None:
        msg = await asyncio.wait_for(self.pub.recv(), 3.0)
        assert msg[:1] == b"\x01"

    async def publish(self, seq: int, data: bytes, live: bool = True) -> None:
        self.buffer.append((seq, data))
        if live:
            await self.pub.send_multipart([self.topic, seq8(seq), data])

    async def _serve_replay(self) -> None:
        while True:
            frames = await self.router.recv_multipart()
            if len(frames) != 3:
                continue
            ident, _, start_b = frames
            start = int.from_bytes(start_b, "big")
            self.replay_requests.append(start)
            for seq, data in self.buffer:
                if seq >= start:
                    if self.framing == "v032":
                        await self.router.send_multipart([ident, b"", self.topic, seq8(seq), data])
                    else:
                        await self.router.send_multipart([ident, b"", seq8(seq), data])
            if self.framing == "v032":
                await self.router.send_multipart([ident, b"", b"", seq8(-1), b""])
            else:
                await self.router.send_multipart([ident, b"", seq8(-1), b""])

    async def close(self) -> None:
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self.pub.close(linger=0)
        self.router.close(linger=0)
