"""What the engine loop hands an HTTP handler: token deltas on a cheap per-request channel."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

# The engine's clock: arrivals, step deadlines, lag, token times. Not loop.time(): uvloop's clock
# is libuv's millisecond uv_now, so lag measured with it was rounded to whole milliseconds (and
# a wake-up up to ~1 ms late could read as on time) while the target is sub-millisecond.
# time.monotonic() is the same CLOCK_MONOTONIC at full resolution. (Sleeps still go through the
# loop's timers, which libuv rounds to the millisecond; the lag metric shows what that costs.)
clock = time.monotonic


@dataclass(slots=True)
class Delta:
    index: int
    token_ids: list[int]
    finish_reason: str | None
    due: float = 0.0  # when the step that produced these tokens ended (its deadline), on clock


CUT = object()  # queued to a stream when the replica restarts or stops: cut the connection


class Chan:
    """What the engine loop hands one HTTP request: a list it appends to and a waiter it wakes.

    Cheaper than an ``asyncio.Queue`` (no getter deque, no per-item wake-up), and ``take()``
    returns everything queued so far, so a handler that fell behind writes several steps'
    chunks at once instead of waking once per step.
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def take(self) -> list[Any]:
        """Every item queued so far (waits for at least one), oldest first."""
        while not self._items:
            w = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await w
            finally:
                self._waiter = None
        items = self._items
        self._items = []
        return items


@dataclass(slots=True)
class Track:
    """Server-side state of one engine request (one prompt of an HTTP request)."""

    rid: str
    index: int
    queue: Chan
    prompt_len: int
    arrival: float
    scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    cached_tokens: int = 0
    generated: int = 0
    finished: bool = False
    stream_interval: int = 1
    held: list[int] | None = None  # tokens generated but not yet handed to the stream (interval)
