"""Admission: FIFO hand-over of slots, bounded queue, timeouts, cancellation never leaks a slot."""

from __future__ import annotations

import asyncio

import pytest

from router.admission import Admission
from router.errors import Overloaded


async def test_fifo_and_bounded_queue() -> None:
    adm = Admission(max_in_flight=1, max_queue=2, queue_timeout_s=5)
    await adm.acquire()
    order: list[int] = []

    async def waiter(i: int) -> None:
        await adm.acquire()
        order.append(i)

    tasks = [asyncio.create_task(waiter(i)) for i in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(Overloaded):
        await adm.acquire()  # queue full
    adm.release()
    await asyncio.sleep(0)
    adm.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1]
    adm.release()
    assert adm.in_flight == 0 and adm.queued == 0


async def test_timeout_is_429_and_cancelled_waiter_passes_its_slot_on() -> None:
    adm = Admission(max_in_flight=1, max_queue=5, queue_timeout_s=0.05)
    await adm.acquire()
    with pytest.raises(Overloaded):
        await adm.acquire()
    adm.queue_timeout_s = 5
    t1 = asyncio.create_task(adm.acquire())
    t2 = asyncio.create_task(adm.acquire())
    await asyncio.sleep(0)
    adm.release()  # hands the slot to t1 ...
    t1.cancel()  # ... which is cancelled before it runs: the slot must go to t2
    await asyncio.sleep(0)
    await asyncio.wait_for(t2, 1)
    assert adm.in_flight == 1
    adm.release()
    assert adm.in_flight == 0


async def test_unlimited() -> None:
    adm = Admission(0)
    for _ in range(100):
        await adm.acquire()
    assert adm.in_flight == 100
