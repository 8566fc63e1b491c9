"""KV-cache event publisher of the simulated engine: vLLM's ZMQ PUB + ROUTER replay, on asyncio.

Wire (pinned to vllm/distributed/kv_events.py, ``ZmqEventPublisher``):

* PUB multipart ``[topic utf-8, seq 8-byte big-endian, msgpack KVEventBatch]``; ``seq`` counts
  batches from 0 per publisher (a restart starts again at 0).
* Bind or connect exactly like vLLM (``router.kv_wire.publisher_binds``): bind when the endpoint
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
import itertools
import logging
import pickle
import time
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from router.kv_wire import (
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
# Memoised block hashes per replica (VllmBlockHasher): at about 0.4 KB an entry, 32k entries are
# ~13 MB, enough for a replica's recent conversation prefixes.
DEFAULT_MEMO_BLOCKS = 1 << 15
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
        self._pub_sync = zmq.Socket.shadow(self._pub.underlying)
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
            if not await sock.poll(_REPLAY_POLL_MS, zmq.POLLIN):
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


def _pack_ids(ids: Sequence[int]) -> tuple[bytes, bytes] | None:
    """Token ids as int32 (or int64) machine bytes for memo keys, and the tag byte that starts
    every key made from them (b"i" or b"q"; a key is tag + block, or tag + parent's 8 bytes +
    block, so a key's bytes and length tell its width, parent and block size: no collisions);
    None beyond int64."""
    for code in ("i", "q"):
        try:
            return code.encode(), array(code, ids).tobytes()
        except OverflowError:
            continue
    return None


def _trim_oldest(d: dict[Any, Any], keep: int) -> None:
    """Drop the oldest entries of ``d`` (insertion order) until ``keep`` remain: one scan."""
    for k in list(itertools.islice(d, max(0, len(d) - keep))):
        del d[k]


class VllmBlockHasher:
    """The engine model's ``block_hasher`` that yields vLLM's event ints (sha256 chain).

    The engine model chains 64-bit ints, vLLM chains full digests, so this keeps int -> digest
    for recent blocks to continue a chain exactly. Bound: ``capacity`` entries, oldest first out;
    a parent that fell out (a request older than ``capacity`` newer blocks) is chained from its
    int's bytes instead: still deterministic, no longer vLLM's value. Size it a few times the
    KV pool so that never happens to a request still running.
    """

    def __init__(self, capacity: int = 1 << 18, memo_capacity: int = DEFAULT_MEMO_BLOCKS) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive (current value: {capacity})")
        if memo_capacity < 0:
            raise ValueError(f"memo_capacity must be >= 0 (current value: {memo_capacity})")
        self.capacity = capacity
        self.memo_capacity = memo_capacity
        # Plain dicts (insertion order = age), trimmed in batches by _trim_oldest. Evicting one
        # oldest key per insert (del d[next(iter(d))]) scans the dummy slots earlier deletions left
        # at the front: O(capacity) per insert once full (54 us vs 0.3 us per op at 100k entries),
        # a third of a loaded sim's CPU. OrderedDict.popitem is O(1) but an OrderedDict is never
        # untracked by the cyclic GC, so every full collection walked its ~1.5M entries.
        self._digests: dict[int, bytes] = {}
        # (parent int, block tokens) -> digest, for recently hashed blocks, as bytes: the
        # parent's 8 bytes (none for the first block) + the tokens packed as int32 (int64 when
        # they do not fit; no memo beyond that). A conversation re-sends its history every turn,
        # so most prompt blocks were hashed before; a dict hit costs a tenth of pickle + sha256
        # (which was ~13% of a loaded sim's CPU). Only chained values (parent digest known) are
        # stored, and a hit is used only while the parent digest is still known, so results are
        # exactly those of hashing again. Bytes keys and values, not tuples: a dict of bytes is
        # invisible to the cyclic GC, while tuple keys made every hashed block three young
        # containers (gen-0 collections of 3-12 ms after a long prompt) and the memo a ~1.5M-slot
        # walk in each full collection.
        self._memo: dict[bytes, bytes] = {}
        self.misses = 0

    def digest(self, h: int) -> bytes | None:
        return self._digests.get(h)

    def __call__(self, parent: int | None, tokens: Sequence[int]) -> int:
        return self.chain(parent, tokens, len(tokens) or 1, 1)[0]

    def chain(
        self,
        parent: int | None,
        tokens: Sequence[int],
        block_size: int,
        n: int | None = None,
        first: int = 0,
    ) -> list[int]:
        """Hashes of the full blocks of ``tokens`` chained from ``parent``: exactly
        ``[h1 := self(parent, block first), self(h1, block first + 1), ...]`` (``n`` blocks;
        default: every full block from ``first`` on), in one loop: a 750-block prompt costs one
        call instead of 750 calls and slices. ``chain(p, t, bs, k, 0) + chain(last, t, bs, m, k)``
        equals ``chain(p, t, bs, k + m)``, so a caller can hash a long prompt in slices.
        Memo keys are bytes (see __init__): about as fast as tuple keys, and no GC work."""
        if n is None:
            n = len(tokens) // block_size - first
        digests = self._digests
        memo = self._memo
        memo_cap = self.memo_capacity
        cap = self.capacity
        packed = _pack_ids(tokens[first * block_size : (first + n) * block_size]) if memo_cap and n else None
        if packed is not None:
            tag, raw = packed
            w = len(raw) // n  # bytes per block
            poff = tag[0] << 64  # the parent's 8 bytes behind the same tag byte
        out: list[int] = []
        for i in range(n):
            key: bytes | None = None
            if parent is None:
                pd: bytes | None = NONE_HASH
                if packed is not None:
                    key = tag + raw[i * w : (i + 1) * w]
            else:
                pd = digests.get(parent)
                if pd is None:  # not chained: hashed from the int's bytes, never memoised
                    self.misses += 1
                    pd = parent.to_bytes(32, "big")
                elif packed is not None:
                    key = (parent + poff).to_bytes(9, "big") + raw[i * w : (i + 1) * w]
            d = memo.get(key) if key is not None else None
            if d is None:
                j = first + i
                d = sha256_hash((pd, tuple(tokens[j * block_size : (j + 1) * block_size]), None))
                if key is not None:
                    memo[key] = d
                    if len(memo) > memo_cap + (memo_cap >> 3):
                        _trim_oldest(memo, memo_cap)
            h = int.from_bytes(d[24:], "big")  # the low 64 bits: external_hash(d)
            if h in digests:
                digests[h] = digests.pop(h)  # refresh: dicts keep insertion order, oldest first
            else:
                digests[h] = d
                # Up to 1/8 over capacity, then back to capacity in one pass: never fewer entries
                # than a strict bound keeps, so every parent it would find is still found.
                if len(digests) > cap + (cap >> 3):
                    _trim_oldest(digests, cap)
            out.append(h)
            parent = h
        return out

    def to_bytes_events(self, events: list[KVEvent]) -> list[KVEvent]:
        """The same events with raw digests instead of ints (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0)."""

        def conv(h: EngineHash | None) -> EngineHash | None:
            if isinstance(h, int):
                return self._digests.get(h) or h.to_bytes(32, "big")
            return h

        out: list[KVEvent] = []
        for ev in events:
            if isinstance(ev, BlockStored):
                out.append(
                    msgspec.structs.replace(
                        ev,
                        block_hashes=[conv(h) for h in ev.block_hashes],
                        parent_block_hash=conv(ev.parent_block_hash),
                    )
                )
            elif isinstance(ev, BlockRemoved):
                out.append(msgspec.structs.replace(ev, block_hashes=[conv(h) for h in ev.block_hashes]))
            else:
                out.append(ev)
        return out
