"""Admission control: a router-wide concurrency cap with a bounded FIFO queue.

Beyond ``max_in_flight`` requests wait in arrival order (streaming and non-streaming alike: one
queue, no priority by kind); beyond ``max_queue`` waiting, or after ``queue_timeout_s``, a request
is refused with 429 and ``Retry-After``. Memory under a flood is bounded by the queue length.
The per-replica cap lives in Router.candidates (a replica at its cap is not a candidate).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
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
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def try_acquire(self) -> bool:
        """Take a slot if one is free without waiting (the request path's common case, without
        a coroutine); else the caller awaits ``acquire``."""
        if self.max_in_flight == 0 or (self.in_flight < self.max_in_flight and not self._waiters):
            self.in_flight += 1
            return True
        return False

    async def acquire(self) -> None:
        if self.try_acquire():
            return
        if len(self._waiters) >= self.max_queue:
            self.on_reject()
            raise Overloaded("The router is at capacity; retry later.", retry_after=self.retry_after_s)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            async with asyncio.timeout(self.queue_timeout_s):
                await fut  # release() hands its slot over: in_flight is unchanged
        except BaseException as exc:
            if fut.done() and not fut.cancelled():
                self.release()  # handed a slot we will not use (timeout or client gone): pass it on
            else:
                fut.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            if isinstance(exc, TimeoutError):
                self.on_reject()
                raise Overloaded("Timed out waiting for a slot; retry later.", retry_after=self.retry_after_s) from None
            raise

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot passes to the next waiter
                return
        self.in_flight -= 1
