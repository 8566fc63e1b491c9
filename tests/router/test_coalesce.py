"""Write coalescing (router/http/coalesce.py) on a real event loop: the writes of one pass leave
together at its end, in order, one transport write per writer; early flush past MAX_PENDING;
what must never leave does not."""

from __future__ import annotations

import asyncio

from router.http.coalesce import MAX_PENDING, Coalesced, write_batch


class Transport:
    """Records writes (and the loop pass that made them) like a socket transport would take them."""

    def __init__(self, log: list[tuple[str, bytes]], name: str) -> None:
        self.log = log
        self.name = name
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.log.append((self.name, data))

    def is_closing(self) -> bool:
        return self.closed


async def next_pass() -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def test_writes_of_one_pass_leave_together_in_order() -> None:
    loop = asyncio.get_running_loop()
    log: list[tuple[str, bytes]] = []
    a = Coalesced(write_batch(loop), Transport(log, "a"))  # type: ignore[arg-type]
    b = Coalesced(write_batch(loop), Transport(log, "b"))  # type: ignore[arg-type]
    a.queue(b"head ")
    b.queue(b"request")
    a.queue(b"body")
    assert log == []  # nothing leaves while the pass is still running
    await next_pass()
    assert log == [("a", b"head body"), ("b", b"request")]  # one write per transport, in order
    a.queue(b"next")
    await next_pass()
    assert log[-1] == ("a", b"next")


async def test_a_busy_pass_is_flushed_early() -> None:
    loop = asyncio.get_running_loop()
    log: list[tuple[str, bytes]] = []
    writers = [Coalesced(write_batch(loop), Transport(log, str(i))) for i in range(MAX_PENDING + 3)]  # type: ignore[arg-type]
    for w in writers:
        w.queue(b"x")
    assert len(log) == MAX_PENDING  # no write waits behind more than MAX_PENDING others
    await next_pass()
    assert [name for name, _ in log] == [str(i) for i in range(MAX_PENDING + 3)]


async def test_flush_now_and_discard() -> None:
    loop = asyncio.get_running_loop()
    log: list[tuple[str, bytes]] = []
    t = Transport(log, "c")
    c = Coalesced(write_batch(loop), t)  # type: ignore[arg-type]
    c.queue(b"answer")
    c.flush_now()  # before a close or a FIN: the answer goes first
    assert log == [("c", b"answer")]
    c.queue(b"cancelled request")
    c.discard()
    await next_pass()
    assert log == [("c", b"answer")]
    c.queue(b"late")
    t.closed = True  # the peer went away meanwhile: nothing is written to a closing transport
    await next_pass()
    assert log == [("c", b"answer")]


async def test_a_lone_request_writes_at_once() -> None:
    """With at most one request in progress (``busy()`` false) there is nothing to share a pass
    with: the write goes out at once instead of costing an extra loop iteration."""
    loop = asyncio.get_running_loop()
    batch = write_batch(loop)
    log: list[tuple[str, bytes]] = []
    w = Coalesced(batch, Transport(log, "w"))  # type: ignore[arg-type]
    batch.busy = lambda: False
    w.queue(b"alone")
    assert log == [("w", b"alone")]
    batch.busy = lambda: True
    w.queue(b"shared")
    assert log == [("w", b"alone")]
    await next_pass()
    assert log == [("w", b"alone"), ("w", b"shared")]


async def test_a_failing_transport_does_not_strand_the_others() -> None:
    loop = asyncio.get_running_loop()
    log: list[tuple[str, bytes]] = []

    class Broken(Transport):
        aborted = False

        def write(self, data: bytes) -> None:
            raise RuntimeError("transport broke")

        def abort(self) -> None:
            self.aborted = True
            self.closed = True

    broken = Broken(log, "broken")
    bad = Coalesced(write_batch(loop), broken)  # type: ignore[arg-type]
    good = Coalesced(write_batch(loop), Transport(log, "good"))  # type: ignore[arg-type]
    bad.queue(b"x")
    good.queue(b"y")
    await next_pass()
    assert log == [("good", b"y")] and broken.aborted
