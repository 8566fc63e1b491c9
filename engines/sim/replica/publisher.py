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
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

from ..wire import (
    KVEvent,
    encode_batch,
    publisher_binds,
    seq_bytes,
)

log = logging.getLogger(__name__)

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
