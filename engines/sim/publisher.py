"""KV-cache event publisher of the simulated engine: vLLM's ZMQ PUB + ROUTER replay, on asyncio.

Wire (pinned to vllm/distributed/kv_events.py, ``ZmqEventPublisher``):

* PUB multipart ``[topic utf-8, seq 8-byte big-endian, msgpack KVEventBatch]``; ``seq`` counts
  batches from 0 per publisher (a restart starts again at 0).
* Bind or connect exactly like vLLM (``router.kv.wire.publisher_binds``): bind when the endpoint
  contains ``*`` or ``::`` or is ``ipc://``/``inproc://``, otherwise connect (so a router SUB that
  binds can collect from many engines; ``tcp://0.0.0.0:P`` connects too). ``bind=True`` overrides this for a loopback-only fixed port, which vLLM cannot express.
* Replay: a ROUTER socket, always bound. A DEALER sends ``[b"", start_seq 8-byte BE]`` and gets
  ``[b"", seq8, payload]`` for every buffered batch with ``seq >= start`` then the end marker
  ``[b"", (-1 as signed 8 bytes), b""]``. vLLM's replay frames carry **no topic**; requests of any
  other frame count are ignored, as vLLM does.
* The replay buffer keeps the last ``buffer_steps`` *sent* batches, bytes exactly as published.

Everything runs on the event loop that owns the engine: ``publish`` is a non-blocking send (a PUB
socket drops at its high-water mark rather than block) and the replay server is one task.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import pickle
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, cast

import msgspec
import zmq
import zmq.asyncio

from router.kv.wire import (
    BlockRemoved,
    BlockStored,
    EngineHash,
    KVEvent,
    encode_batch,
    publisher_binds,
    seq_bytes,
)

log = logging.getLogger(__name__)

# -- vLLM's block hash (``--prefix-caching-hash-algo sha256``, the default) ---------------------
# h_i = sha256(pickle((h_{i-1} digest, tuple(block tokens), extra_keys), protocol 5)); the first
# parent is NONE_HASH = sha256(pickle("vllm-none-hash")) when PYTHONHASHSEED is unset. Chaining uses
# the full 32-byte digest; events carry its low 64 bits as an int
# (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1, the default) or the raw digest. About 2.5 us per block.


def sha256_hash(obj: object) -> bytes:
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()


NONE_HASH: bytes = sha256_hash("vllm-none-hash")


def block_hash(parent: bytes | None, tokens: tuple[int, ...], extra_keys: object = None) -> bytes:
    return sha256_hash((NONE_HASH if parent is None else parent, tokens, extra_keys))


def block_hash_chain(
    tokens: list[int] | tuple[int, ...], block_size: int, parent: bytes | None = None
) -> list[bytes]:
    """Digests of the full blocks of ``tokens``, chained from ``parent`` (None: prompt start)."""
    out: list[bytes] = []
    h = parent
    for i in range(len(tokens) // block_size):
        h = block_hash(h, tuple(tokens[i * block_size : (i + 1) * block_size]))
        out.append(h)
    return out


def external_hash(digest: bytes, use_int: bool = True) -> EngineHash:
    """The form a hash takes in KV events: low 64 bits big-endian as int, or the raw digest."""
    return int.from_bytes(digest, "big") & 0xFFFF_FFFF_FFFF_FFFF if use_int else digest


END_SEQ = seq_bytes(-1)  # replay end marker
DEFAULT_TOPIC = "kv-events"
DEFAULT_BUFFER_STEPS = 10_000  # vLLM KVEventsConfig.buffer_steps
DEFAULT_HWM = 100_000  # vLLM KVEventsConfig.hwm
_SNDMORE_NOBLOCK = zmq.SNDMORE | zmq.NOBLOCK
# The replay task wakes at least this often to notice close(); it never spins.
_REPLAY_POLL_MS = 200


def public_endpoint(endpoint: str, host: str = "127.0.0.1") -> str:
    """Where a subscriber should connect to reach a bound endpoint (``*`` / ``0.0.0.0`` -> host)."""
    if endpoint.startswith("tcp://"):
        rest = endpoint[len("tcp://") :]
        addr, _, port = rest.rpartition(":")
        if addr in ("*", "0.0.0.0", "[::]", "::"):
            addr = host
        return f"tcp://{addr}:{port}"
    return endpoint


class KVEventPublisher:
    """One engine's (one DP rank's) KV-event PUB socket plus its optional replay ROUTER.

    Bounds: the replay buffer holds at most ``buffer_steps`` batches (oldest dropped first); the PUB
    socket queues at most ``hwm`` messages per subscriber (ZMQ drops beyond that, like vLLM).
    """

    def __init__(
        self,
        endpoint: str,
        *,
        replay_endpoint: str | None = None,
        topic: str = DEFAULT_TOPIC,
        buffer_steps: int = DEFAULT_BUFFER_STEPS,
        hwm: int = DEFAULT_HWM,
        legacy: bool = False,
        dp_rank: int = 0,
        bind: bool | None = None,
        ctx: zmq.asyncio.Context | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if buffer_steps <= 0:
            raise ValueError(f"buffer_steps must be positive (current value: {buffer_steps})")
        self.topic = topic
        self.legacy = legacy
        self.dp_rank = dp_rank
        self.buffer_steps = buffer_steps
        self.hwm = hwm
        self._topic_bytes = topic.encode("utf-8")
        self._clock = clock
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._seq = 0
        self.configured_endpoint = endpoint
        self.binds = publisher_binds(endpoint) if bind is None else bind

        self._pub: zmq.asyncio.Socket = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        # Publishing goes through a plain (synchronous) view of the same socket: a PUB send never
        # blocks (it drops at the HWM), so the asyncio wrapper's per-send Future and poller
        # bookkeeping bought nothing and cost about half of each send (3 frames, NOBLOCK).
        self._pub_sync: zmq.SyncSocket = zmq.Socket.shadow(self._pub.underlying)
        if self.binds:
            self._pub.bind(endpoint)
            self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        else:
            self._pub.connect(endpoint)
            self.endpoint = endpoint

        self._replay: zmq.asyncio.Socket | None = None
        self.replay_endpoint: str | None = None
        self.configured_replay_endpoint = replay_endpoint
        if replay_endpoint is not None:
            self._replay = self._ctx.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.bind(replay_endpoint)
            self.replay_endpoint = self._replay.getsockopt_string(zmq.LAST_ENDPOINT)
        self._replay_task: asyncio.Task[None] | None = None
        self._closed = False
        self.batches_sent = 0

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Start serving replay requests (needs a running loop)."""
        if self._replay is not None and self._replay_task is None:
            self._replay_task = asyncio.get_running_loop().create_task(
                self._serve_replay(), name=f"kv-replay:{self.replay_endpoint}"
            )

    async def close(self) -> None:
        self._closed = True
        if self._replay_task is not None:
            self._replay_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replay_task
            self._replay_task = None
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)

    @property
    def next_seq(self) -> int:
        return self._seq

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def reset(self) -> None:
        """A process restart: sequence back to 0, replay buffer empty, sockets kept."""
        self._seq = 0
        self._buffer.clear()

    # -- publishing ----------------------------------------------------------------------------
    def encode(self, events: list[KVEvent], ts: float | None = None) -> bytes:
        return encode_batch(self._clock() if ts is None else ts, events, self.dp_rank, legacy=self.legacy)

    def publish(self, events: list[KVEvent], ts: float | None = None) -> int:
        """Send one batch (one engine step); returns its sequence number."""
        return self.publish_payload(self.encode(events, ts))

    def take_seq(self) -> int:
        """Reserve the next sequence number (faults use this to send batches out of order)."""
        seq = self._seq
        self._seq += 1
        return seq

    def publish_payload(self, payload: bytes, seq: int | None = None) -> int:
        """Send raw payload bytes under ``seq`` (default: the next one). Buffered for replay."""
        if self._closed:
            raise RuntimeError("publisher is closed")
        if seq is None:
            seq = self.take_seq()
        pub = self._pub_sync
        try:
            pub.send(self._topic_bytes, _SNDMORE_NOBLOCK)
            pub.send(seq_bytes(seq), _SNDMORE_NOBLOCK)
            pub.send(payload, zmq.NOBLOCK)
        except zmq.Again:
            # At the high-water mark ZMQ drops, as vLLM's PUB does; the seq gap tells subscribers.
            log.warning("kv-events: PUB queue full, dropped batch seq=%d", seq)
        self._buffer.append((seq, payload))
        self.batches_sent += 1
        return seq

    # -- replay --------------------------------------------------------------------------------
    def replay_frames(self, start_seq: int) -> list[tuple[bytes, bytes]]:
        """(seq8, payload) for every buffered batch with seq >= start_seq, in buffer order."""
        return [(seq_bytes(s), p) for s, p in self._buffer if s >= start_seq]

    async def _serve_replay(self) -> None:
        sock = self._replay
        assert sock is not None
        while not self._closed:
            # flags default to POLLIN (pyzmq's _future.pyi declares only the timeout of this poll)
            if not await sock.poll(_REPLAY_POLL_MS):
                continue
            frames: list[Any] = await sock.recv_multipart()
            if len(frames) != 3:
                log.warning("kv-events: invalid replay request with %d frames", len(frames))
                continue
            client_id, _empty, start = frames
            start_seq = int.from_bytes(start, "big")
            # Snapshot first: publishing may append while we await sends.
            for seq8, payload in self.replay_frames(start_seq):
                await sock.send_multipart((client_id, b"", seq8, payload))
            await sock.send_multipart((client_id, b"", END_SEQ, b""))


