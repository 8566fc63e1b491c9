"""Reliability harness shared by tests/reliability and tests/soak/soak.py: a `kvrouter sim` fleet
subprocess with fault knobs, and one classifier for what a client got back.

Outcomes (docs/reliability.md):

* ``ok``: 200 with a complete body (JSON with ``choices``, or SSE ending in ``[DONE]`` and no error
  event);
* ``failed_clean``: an OpenAI-style JSON error body, or an SSE stream that ends with an error event
  and ``[DONE]``;
* ``lost``: anything else: a hang past the client timeout, a malformed body, a stream that stops
  without ``[DONE]``, a reset without an error.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from tests.support import procs
from tests.support.procs import http, wait_for
from traces import fleetproc

__all__ = ["Outcome", "SimFleet", "SimReplica", "call", "classify_sse", "debug_replicas", "wait_for"]


class SimReplica(fleetproc.SimReplica):
    """A replica announced by ``kvrouter sim``, with its fault knobs (``/sim/faults``)."""

    def faults(self, **kw: Any) -> dict[str, Any]:
        if kw.get("refuse_connections"):
            # the replica stops listening while it answers, so the answer itself may be cut
            try:
                http("POST", self.url + "/sim/faults", kw, timeout=5)
            except OSError:
                pass
            return kw
        deadline = time.monotonic() + 10  # a refusing replica listens again after refuse_for_s
        while True:
            try:
                code, _, body = http("POST", self.url + "/sim/faults", kw, timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert code == 200, body
        return dict(json.loads(body))

    def injected(self) -> dict[str, int]:
        return dict(json.loads(http("GET", self.url + "/sim/faults", timeout=5)[2])["injected"])


class SimFleet(procs.SimFleet):
    """``kvrouter sim`` with ``n`` replicas on free ports (HTTP, KV events, replay)."""

    replicas: list[SimReplica]  # type: ignore[assignment]

    def __init__(self, log_dir: Path, n: int, *extra: str, name: str = "sim", timeout: float = 20.0) -> None:
        super().__init__(log_dir, n, *extra, name=name, timeout=timeout)
        self.replicas = [SimReplica(r.name, r.url, r.events) for r in self.replicas]

    def clear_faults(self) -> None:
        for r in self.replicas:
            r.faults()


@dataclass
class Outcome:
    kind: str  # ok | failed_clean | lost
    status: int | None
    latency_s: float
    why: str = ""


def _is_error_body(raw: bytes) -> bool:
    try:
        err = json.loads(raw)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(err, dict) and isinstance(err.get("message"), str) and isinstance(err.get("type"), str)


def classify_sse(raw: bytes) -> tuple[str, str]:
    events = [e.strip() for e in raw.replace(b"\r\n", b"\n").split(b"\n\n") if e.strip()]
    if not events or events[-1] != b"data: [DONE]":
        return "lost", "stream ended without [DONE]"
    error = False
    for ev in events[:-1]:
        if not ev.startswith(b"data: "):
            return "lost", f"not an SSE data line: {ev[:80]!r}"
        try:
            obj = json.loads(ev[6:])
        except ValueError:
            return "lost", f"SSE event is not JSON: {ev[:80]!r}"
        if isinstance(obj, dict) and "error" in obj:
            if not _is_error_body(ev[6:]):
                return "lost", "malformed SSE error event"
            error = True
    return ("failed_clean", "sse error event") if error else ("ok", "")


async def call(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any] | bytes,
    *,
    timeout: float = 15.0,
    headers: dict[str, str] | None = None,
) -> Outcome:
    """One request, classified; never raises for what a server can do to a client."""
    stream = isinstance(body, dict) and bool(body.get("stream"))
    t0 = time.perf_counter()
    status: int | None = None
    kw: dict[str, Any] = {"json": body} if isinstance(body, dict) else {"data": body}
    try:
        async with asyncio.timeout(timeout):
            async with session.post(url, headers=headers, **kw) as resp:
                status = resp.status
                raw = await resp.read()
                ctype = resp.headers.get("Content-Type", "")
    except TimeoutError:
        return Outcome("lost", status, time.perf_counter() - t0, "hang past client timeout")
    except (aiohttp.ClientError, OSError) as exc:
        return Outcome("lost", status, time.perf_counter() - t0, f"{type(exc).__name__}: {exc}")
    dt = time.perf_counter() - t0
    if status >= 400:
        if _is_error_body(raw):
            return Outcome("failed_clean", status, dt)
        return Outcome("lost", status, dt, f"error without an OpenAI body: {raw[:120]!r}")
    if stream or ctype.startswith("text/event-stream"):
        kind, why = classify_sse(raw)
        return Outcome(kind, status, dt, why)
    try:
        ok = "choices" in json.loads(raw)
    except ValueError:
        ok = False
    return (
        Outcome("ok", status, dt) if ok else Outcome("lost", status, dt, f"malformed 200 body: {raw[:120]!r}")
    )


def debug_replicas(router_url: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    code, _, body = http("GET", router_url + "/debug/replicas", headers=headers)
    assert code == 200, body
    return dict(json.loads(body))
