"""The ZMQ side of KV events: one SUB socket per replica, replay fetches, reconnects.

Threading: everything that touches the index runs synchronously on the event loop inside
``ReplicaEvents`` (no awaits, no locks); the subscriber task only awaits socket I/O and hands
whole messages (or a whole replay) to it.

Cost: one msgspec decode per batch, one xxh3 per stored block, O(1) dict work per block; see
tests/bench/bench_kv_events.py for the measured rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq
import zmq.asyncio
from prometheus_client import CollectorRegistry

from router.kv.apply import IndexSink
from router.kv.metrics import KVEventMetrics, default_metrics
from router.kv.stream import DEFAULT_CAPACITY, DEFAULT_RESTART_WINDOW, KVEventStats, ReplicaEvents
from router.types import ReplicaId

log = logging.getLogger(__name__)

DEFAULT_REPLAY_TIMEOUT_S = 2.0
DEFAULT_REPLAY_MAX_BATCHES = 100_000  # vLLM keeps 10k by default; 10x headroom bounds the loop
DEFAULT_RCVHWM = 100_000  # vLLM's publisher hwm
END_SEQ = -1  # replay end marker, signed 8-byte BE


async def fetch_replay(
    ctx: zmq.asyncio.Context,
    endpoint: str,
    start: int,
    *,
    timeout: float = DEFAULT_REPLAY_TIMEOUT_S,
    max_batches: int = DEFAULT_REPLAY_MAX_BATCHES,
) -> tuple[list[tuple[int, bytes]], bool]:
    """Ask a vLLM replay ROUTER for every buffered batch with seq >= start.

    We send ``[b"", start8]`` from a DEALER (vLLM ignores requests that do not arrive as
    ``[identity, b"", start8]``). Replies are ``[b"", topic, seq8, payload]`` (vLLM 0.32) or
    ``[b"", seq8, payload]`` (older vLLM, SGLang, LMCache), ended by seq -1. Returns the batches
    and whether the end marker arrived; a fresh socket per replay keeps a late answer to an
    abandoned request from being read as the next one's.
    """
    out: list[tuple[int, bytes]] = []
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        sock.connect(endpoint)
        await sock.send_multipart([b"", start.to_bytes(8, "big", signed=True)])
        while len(out) < max_batches:
            left = deadline - loop.time()
            if left <= 0:
                return out, False
            try:
                frames = await asyncio.wait_for(sock.recv_multipart(), left)
            except TimeoutError:
                return out, False
            if frames and frames[0] == b"":
                frames = frames[1:]
            if len(frames) == 3:
                seq_b, payload = frames[1], frames[2]
            elif len(frames) == 2:
                seq_b, payload = frames[0], frames[1]
            else:
                continue
            if len(seq_b) != 8:
                continue
            seq = int.from_bytes(seq_b, "big", signed=True)
            if seq == END_SEQ:
                return out, True
            if seq >= 0:
                out.append((seq, payload))
        return out, False
    finally:
        sock.close(linger=0)


@dataclass(slots=True)
class _Sub:
    events: ReplicaEvents
    endpoint: str
    replay_endpoint: str | None
    topic: str
    bind: bool
    task: asyncio.Task[None] | None = None


class KVEventManager:
    """Subscribes to every replica's KV events and keeps the index in step with them.

    One task per replica: a SUB socket (connect, or bind for engines that connect), reconnect
    with exponential backoff on socket errors, replay on gaps. ``close()`` cancels and awaits
    every task and closes the ZMQ context.
    """

    def __init__(
        self,
        index: IndexSink,
        *,
        capacity: int = DEFAULT_CAPACITY,
        restart_window: int = DEFAULT_RESTART_WINDOW,
        replay_timeout: float = DEFAULT_REPLAY_TIMEOUT_S,
        backoff: tuple[float, float] = (0.1, 5.0),
        rcvhwm: int = DEFAULT_RCVHWM,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.index = index
        self.capacity = capacity
        self.restart_window = restart_window
        self.replay_timeout = replay_timeout
        self.backoff = backoff
        self.rcvhwm = rcvhwm
        self.metrics = default_metrics() if registry is None else KVEventMetrics(registry)
        self.clock = clock
        self._ctx = zmq.asyncio.Context()
        self._subs: dict[ReplicaId, _Sub] = {}
        self._closed = False

    def add(
        self,
        replica_id: ReplicaId,
        endpoint: str,
        replay_endpoint: str | None = None,
        topic: str = "",
        bind: bool = False,
        model: str = "",
        block_size: int | None = None,
    ) -> None:
        """Start following one replica. Idempotent; changed settings restart the subscription
        (with fresh state: a new endpoint is a new stream). Needs a running event loop."""
        if self._closed:
            raise RuntimeError("KVEventManager is closed")
        old = self._subs.get(replica_id)
        if old is not None:
            ev = old.events
            same = (old.endpoint, old.replay_endpoint, old.topic, old.bind, ev.model, ev.block_size)
            if same == (endpoint, replay_endpoint, topic, bind, model, block_size):
                return
            self.remove(replica_id)
        events = ReplicaEvents(
            replica_id,
            self.index,
            model=model,
            block_size=block_size,
            capacity=self.capacity,
            replay=replay_endpoint is not None,
            restart_window=self.restart_window,
            metrics=self.metrics,
            clock=self.clock,
        )
        attach = getattr(self.index, "attach", None)  # a shared LMCache tier (lmcache_tier.py)
        if attach is not None:
            attach(replica_id)
        sub = _Sub(events, endpoint, replay_endpoint, topic, bind)
        sub.task = asyncio.get_running_loop().create_task(self._run(sub), name=f"kv-events:{replica_id}")
        self._subs[replica_id] = sub

    def remove(self, replica_id: ReplicaId) -> None:
        """Stop following a replica. Its confirmed entries stay in the index: the replica
        registry decides whether the replica is gone (``index.remove_replica``)."""
        sub = self._subs.pop(replica_id, None)
        if sub is None:
            return
        if sub.task is not None:
            sub.task.cancel()
        self.metrics.forget(replica_id)
        detach = getattr(self.index, "detach", None)  # a shared LMCache tier (lmcache_tier.py)
        if detach is not None:
            detach(replica_id)
        # A later add() starts a fresh stream whose flag starts False and only pushes changes:
        # clear the index's flag now, or the replica's prefix credit stays halved for good.
        set_uncertain = getattr(self.index, "set_uncertain", None)
        if set_uncertain is not None:
            set_uncertain(replica_id, False)

    async def close(self) -> None:
        self._closed = True
        tasks = [s.task for s in self._subs.values() if s.task is not None]
        for rid in list(self._subs):
            self.remove(rid)
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._ctx.destroy(linger=0)

    def stats(self, replica_id: ReplicaId) -> KVEventStats | None:
        sub = self._subs.get(replica_id)
        return None if sub is None else sub.events.stats

    def is_uncertain(self, replica_id: ReplicaId) -> bool:
        sub = self._subs.get(replica_id)
        return sub is not None and sub.events.uncertain

    def replicas(self) -> list[ReplicaId]:
        return list(self._subs)

    def events_of(self, replica_id: ReplicaId) -> ReplicaEvents | None:
        sub = self._subs.get(replica_id)
        return None if sub is None else sub.events

    async def _run(self, sub: _Sub) -> None:
        delay = self.backoff[0]
        st = sub.events.stats
        while True:
            sock = self._ctx.socket(zmq.SUB)
            try:
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.RCVHWM, self.rcvhwm)
                sock.setsockopt(zmq.SUBSCRIBE, sub.topic.encode())
                if sub.bind:
                    sock.bind(sub.endpoint)
                    st.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
                else:
                    sock.connect(sub.endpoint)
                    st.endpoint = sub.endpoint
                st.connected = True
                if sub.replay_endpoint is not None and st.last_seq is None:
                    # Live batches queue on the SUB socket meanwhile; any overlap is dropped
                    # as stale, any hole is a gap that the replay path fills.
                    got, complete = await fetch_replay(
                        self._ctx, sub.replay_endpoint, 0, timeout=self.replay_timeout
                    )
                    if self._subs.get(sub.events.replica) is sub:
                        sub.events.bootstrap(got, complete)
                while True:
                    frames = await sock.recv_multipart()
                    delay = self.backoff[0]
                    await self._handle(sub, frames)
            except asyncio.CancelledError:
                raise
            except (zmq.ZMQError, OSError) as exc:
                st.errors = [*st.errors[-4:], f"{type(exc).__name__}: {exc}"]
                log.warning(
                    "KV events of %s (%s): %s; retrying in %.1fs",
                    sub.events.replica,
                    sub.endpoint,
                    exc,
                    delay,
                )
            finally:
                st.connected = False
                sock.close(linger=0)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff[1])

    async def _handle(self, sub: _Sub, frames: list[bytes]) -> None:
        ev = sub.events
        try:
            req = ev.handle_frames(frames)
        except Exception:  # a bug here must not kill the stream; keep applying later batches
            log.exception("KV events of %s: applying a batch failed", ev.replica)
            ev.mark_uncertain()
            return
        if req is None or sub.replay_endpoint is None:
            return
        got, complete = await fetch_replay(
            self._ctx, sub.replay_endpoint, req.start, timeout=self.replay_timeout
        )
        if self._subs.get(ev.replica) is not sub:
            return  # removed while we waited: its state no longer feeds the index
        try:
            ev.finish_replay(req, got, complete)
        except Exception:
            log.exception("KV events of %s: applying a replay failed", ev.replica)
            ev.mark_uncertain()
