"""Coarse deadlines for the request path: one event-loop timer per time bucket, not per request.

Why: every proxied attempt has a deadline (the first-byte or whole-request budget, then the
relay's idle timeout) that almost never fires. ``loop.call_at`` per attempt costs a timer handle,
a libuv timer start and, on cancel, a stop and a handle close: 4% of the router's CPU at c=32 in
the bench-proxy profile (py-spy ``--gil``). Here a deadline joins the set of its bucket, a dict
and a set operation; a bucket has one timer, shared by every deadline due in it.

A bucket is a multiple of a power-of-two ``grid`` of about 1/32 of the deadline's own length
(clamped to [2 ms, 1 s]), so a deadline fires at most ~3% (and at most 1 s) after it is due, and a
steady stream of requests with the same budget arms about one timer per grid step.
"""

from __future__ import annotations

import asyncio
import math
import weakref
from typing import Protocol

_MIN_EXP = -9  # 2**-9 s ~ 2 ms: the finest grid
_MAX_EXP = 0  # 1 s: the coarsest grid (a 60 s budget fires at most 1 s late)
_FRACTION = 32  # grid ~ deadline length / 32


class Due(Protocol):
    def expired(self) -> None:
        """Called at (or shortly after) the due time; may add itself again (a later due)."""


Bucket = tuple[int, int]  # (grid exponent, grid steps since the loop clock's zero)


def _grid_exp(length: float) -> int:
    if length <= 0:
        return _MIN_EXP
    return max(_MIN_EXP, min(_MAX_EXP, math.floor(math.log2(length / _FRACTION))))


class Deadlines:
    """Buckets of deadlines on one event loop (``loop`` is passed in, never kept)."""

    __slots__ = ("_buckets",)

    def __init__(self) -> None:
        self._buckets: dict[Bucket, set[Due]] = {}

    def add(self, loop: asyncio.AbstractEventLoop, item: Due, due: float, length: float) -> Bucket:
        """Call ``item.expired()`` at ``due`` (a little later: see the module doc). ``length``:
        how long the deadline is, which sets the grid. Returns the bucket, for ``discard``."""
        exp = _grid_exp(length)
        key = (exp, math.ceil(math.ldexp(due, -exp)))
        members = self._buckets.get(key)
        if members is None:
            members = self._buckets[key] = set()
            loop.call_at(math.ldexp(key[1], exp), self._fire, key)
        members.add(item)
        return key

    def discard(self, item: Due, key: Bucket) -> None:
        members = self._buckets.get(key)
        if members is not None:
            members.discard(item)

    def pending(self) -> int:
        return sum(map(len, self._buckets.values()))

    def _fire(self, key: Bucket) -> None:
        for item in self._buckets.pop(key, ()):
            item.expired()


_PER_LOOP: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Deadlines] = weakref.WeakKeyDictionary()


def deadlines(loop: asyncio.AbstractEventLoop) -> Deadlines:
    """The loop's deadline buckets (they hold no reference to the loop: the entry goes with it)."""
    d = _PER_LOOP.get(loop)
    if d is None:
        d = _PER_LOOP[loop] = Deadlines()
    return d