class EngineEventHashes:
    """KV events with the engine's own block identity (``--kv-event-hashes engine``): its xxh3
    chain values as u64 ints, or as their 8 big-endian bytes when the replica publishes digests.
    Consistent per block and chained like vLLM's, so "the same sequence of hashes modulo the hash
    function" holds, and a subscriber that re-hashes each ``BlockStored``'s ``token_ids`` (kvrouter
    does) sees no difference. What it saves is ``VllmEventHashes``' pickle + sha256 per stored
    block: about a sixth of a loaded 16-replica sim's CPU (71 -> 59-61 us per token; docs/sim.md, round 4)."""

    algo = "kvrouter-xxh3"  # vllm:cache_config_info's prefix_caching_hash_algo: none of vLLM's

    def __init__(self, *, as_bytes: bool = False) -> None:
        self.as_bytes = as_bytes

    def clear(self) -> None:
        """Stateless: nothing to forget on a restart."""

    def translate(self, events: list[KVEvent]) -> list[KVEvent]:
        """The same list, its hashes as 8 big-endian bytes when ``as_bytes``. In place: a step's
        events are its own and published once, and a prefill step's 512 ``BlockRemoved`` (one
        per evicted block, as vLLM sends them) copied with ``msgspec.structs.replace`` cost
        ~0.3 ms a step, 2.7x setting the one field (measured on a 513-event batch)."""
        if not self.as_bytes:
            return events
        for ev in events:
            if type(ev) is BlockRemoved:
                hs = cast("list[int]", ev.block_hashes)
                ev.block_hashes = [hs[0].to_bytes(8, "big")] if len(hs) == 1 else _u64_bytes(hs)
            elif type(ev) is BlockStored:
                ev.block_hashes = _u64_bytes(cast("list[int]", ev.block_hashes))
                parent = cast("int | None", ev.parent_block_hash)
                if parent is not None:
                    ev.parent_block_hash = parent.to_bytes(8, "big")
        return events


