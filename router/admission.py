"""Admission control: a router-wide concurrency cap with a bounded priority queue.

Beyond ``max_in_flight`` requests wait ordered by priority, then arrival (streaming and
non-streaming alike). Priority is vLLM's convention, smaller first, 0 by default: an agent's
``priority`` / Dynamo ``nvext.agent_hints.priority`` (router/sessions/identity.py). Beyond ``max_queue`` waiting, or after ``queue_timeout_s``, a request
is refused with 429 and ``Retry-After``. Memory under a flood is bounded by the queue length.
The per-replica cap lives in Router.candidates (a replica at its cap is not a candidate).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable

from .errors import Overloaded


class Admission:
    def __init__(
        self,
        max_in_flight: int = 0,
        max_queue: int = 1024,
        queue_timeout_s: float = 30.0,
        retry_after_s: int = 1,
        on_reject: Callable[[], None] | None = None,
    ) -> None:
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.retry_after_s = retry_after_s
        self.on_reject = on_reject or (lambda: None)
        self.in_flight = 0
        # (priority, arrival seq, future); a waiter that gave up stays until popped (done future)
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._waiting = 0

    @property
    def queued(self) -> int:
        return self._waiting

    def try_acquire(self) -> bool:
        """Take a slot if one is free without waiting (the request path's common case, without
        a coroutine); else the caller awaits ``acquire``."""
        if self.max_in_flight == 0 or (self.in_flight < self.max_in_flight and not self._waiting):
            self.in_flight += 1
            return True
        return False

    async def acquire(self, priority: int = 0) -> None:
        if self.try_acquire():
            return
        if self._waiting >= self.max_queue:
            self.on_reject()
            raise Overloaded("The router is at capacity; retry later.", retry_after=self.retry_after_s)
        if len(self._waiters) > 2 * self.max_queue + 16:
            # waiters that gave up are dropped lazily; bound them when nothing releases for a while
            self._waiters = [w for w in self._waiters if not w[2].done()]
            heapq.heapify(self._waiters)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._seq), fut))
        self._waiting += 1
        try:
            async with asyncio.timeout(self.queue_timeout_s):
                await fut  # release() hands its slot over: in_flight is unchanged
        except BaseException as exc:
            if fut.done() and not fut.cancelled():
                self.release()  # handed a slot we will not use (timeout or client gone): pass it on
            else:
                fut.cancel()  # left in the heap, skipped (and dropped) by release
                self._waiting -= 1
            if isinstance(exc, TimeoutError):
                self.on_reject()
                raise Overloaded(
                    "Timed out waiting for a slot; retry later.", retry_after=self.retry_after_s
                ) from None
            raise

    def release(self) -> None:
        while self._waiters:
            fut = heapq.heappop(self._waiters)[2]
            if not fut.done():
                self._waiting -= 1
                fut.set_result(None)  # the slot passes to the next waiter
                return
        self.in_flight -= 1
