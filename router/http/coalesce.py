"""Write coalescing: the socket writes of one event-loop pass go out together, at its end.

Why: each ``transport.write`` on loopback or a NIC is a syscall that also wakes the peer that
reads it (an engine, a client). Sent as each request is handled, the writes of a busy pass are
tens of microseconds apart, so every one finds its peer asleep again and pays a full wake-up;
sent back to back, the peers wake once and read several. On the 2-core bench (bench_proxy.py,
c=32, non-streaming) this took the router's CPU per request down by 8-16% (interleaved A/B,
docs/benchmarks.md), the same idea as Netty's flush consolidation.

What it costs: a write leaves at the end of the pass that made it (the callbacks still queued in
that pass, then one non-blocking poll), never later: a pass is flushed early once ``MAX_PENDING``
writers are waiting, so no write waits behind more than that many others. Deferring also costs
that extra loop iteration (a poll syscall), which only pays when other writes share it: while the
router handles at most one request (``busy()`` false, set by the app from its request count) a
write goes out at once. At c=1 deferring every write cost 16% more CPU per request.

Contract for a ``Coalesced`` writer: ``queue`` bytes instead of writing them; everything that ends
or half-closes its transport (close, write_eof, handing the socket to another protocol) calls
``flush_now`` first, or ``discard`` when the bytes must never leave (an upstream request that was
cancelled before it was sent: the engine never sees it).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable

log = logging.getLogger("kvrouter.coalesce")

MAX_PENDING = 16  # writers waiting in one pass before it is flushed early


def _always() -> bool:
    return True


class Coalesced:
    """Bytes for one transport, held until the loop's batch is flushed."""

    __slots__ = ("_batch", "_out", "_transport")

    def __init__(self, batch: WriteBatch, transport: asyncio.WriteTransport) -> None:
        self._batch = batch
        self._transport = transport
        self._out: list[bytes] = []

    def queue(self, data: bytes) -> None:
        out = self._out
        out.append(data)
        if len(out) == 1:
            self._batch.add(self)  # may flush at once (a full batch): the bytes are already in

    def flush_now(self) -> None:
        out = self._out
        if not out:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        t = self._transport
        if t.is_closing():
            return
        try:
            t.write(data)
        except Exception:
            # Raised in the batch's callback it would strand the other writers' bytes: this
            # connection is the one that failed, so it is the one dropped (its protocol sees
            # connection_lost and answers its request's failure as for any broken socket).
            log.exception("write to a transport failed; closing it")
            t.abort()

    def discard(self) -> None:
        self._out.clear()

    def closing(self) -> bool:
        return self._transport.is_closing()


class WriteBatch:
    """The writers with bytes queued in the current pass of one event loop."""

    __slots__ = ("_loop", "_scheduled", "_writers", "busy")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)  # the per-loop table must not keep its key alive
        self._writers: list[Coalesced] = []
        self._scheduled = False
        # Whether other writes may share this pass (more than one request in progress). The app
        # sets it; the default coalesces always.
        self.busy: Callable[[], bool] = _always

    def add(self, writer: Coalesced) -> None:
        writers = self._writers
        if not writers and not self.busy():
            writer.flush_now()  # nothing to share a pass with: no reason to wait for one
            return
        writers.append(writer)
        if len(writers) >= MAX_PENDING:
            self.flush()
        elif not self._scheduled:
            loop = self._loop()
            if loop is None:
                self.flush()
                return
            self._scheduled = True
            loop.call_soon(self._flush_scheduled)

    def _flush_scheduled(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        writers, self._writers = self._writers, []
        for w in writers:
            w.flush_now()


_PER_LOOP: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, WriteBatch] = weakref.WeakKeyDictionary()


def write_batch(loop: asyncio.AbstractEventLoop) -> WriteBatch:
    """The loop's write batch (created on first use; it goes with the loop)."""
    b = _PER_LOOP.get(loop)
    if b is None:
        b = _PER_LOOP[loop] = WriteBatch(loop)
    return b
