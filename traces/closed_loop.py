"""Closed-loop replay of session traces: a turn is sent when the turns it waits for have finished,
plus its tool pause, as an agent does; and per-session completion time.

Open-loop replay sends every request at its trace time, so a slow turn does not delay the next
one and a session's span is fixed by the trace. An agent cannot send turn k+1 before turn k's
answer is back (it is in the prompt), and then it runs the tool. So, per request ``r``:

* **What it waits for** (``deps``): its ``parent_id`` request when that is in the run, else the
  previous request of its session (trace order); and, when its parent is a turn of its *own*
  session that spawned sub-agents (sessions whose first request names that turn as parent,
  ``traces/agentic.py``), the last request of each of those sub-agent sessions: the parent resumes
  when its last child ends. A request that waits for nothing (a session's first turn, a sessionless
  request) is a *root* and is sent at its trace time.
* **Its pause**: the gap the trace put between the end of what it waits for and its own arrival,
  ``ts(r) - max_dep(ts(dep) + output(dep) / decode_tps)`` (>= 0), where ``decode_tps`` is the
  decode speed the trace's writer assumed to space the turns (the generators' ``decode_tps``, 50
  tokens/s by default; the trace's own when its metadata carries it). That is the tool's run time.
* **Send time** in the replay: ``max_dep(finish(dep)) + pause / speedup``; roots at
  ``(ts - t0) / speedup``. A request that failed counts as finished when it failed.

The scheduler is pure (no clock, no engine): ``ClosedLoop.roots()`` and
``ClosedLoop.finished(request_id, t)`` return the requests released, with their send times; the
offline simulator (traces/simulate.py) and live replay drive it.

**Session completion time**: per session, its first request's send to its last request's last
token (``send + e2e``). Open loop it is nearly fixed by the trace; closed loop it is what an agent
waits for, so slow turns and lost KV add up across the session's turns.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .model import TraceRequest
from .records import RequestRecord, percentile

DEFAULT_DECODE_TPS = 50.0  # traces.generators.GenParams.decode_tps


def _deps(reqs: Sequence[TraceRequest]) -> dict[str, list[str]]:
    """Request id -> ids of the requests it waits for (only those in ``reqs``)."""
    by_id = {r.request_id: r for r in reqs}
    # Sub-agent sessions by the request they branched from: first request's parent_id, in a
    # session other than that parent's.
    first: dict[str, TraceRequest] = {}
    last: dict[str, TraceRequest] = {}
    for r in reqs:
        if r.session_id is None:
            continue
        first.setdefault(r.session_id, r)
        last[r.session_id] = r
    spawned: dict[str, list[str]] = {}
    for sid, f in first.items():
        par = by_id.get(f.parent_id) if f.parent_id is not None else None
        if par is not None and par.session_id != sid:
            spawned.setdefault(par.request_id, []).append(last[sid].request_id)
    deps: dict[str, list[str]] = {}
    prev_in_session: dict[str, str] = {}
    for r in reqs:
        d: list[str] = []
        par = by_id.get(r.parent_id) if r.parent_id is not None else None
        if par is not None:
            d.append(par.request_id)
            if par.session_id is not None and par.session_id == r.session_id:
                d.extend(spawned.get(par.request_id, ()))
        elif r.session_id is not None and r.session_id in prev_in_session:
            d.append(prev_in_session[r.session_id])
        if r.session_id is not None:
            prev_in_session[r.session_id] = r.request_id
        if d:
            deps[r.request_id] = d
    return deps


@dataclass(slots=True)
class ClosedLoop:
    """Which requests are released when, for one closed-loop run (see the module docstring)."""

    reqs: Sequence[TraceRequest]
    speedup: float = 1.0
    decode_tps: float = DEFAULT_DECODE_TPS
    _by_id: dict[str, TraceRequest] = field(init=False)
    _waiting: dict[str, int] = field(init=False)  # request -> predecessors not finished yet
    _waiters: dict[str, list[str]] = field(init=False)  # request -> requests waiting for it
    _ready_at: dict[str, float] = field(init=False)  # latest predecessor finish so far
    pause_s: dict[str, float] = field(init=False)  # request -> its pause, in trace seconds
    deps: dict[str, list[str]] = field(init=False)  # request -> what it waits for

    def __post_init__(self) -> None:
        if not self.speedup > 0:
            raise ValueError(f"invalid speedup: {self.speedup} (must be > 0)")
        if not self.decode_tps > 0:
            raise ValueError(f"invalid decode_tps: {self.decode_tps} (must be > 0)")
        self._by_id = {r.request_id: r for r in self.reqs}
        self.deps = deps = _deps(self.reqs)
        self._waiting = {rid: len(d) for rid, d in deps.items()}
        self._waiters = {}
        self._ready_at = {}
        self.pause_s = {}
        for rid, d in deps.items():
            r = self._by_id[rid]
            ends = [self._by_id[x].timestamp_s + self._by_id[x].output_length / self.decode_tps for x in d]
            self.pause_s[rid] = max(0.0, r.timestamp_s - max(ends))
            for x in d:
                self._waiters.setdefault(x, []).append(rid)

    def roots(self) -> list[tuple[float, TraceRequest]]:
        """Requests that wait for nothing, at their trace time (relative to the first request)."""
        if not self.reqs:
            return []
        t0 = self.reqs[0].timestamp_s
        return [
            ((r.timestamp_s - t0) / self.speedup, r) for r in self.reqs if r.request_id not in self._waiting
        ]

    def finished(self, request_id: str, t: float) -> list[tuple[float, TraceRequest]]:
        """Request ``request_id`` finished (or failed) at ``t``: the requests that become due."""
        out: list[tuple[float, TraceRequest]] = []
        for w in self._waiters.pop(request_id, ()):
            ready = max(self._ready_at.get(w, -math.inf), t)
            left = self._waiting[w] - 1
            if left:
                self._waiting[w] = left
                self._ready_at[w] = ready
                continue
            del self._waiting[w]
            self._ready_at.pop(w, None)
            out.append((ready + self.pause_s[w] / self.speedup, self._by_id[w]))
        return out

    @property
    def pending(self) -> int:
        """Requests still waiting for a predecessor."""
        return len(self._waiting)


class ArrivalQueue:
    """Due requests in send-time order (ties in the order they were released)."""

    __slots__ = ("_heap", "_seq")

    def __init__(self, items: Iterable[tuple[float, TraceRequest]] = ()) -> None:
        self._heap: list[tuple[float, int, TraceRequest]] = []
        self._seq = 0
        for t, r in items:
            self.push(t, r)

    def push(self, t: float, r: TraceRequest) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, r))

    def peek(self) -> float:
        return self._heap[0][0] if self._heap else math.inf

    def pop(self) -> tuple[float, TraceRequest]:
        t, _, r = heapq.heappop(self._heap)
        return t, r

    def __len__(self) -> int:
        return len(self._heap)


def session_completion(
    reqs: Sequence[TraceRequest], records: Mapping[str, RequestRecord]
) -> dict[str, float | int]:
    """Per session (``session_id``; a sub-agent is a session of its own): first send to last token.
    Sessions with a failed or unfinished request are left out (their end is unknown)."""
    start: dict[str, float] = {}
    end: dict[str, float] = {}
    bad: set[str] = set()
    for r in reqs:
        sid = r.session_id
        rec = records.get(r.request_id)
        if sid is None or rec is None:
            continue
        if not rec.ok or rec.e2e_s is None:
            bad.add(sid)
            continue
        start[sid] = min(start.get(sid, math.inf), rec.send_s)
        end[sid] = max(end.get(sid, -math.inf), rec.send_s + rec.e2e_s)
    spans = [end[s] - start[s] for s in start if s not in bad]
    if not spans:
        return {}
    return {
        "sessions": len(spans),
        "session_completion_mean_s": sum(spans) / len(spans),
        "session_completion_p50_s": percentile(spans, 50),
        "session_completion_p99_s": percentile(spans, 99),
    }
