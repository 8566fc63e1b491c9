"""router.http.proxy._IdleTimer: the lazy idle timeout the relay loop uses instead of rescheduling an
asyncio.timeout after every chunk. Same contract: fires only after ``idle`` without a touch, turns
its own cancellation into TimeoutError, leaves an outside cancellation a CancelledError."""

from __future__ import annotations

import asyncio

import pytest

from router.http.proxy import _IdleTimer

# Long enough that a loaded CI machine's scheduling delays (tens of ms) cannot fake an idle period.
IDLE = 0.3


async def _touching(n: int, gap: float) -> int:
    with _IdleTimer(IDLE) as t:
        for _ in range(n):
            await asyncio.sleep(gap)
            t.touch()
    return n


def test_touches_keep_it_alive_past_the_idle_period() -> None:
    # 10 gaps of IDLE/3: over three times the idle period in total, never idle for IDLE.
    assert asyncio.run(_touching(10, IDLE / 3)) == 10


def test_fires_after_idle_without_touch() -> None:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(TimeoutError):
            await _touching(2, IDLE * 4)
        return loop.time() - t0

    took = asyncio.run(main())
    assert IDLE <= took < IDLE * 4


def test_outside_cancel_stays_cancelled() -> None:
    async def main() -> None:
        task = asyncio.ensure_future(_touching(1, 10 * IDLE))
        await asyncio.sleep(IDLE / 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_timer_is_cancelled_on_exit() -> None:
    async def main() -> None:
        with _IdleTimer(IDLE):
            pass
        await asyncio.sleep(IDLE * 2)  # a leaked timer would cancel this task now

    asyncio.run(main())
