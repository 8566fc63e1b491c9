"""Generation canary: catches an engine whose loop is stuck while ``/health`` still says 200.

vLLM's ``/health`` only fails on ``EngineDeadError``; a hung engine answers it forever. Dynamo's
answer (``DYN_CANARY_WAIT_TIME`` 10 s, ``DYN_HEALTH_CHECK_REQUEST_TIMEOUT`` 3 s) is the model here:
when a routable replica has had no successful completion for ``canary_after_s``, send it one
``POST /v1/completions`` with ``canary_body`` (default: one greedy token of "ping"; ``model`` is
filled in from the replica's model list) and a ``canary_timeout_s`` deadline. No answer, or a 5xx,
marks it ``canary_failed`` in the outlier detector (no traffic) until a later canary succeeds.
Replicas busy with real traffic that succeeds never see a canary: passive evidence comes first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import msgspec

from router.config import OutlierSettings
from router.replicas.outliers import EJECTED, OutlierDetector
from router.replicas.registry import Replica, ReplicaRegistry

log = logging.getLogger("kvrouter.canary")
_json = msgspec.json.Encoder()


class Canary:
    def __init__(
        self,
        cfg: OutlierSettings,
        registry: ReplicaRegistry,
        detector: OutlierDetector,
        session: aiohttp.ClientSession,
        api_key: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.registry = registry
        self.detector = detector
        self.session = session
        self.api_key = api_key
        self.clock = clock
        self.sent = 0
        self.failed = 0
        self._in_flight: set[str] = set()
        self._last_sent: dict[str, float] = {}
        self._tasks: set[asyncio.Task[bool]] = set()

    def body(self, rep: Replica) -> bytes:
        body: dict[str, Any] = dict(self.cfg.canary_body)
        if "model" not in body and rep.models:
            body["model"] = sorted(rep.models)[0]
        return _json.encode(body)

    def due(self, rep: Replica, now: float) -> bool:
        if not rep.routable or rep.id in self._in_flight:
            return False
        if self.detector.state(rep.id) == EJECTED:
            return False  # already out; it comes back through slow start and real traffic
        wait = self.cfg.canary_after_s
        quiet = now - max(self.detector.last_success(rep), self._last_sent.get(rep.id, -wait))
        return quiet >= wait

    def tick(self) -> None:
        now = self.clock()
        for rep in list(self.registry):
            if self.due(rep, now):
                self._in_flight.add(rep.id)
                self._last_sent[rep.id] = now
                t = asyncio.get_running_loop().create_task(self.probe(rep), name=f"canary:{rep.id}")
                self._tasks.add(t)
                t.add_done_callback(self._tasks.discard)

    async def probe(self, rep: Replica) -> bool:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        self.sent += 1
        t0 = self.clock()
        detail = ""
        try:
            async with self.session.post(
                rep.url + "/v1/completions",
                data=self.body(rep),
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.cfg.canary_timeout_s),
            ) as resp:
                await resp.read()
                ok = resp.status < 500
                detail = f"HTTP {resp.status}"
                if resp.status != 200:
                    log.warning("canary to %s answered %s (check --canary-body)", rep.id, resp.status)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            ok = False
            detail = type(exc).__name__
        finally:
            self._in_flight.discard(rep.id)
        if self.registry.get(rep.id) is not rep:
            return ok
        if not ok:
            self.failed += 1
            log.warning(
                "canary to %s failed after %.2fs (%s) while /health may say 200",
                rep.id,
                self.clock() - t0,
                detail,
            )
        self.detector.canary_result(rep, ok, detail)
        return ok

    async def run(self) -> None:
        if self.cfg.canary_after_s <= 0:
            return
        period = min(1.0, self.cfg.canary_after_s / 4)
        while True:
            self.tick()
            await asyncio.sleep(period)

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            try:
                await t
            except asyncio.CancelledError:
                pass
