"""Replica monitor: everything the router learns about a replica by asking it over the network.

Per replica, one task runs three clocks:

* **probe** ``GET /health`` every ``probe_interval_s``: ``eject_after_failures`` consecutive
  failures (probes or proxied requests, see passive.py) eject it from routing; passing
  probes re-admit it. New replicas start ejected and join on their first passing probe, so
  readiness means "at least one replica answered".
* **scrape** ``GET /metrics`` every ``metrics_interval_s``: engine running/waiting/KV usage,
  prefix-cache counters (parity fallback), ``vllm:cache_config_info`` (block size and KV
  capacity: the router adopts the engines' block size and bounds each replica's index to its
  ``num_gpu_blocks``; block_size.py).
* **models** ``GET /v1/models`` at start, on re-admission and every ``models_interval_s``.

KV events: once a replica answers, its event source is taken from configuration, else (mode
``auto``/``on``) from its ``GET /kv_event_sources``, and handed to the KVEventManager.

All state changes happen synchronously in the registry; tasks only await I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import aiohttp
import msgspec
import xxhash

from router.config import Config
from router.http.upstream import UpstreamPool
from router.kv.sources import resolve_event_source
from router.kv.subscriber import KVEventManager
from router.metrics import RouterMetrics
from router.replicas.block_size import BlockSizeAdoption
from router.replicas.engine_metrics import EngineMetrics, parse_engine_metrics
from router.replicas.passive import PassiveHealth
from router.replicas.registry import Replica, ReplicaRegistry
from router.routing import Router
from router.types import ReplicaId

log = logging.getLogger("kvrouter.health")


class ReplicaMonitor:
    """Probes, scrapes and model lists per replica; follows its KV events once admitted."""

    def __init__(
        self,
        cfg: Config,
        registry: ReplicaRegistry,
        router: Router,
        session: aiohttp.ClientSession,
        metrics: RouterMetrics,
        kv_events: KVEventManager | None,
        passive: PassiveHealth,
        on_engine_metrics: Callable[[Replica, EngineMetrics], None] | None = None,
        pool: UpstreamPool | None = None,
    ) -> None:
        self.cfg = cfg
        # The /metrics scrape (every metrics_interval_s per replica) goes through the proxy's raw
        # keep-alive pool when given: through aiohttp's client a scrape cost more CPU than a
        # long-prompt request's own routing share (bench-long-prompt profile, 8 replicas).
        self.pool = pool
        key = cfg.upstream.api_key
        self._auth_line = b"Authorization: Bearer " + key.encode() + b"\r\n" if key else b""
        self.registry = registry
        self.router = router
        self.session = session
        self.metrics = metrics
        self.kv_events = kv_events
        self.passive = passive
        self.block_size = BlockSizeAdoption(router, kv_events)
        self.on_engine_metrics = on_engine_metrics
        self._tasks: dict[ReplicaId, list[asyncio.Task[None]]] = {}
        self._model_cards: dict[ReplicaId, list[dict[str, Any]]] = {}
        self._explicit_events = _explicit_event_endpoints(cfg.kv_events.endpoints)
        registry.on_change(self._on_registry_change)

    # ---- registry wiring ------------------------------------------------------------------

    def _on_registry_change(self, event: str, rep: Replica) -> None:
        if event == "added":
            rep.healthy = False  # joins on its first passing probe
            self._start(rep)
        elif event == "removed":
            self._stop(rep.id)

    def _start(self, rep: Replica) -> None:
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(self._probe_loop(rep), name=f"probe:{rep.id}")]
        if self.cfg.health.scrape_metrics:
            tasks.append(loop.create_task(self._scrape_loop(rep), name=f"scrape:{rep.id}"))
        self._tasks[rep.id] = tasks

    def _stop(self, rid: ReplicaId) -> None:
        for t in self._tasks.pop(rid, []):
            t.cancel()
        self._model_cards.pop(rid, None)
        if self.kv_events is not None:
            self.kv_events.remove(rid)

    async def close(self) -> None:
        tasks = [t for ts in self._tasks.values() for t in ts]
        for rid in list(self._tasks):
            self._stop(rid)
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    # ---- active loops ---------------------------------------------------------------------

    async def _get(self, rep: Replica, path: str, timeout: float) -> tuple[int, bytes]:
        headers = {}
        if self.cfg.upstream.api_key:
            headers["Authorization"] = f"Bearer {self.cfg.upstream.api_key}"
        async with self.session.get(
            rep.url + path, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            return resp.status, await resp.read()

    async def _get_pooled(
        self, pool: UpstreamPool, rep: Replica, path: str, timeout: float
    ) -> tuple[int, bytes]:
        async with asyncio.timeout(timeout):
            up = await pool.request(rep.url, "GET", path.encode(), self._auth_line, b"")
            try:
                parts = []
                while chunk := await up.read():
                    parts.append(chunk)
                return up.status, b"".join(parts)
            finally:
                up.close()

    async def probe(self, rep: Replica) -> bool:
        try:
            status, _ = await self._get(rep, "/health", self.cfg.health.probe_timeout_s)
            ok = status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            ok = False
        if ok:
            rep.consecutive_successes += 1
            if not rep.healthy and rep.consecutive_successes >= self.cfg.health.readmit_after_successes:
                await self._on_admit(rep)
                # _on_admit awaited I/O: the replica may have left or failed meanwhile
                if self.registry.get(rep.id) is not rep or rep.healthy or rep.consecutive_successes == 0:
                    return ok
                rep.consecutive_failures = 0
                self.registry.set_healthy(rep, True)
                log.info("replica %s admitted", rep.id)
        else:
            self.passive.record_failure(rep, "probe")
        return ok

    async def _probe_loop(self, rep: Replica) -> None:
        interval = self.cfg.health.probe_interval_s
        models_every = max(1, int(self.cfg.health.models_interval_s / interval))
        n = 0
        while True:
            await self.probe(rep)
            n += 1
            if rep.healthy and n % models_every == 0:
                await self._refresh_models(rep)
            await asyncio.sleep(interval)

    async def _on_admit(self, rep: Replica) -> None:
        await self._refresh_models(rep)
        if self.cfg.health.scrape_metrics:
            # Learn block size and KV capacity before following events, so the subscription
            # starts with the engine's block size rather than the configured default.
            await self._scrape_once(rep, self.cfg.health.probe_timeout_s * 2)
        if self.kv_events is not None and self.cfg.kv_events.mode != "off":
            await self._subscribe_events(rep)

    async def _refresh_models(self, rep: Replica) -> None:
        if rep.spec.models:
            return  # pinned by discovery/config
        try:
            status, body = await self._get(rep, "/v1/models", self.cfg.health.probe_timeout_s * 2)
            if status != 200:
                return
            data = msgspec.json.decode(body)
            cards = [c for c in data.get("data", []) if isinstance(c, dict) and isinstance(c.get("id"), str)]
        except (aiohttp.ClientError, TimeoutError, OSError, msgspec.DecodeError, AttributeError):
            return
        self._model_cards[rep.id] = cards
        base = [c["id"] for c in cards if not c.get("parent")]  # adapters name their parent
        self.registry.set_models(rep, [c["id"] for c in cards], base)

    def model_cards(self) -> list[dict[str, Any]]:
        """Union of the replicas' /v1/models entries, first card per id wins."""
        seen: dict[str, dict[str, Any]] = {}
        for rep in self.registry:
            for card in self._model_cards.get(rep.id, []):
                seen.setdefault(card["id"], card)
            for m in rep.models:
                seen.setdefault(m, {"id": m, "object": "model", "owned_by": "kvrouter"})
        return list(seen.values())

    async def _subscribe_events(self, rep: Replica) -> None:
        assert self.kv_events is not None
        # vLLM keys base-model blocks with no name at all; the router seeds them with the base
        # model's first served name, never with whichever id (an adapter?) sorts first (audit #11)
        model = rep.base_model or (
            rep.spec.models[0] if rep.spec.models else next(iter(sorted(rep.models)), "")
        )
        sources: list[tuple[str, str | None, str, bool]] = []
        explicit = self._explicit_events.get(rep.url) or rep.spec.kv_events
        if explicit:
            sources.append((explicit, rep.spec.kv_replay, self.cfg.kv_events.topic, rep.spec.kv_events_bind))
        else:
            try:
                status, body = await self._get(rep, "/kv_event_sources", self.cfg.health.probe_timeout_s * 2)
                if status == 200:
                    for src in resolve_event_source(rep.url, body):
                        sources.append((src.endpoint, src.replay_endpoint, src.topic, src.bind))
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                log.info("replica %s: no KV event source (%s); routing on speculation", rep.id, exc)
        if not sources:
            if self.cfg.kv_events.mode == "on":
                log.warning("replica %s: KV events required (--kv-events on) but none found", rep.id)
            return
        # vLLM --data-parallel-size N behind one URL publishes one stream per rank (port + rank)
        # and balances ranks itself unless a request names one: each rank is a routing target
        # with its own index slot and stream, pinned with X-data-parallel-rank (audit #42).
        if rep.dp_rank is None and len(sources) > 1:
            rep.dp_rank = 0
            for rank in range(1, len(sources)):
                self.registry.add_rank(rep, rank)
        rank = rep.dp_rank or 0
        if rank >= len(sources):
            return
        endpoint, replay, topic, bind = sources[rank]
        self.kv_events.add(
            rep.id, endpoint, replay, topic=topic, bind=bind, model=model, block_size=self.router.block_size
        )
        rep.has_kv_events = True
        log.info("replica %s: following KV events on %s", rep.id, endpoint)

    async def _scrape_once(self, rep: Replica, timeout: float) -> None:
        try:
            if self.pool is not None:
                status, body = await self._get_pooled(self.pool, rep, "/metrics", timeout)
            else:
                status, body = await self._get(rep, "/metrics", timeout)
            if status == 200:
                self.apply_engine_metrics(rep, parse_engine_metrics(body.decode("utf-8", "replace")))
            else:
                rep.metrics_ok = False
        except (aiohttp.ClientError, TimeoutError, OSError):
            rep.metrics_ok = False

    async def _scrape_loop(self, rep: Replica) -> None:
        interval = self.cfg.health.metrics_interval_s
        timeout = max(interval * 4, self.cfg.health.probe_timeout_s)
        # Admission already scraped once. Replicas found together would otherwise be scraped
        # together every interval, for good: a burst of renders on the engines (one core for a
        # whole simulated fleet) and of parses here. Each replica gets its own phase instead.
        await asyncio.sleep(scrape_phase(rep.id, interval))
        while True:
            if rep.healthy:
                await self._scrape_once(rep, timeout)
            await asyncio.sleep(interval)

    def apply_engine_metrics(self, rep: Replica, m: EngineMetrics) -> None:
        rep.set_engine_load(m.running, m.waiting, m.kv_usage)
        rep.metrics_ok = True
        if m.block_size and m.block_size != rep.block_size:
            rep.block_size = m.block_size
            self.block_size.observe(m.block_size, rep)
        if m.num_gpu_blocks and m.num_gpu_blocks != rep.num_gpu_blocks:
            rep.num_gpu_blocks = m.num_gpu_blocks
            self.registry.index.set_capacity(rep.id, min(m.num_gpu_blocks, self.cfg.routing.index_capacity))
        if self.on_engine_metrics is not None:
            self.on_engine_metrics(rep, m)  # parity reads the prefix-cache counters there


def _explicit_event_endpoints(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        url, _, endpoint = pair.partition("=")
        out[url.rstrip("/")] = endpoint
    return out


def scrape_phase(replica_id: str, interval_s: float) -> float:
    """A replica's scrape offset in ``[0, interval_s)``: stable for its id (so a restart of the
    router keeps the spread) and uniform over ids, as Prometheus spreads its targets' scrapes."""
    return xxhash.xxh3_64_intdigest(replica_id.encode()) / 2**64 * interval_s