def _u64_bytes(hashes: list[int]) -> list[EngineHash]:
    return [h.to_bytes(8, "big") for h in hashes]


class VllmEventHashes:
    """Engine block hashes -> vLLM's in KV events, so a subscriber sees exactly the hashes a real
    vLLM 0.32 (``--prefix-caching-hash-algo sha256``) publishes for the same tokens.

    Why the engine does not simply hash with sha256: its prefix cache only needs *a* chained
    identity per block, and the engine's xxh3 chain (``engine.XxhBlockHasher``) costs ~0.3 us a
    block against ~2 us for pickle + sha256. Every prompt block is hashed when its request arrives
    (a Mooncake burst is ~100k tokens), but only *stored* blocks reach an event, and they are
    hashed here, when the step that stored them publishes.

    How it stays exact: a ``BlockStored`` carries its blocks' tokens, and its parent is a block
    this replica caches (the request holds it) or one stored in the same event, so every digest
    is ``sha256((parent digest, block tokens, None))`` from digests already known. State: digest
    and a count of cached copies per engine hash, for exactly the blocks some tier of this replica
    caches: +1 per ``BlockStored`` (GPU copies in the low 32 bits, CPU-tier copies above), -1 per
    ``BlockRemoved``, GPU copies dropped on ``AllBlocksCleared``, everything on ``clear`` (a
    restart). So it is bounded by what the engine caches, and it
    never forgets a block that a later event can name. Both dicts hold only ints and bytes: the
    cyclic GC never walks them. A hash it does not know (none in practice; counted in
    ``misses``) is published as the sha256 of its int's bytes: deterministic, not vLLM's value.
    """

    _CPU = 1 << 32
    algo = "sha256"  # vllm:cache_config_info's prefix_caching_hash_algo, as vLLM reports it

    def __init__(self, *, as_bytes: bool = False) -> None:
        self.as_bytes = as_bytes
        self._digest: dict[int, bytes] = {}
        self._copies: dict[int, int] = {}
        self.misses = 0

    def __len__(self) -> int:
        return len(self._digest)

    def digest(self, h: int) -> bytes | None:
        return self._digest.get(h)

    def clear(self) -> None:
        """A process restart: nothing is cached."""
        self._digest.clear()
        self._copies.clear()

    def _drop_gpu_copies(self) -> None:
        copies, digest = self._copies, self._digest
        for h, c in list(copies.items()):
            c &= ~(self._CPU - 1)
            if c:
                copies[h] = c
            else:
                del copies[h]
                digest.pop(h, None)

    def _external(self, d: bytes) -> EngineHash:
        return d if self.as_bytes else int.from_bytes(d[24:], "big")

    def _known(self, h: int) -> bytes:
        d = self._digest.get(h)
        if d is None:
            self.misses += 1
            d = hashlib.sha256(h.to_bytes(8, "big")).digest()
        return d

    def translate(self, events: Sequence[KVEvent]) -> list[KVEvent]:
        """The same events, in order, with vLLM's hashes; updates the cached-copies count."""
        out: list[KVEvent] = []
        digest, copies = self._digest, self._copies
        ext = self._external
        for ev in events:
            if isinstance(ev, BlockStored):
                inc = self._CPU if ev.medium == "CPU" else 1
                # The engine's events carry its int hashes (EngineHash only widens the wire type)
                parent = cast("int | None", ev.parent_block_hash)
                pd = NONE_HASH if parent is None else self._known(parent)
                ext_parent = None if parent is None else ext(pd)
                toks = ev.token_ids
                bs = ev.block_size
                hashes: list[EngineHash] = []
                for i, h in enumerate(cast("list[int]", ev.block_hashes)):
                    d = digest.get(h)
                    if d is None:
                        if len(toks) >= (i + 1) * bs:
                            d = sha256_hash((pd, tuple(toks[i * bs : (i + 1) * bs]), None))
                        else:  # no tokens (a CPU-tier store) and never seen on the GPU
                            d = self._known(h)
                        digest[h] = d
                    copies[h] = copies.get(h, 0) + inc
                    hashes.append(ext(d))
                    pd = d
                out.append(
                    msgspec.structs.replace(
                        ev,
                        block_hashes=hashes,
                        parent_block_hash=ext_parent,
                    )
                )
            elif isinstance(ev, BlockRemoved):
                dec = self._CPU if ev.medium == "CPU" else 1
                hashes = []
                for h in cast("list[int]", ev.block_hashes):
                    hashes.append(ext(self._known(h)))
                    c = copies.get(h, 0) - dec
                    if c > 0:
                        copies[h] = c
                    else:
                        copies.pop(h, None)
                        digest.pop(h, None)
                out.append(msgspec.structs.replace(ev, block_hashes=hashes))
            else:  # AllBlocksCleared: the GPU prefix cache was reset
                self._drop_gpu_copies()
                out.append(ev)
        return out
