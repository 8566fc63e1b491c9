"""router/http/deadlines.py: deadlines share one loop timer per bucket, fire at most a grid step
late, never early, and a discarded one never fires."""

from __future__ import annotations

import asyncio
import gc

from router.http import deadlines as dl
from router.http.proxy import _IdleTimer


class _Rec:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.at: float | None = None

    def expired(self) -> None:
        self.at = self.loop.time()


def test_fires_after_due_within_one_grid_step() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        d = dl.Deadlines()
        length = 0.2
        recs = [_Rec(loop) for _ in range(5)]
        dues = [loop.time() + length + i * 0.01 for i in range(5)]
        for r, due in zip(recs, dues, strict=True):
            d.add(loop, r, due, length)
        await asyncio.sleep(length + 0.2)
        step = 2.0 ** dl._grid_exp(length)
        for r, due in zip(recs, dues, strict=True):
            assert r.at is not None and r.at >= due - 1e-3  # the loop's clock resolution
            assert r.at - due < step + 0.1  # + scheduling slack on a loaded machine
        assert d.pending() == 0

    asyncio.run(main())


def test_discarded_deadline_never_fires() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        d = dl.Deadlines()
        r = _Rec(loop)
        key = d.add(loop, r, loop.time() + 0.05, 0.05)
        d.discard(r, key)
        await asyncio.sleep(0.15)
        assert r.at is None

    asyncio.run(main())


def test_same_budget_deadlines_share_a_timer() -> None:
    """A burst of requests with one budget arms one loop timer, not one each."""

    async def main() -> int:
        loop = asyncio.get_running_loop()
        before = len(loop._scheduled)  # type: ignore[attr-defined]
        timers = [_IdleTimer(60.0) for _ in range(200)]
        for t in timers:
            t.__enter__()
        armed = len(loop._scheduled) - before  # type: ignore[attr-defined]
        for t in timers:
            t.__exit__(None, None, None)
        return armed

    assert asyncio.run(main()) <= 2  # a burst may straddle a bucket boundary


def test_grid_is_clamped() -> None:
    assert dl._grid_exp(0.0) == dl._MIN_EXP
    assert dl._grid_exp(0.001) == dl._MIN_EXP
    assert dl._grid_exp(3600.0) == dl._MAX_EXP
    assert 2.0 ** dl._grid_exp(1.0) <= 1.0 / dl._FRACTION


def test_a_closed_loop_leaves_no_entry() -> None:
    async def main() -> None:
        with _IdleTimer(1.0):
            pass

    n = len(dl._PER_LOOP)
    asyncio.run(main())
    gc.collect()
    assert len(dl._PER_LOOP) == n
