"""Live closed-loop replay (``kvrouter replay --closed-loop``): a session's turn is sent when the
turns it waits for have finished, plus its tool pause (traces/closed_loop.py), as an agent does.

Roots (first turns, sessionless requests) go on the trace clock as in open loop; every other
request is scheduled when its last predecessor settles (a failed predecessor releases it too: an
agent retries or moves on, and a stalled session would hide the rest of the trace). A request
whose predecessor never settled is recorded as an error (``not sent``). The run ends when every
request has settled, or ``duration_s`` (if set) plus ``grace_s`` after the start, when whatever is
still running is cancelled, as in open loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

import aiohttp

from .closed_loop import DEFAULT_DECODE_TPS, ClosedLoop
from .records import RequestRecord
from .replay import Planned, ReplayConfig, Target, TargetRun, _send_one, finish_run

NOT_SENT = "not sent: a turn it waits for did not finish before the run ended"


async def run_target_closed(  # noqa: C901 -- the closed-loop schedule and its settle/cancel ends together
    target: Target,
    planned: Sequence[Planned],
    cfg: ReplayConfig,
    *,
    sess: aiohttp.ClientSession,
    progress: Callable[[str], None] | None = None,
) -> TargetRun:
    by_id = {p.req.request_id: p for p in planned}
    loop = ClosedLoop([p.req for p in planned], cfg.speedup, cfg.decode_tps or DEFAULT_DECODE_TPS)
    records: dict[str, RequestRecord] = {}
    tasks: set[asyncio.Task[None]] = set()
    lateness: list[float] = []
    settled = asyncio.Event()
    left = len(planned)
    t0 = time.perf_counter()

    def spawn(at: float, p: Planned) -> None:
        t = asyncio.create_task(send(at, p))
        tasks.add(t)
        t.add_done_callback(tasks.discard)

    async def send(at: float, p: Planned) -> None:
        nonlocal left
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        now = time.perf_counter()
        lateness.append(max(0.0, now - t0 - at))
        rec = RequestRecord(
            request_id=p.req.request_id, target=target.name, send_s=now - t0, prompt_tokens=p.req.input_length
        )
        records[p.req.request_id] = rec
        try:
            await asyncio.wait_for(_send_one(sess, target, cfg, p, t0, rec), cfg.request_timeout_s)
        except TimeoutError:
            rec.error = f"timeout after {cfg.request_timeout_s:g} s"
            rec.e2e_s = None
        except Exception as exc:
            # A request that fails in an unexpected way (a malformed usage field, ...) must still
            # settle and release its session's next turns, or the run would wait for it forever.
            rec.error = f"{type(exc).__name__}: {exc}"[:300]
            rec.e2e_s = None
        for at2, r in loop.finished(p.req.request_id, time.perf_counter() - t0):
            spawn(at2, by_id[r.request_id])
        left -= 1
        if left == 0:
            settled.set()
        if progress is not None and left % 500 == 0:
            progress(f"  {target.name}: {len(planned) - left}/{len(planned)} settled, {len(tasks)} in flight")

    for at, r in loop.roots():
        spawn(at, by_id[r.request_id])
    cancelled = 0
    try:
        if planned:
            limit = None if cfg.duration_s is None else cfg.duration_s + cfg.grace_s
            try:
                await asyncio.wait_for(settled.wait(), limit)
            except TimeoutError:
                pass
        pending = [t for t in tasks if not t.done()]
        for t in pending:
            t.cancel()
        cancelled = len(pending)
        if pending:
            await asyncio.wait(pending, timeout=5.0)
    finally:
        for t in list(tasks):
            if not t.done():
                t.cancel()
    wall = time.perf_counter() - t0
    out: list[RequestRecord] = []
    for p in planned:
        rec = records.get(p.req.request_id)
        if rec is None:
            rec = RequestRecord(
                request_id=p.req.request_id, target=target.name, send_s=wall, prompt_tokens=p.req.input_length
            )
            rec.error = NOT_SENT
        out.append(rec)
    return finish_run(target, out, wall, lateness, cancelled)
