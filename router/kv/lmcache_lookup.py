"""Lookup mode: ask LMCache's MP coordinator what the CPU tier holds when it publishes no events.

LMCache's default CPU transfer mode (``engine_driven``) serves external hits but puts no CPU-tier
event on vLLM's KV-event stream (docs/real-engines.md §10), so the index cannot know the tier from
events. The MP coordinator (``python -m lmcache.v1.mp_coordinator``, servers started with
``--coordinator-event-reporting``) keeps a directory of every chunk's placements:

    POST {coordinator}/directory/lookup {"token_ids": [...], "model_name": MODEL_PATH, "world_size": 1}
    -> {"chunks": n, "results": [{"placements": [{"instance_id": "mp0", "tier": "l1", ...}], ...}, ...]}

one result per whole chunk of the prompt (tests/router/golden/lmcache-0.5.6-directory-lookup.json).

``CoordinatorLookup.refresh(req, token_ids)`` runs before the request is routed. Per instance it
takes the chunks held from position 0 up to the first miss (LMCache loads a prefix, nothing after a
gap), maps the instance to its replicas (``lmcache.instances``), and writes that prefix into their
CPU tier in the index as *speculative* blocks that expire after ``cache_s``; chunks beyond it that
the index still credits are withdrawn. The match then credits the tier exactly as with events.

Cost per request is bounded:
* only token-keyed prompts of at least ``min_tokens`` with a whole chunk to ask about;
* not when some replica's GPU prefix already covers every whole chunk (LMCache could add nothing);
* one answer per chunk-aligned prefix per ``cache_s`` (the index keeps it), and concurrent
  requests for the same prefix share one call;
* ``timeout_s`` per call, after which the request routes on what the index knows;
* a circuit breaker: ``breaker_failures`` consecutive failures stop all calls for
  ``breaker_open_s``, then one probe decides.

Metrics: ``kvrouter_lmcache_lookups_total{outcome}``, ``kvrouter_lmcache_lookup_seconds``,
``kvrouter_lmcache_breaker_open``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from router.index import PrefixIndex
from router.types import BlockHash, KeyMode, ReplicaId, RequestInfo, Tier

log = logging.getLogger("kvrouter.lmcache")

OUTCOMES = ("ok", "error", "timeout", "breaker_open", "cached", "shared", "short", "gpu_covered")
_CACHE_ENTRIES = 4096  # chunk-aligned prefixes remembered (their answers live in the index)


class _Placement(msgspec.Struct, gc=False):
    instance_id: str
    tier: str = ""


class _Result(msgspec.Struct, gc=False):
    placements: list[_Placement] = []


class _Response(msgspec.Struct, gc=False):
    results: list[_Result] = []


_DECODER = msgspec.json.Decoder(_Response)
_ENCODER = msgspec.json.Encoder()


class LookupError_(RuntimeError):
    """The coordinator did not answer usefully (status, body, connection)."""


class Transport(Protocol):
    async def post(self, url: str, body: bytes, timeout_s: float) -> bytes:
        """POST JSON, return the body of a 200 answer; raise on anything else."""
        ...


class AiohttpTransport:
    """The live transport: one aiohttp session, shared with the router's other clients."""

    def __init__(self, session: object) -> None:
        self.session = session

    async def post(self, url: str, body: bytes, timeout_s: float) -> bytes:
        import aiohttp

        assert isinstance(self.session, aiohttp.ClientSession)
        async with self.session.post(
            url,
            data=body,
            headers={"content-type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as resp:
            data = await resp.read()
            if resp.status != 200:
                raise LookupError_(f"HTTP {resp.status}")
            return data


class LookupMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        kw = {"registry": registry} if registry is not None else {}
        self.lookups = Counter(
            "kvrouter_lmcache_lookups",
            "LMCache coordinator lookups by outcome (ok, error, timeout, breaker_open; skipped: "
            "cached, shared, short, gpu_covered)",
            ["outcome"],
            **kw,  # type: ignore[arg-type]
        )
        self.seconds = Histogram(
            "kvrouter_lmcache_lookup_seconds",
            "Duration of LMCache coordinator lookups that were sent",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25),
            **kw,  # type: ignore[arg-type]
        )
        self.breaker_open = Gauge(
            "kvrouter_lmcache_breaker_open",
            "1 while the coordinator lookup circuit breaker is open",
            **kw,  # type: ignore[arg-type]
        )
        self._by_outcome = {o: self.lookups.labels(o) for o in OUTCOMES}

    def count(self, outcome: str) -> None:
        self._by_outcome[outcome].inc()


def held_prefix_chunks(results: Sequence[_Result]) -> dict[str, int]:
    """Per instance id, how many chunks it holds from chunk 0 up to its first miss."""
    alive: set[str] | None = None
    out: dict[str, int] = {}
    for i, r in enumerate(results):
        here = {p.instance_id for p in r.placements}
        alive = here if alive is None else alive & here
        if not alive:
            break
        for iid in alive:
            out[iid] = i + 1
    return out


class CoordinatorLookup:
    """Asks the coordinator, writes the answer into the index's CPU tier. See the module docstring."""

    def __init__(
        self,
        index: PrefixIndex,
        transport: Transport,
        url: str,
        model_name: str,
        instances: Mapping[str, Sequence[ReplicaId]],
        *,
        chunk_tokens: int = 256,
        min_tokens: int = 256,
        timeout_s: float = 0.05,
        cache_s: float = 2.0,
        breaker_failures: int = 3,
        breaker_open_s: float = 10.0,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
        events_mode: Callable[[ReplicaId], bool] = lambda _r: False,
    ) -> None:
        self.index = index
        self.transport = transport
        self.url = url.rstrip("/") + "/directory/lookup"
        self.model_name = model_name
        self.instances = {iid: list(members) for iid, members in instances.items()}
        self.replicas = sorted({r for members in self.instances.values() for r in members})
        self.chunk_tokens = chunk_tokens
        self.min_tokens = max(min_tokens, chunk_tokens)
        self.timeout_s = timeout_s
        self.cache_s = cache_s
        self.breaker_failures = breaker_failures
        self.breaker_open_s = breaker_open_s
        self.metrics = LookupMetrics(registry)
        self.clock = clock
        self.events_mode = events_mode  # replicas whose stream carries CPU events need no lookup
        self._failures = 0
        self._open_until = 0.0
        self._probing = False
        self._answered: OrderedDict[BlockHash, float] = OrderedDict()  # prefix key -> answer time
        self._inflight: dict[BlockHash, asyncio.Future[None]] = {}

    @property
    def breaker_open(self) -> bool:
        return self._open_until > 0.0

    async def refresh(self, req: RequestInfo, token_ids: Sequence[int] | None) -> None:
        """Bring the index's CPU tier up to date for this prompt's chunks. Never raises."""
        bs = req.block_size
        chunk = self.chunk_tokens
        if (
            token_ids is None
            or req.key_mode is not KeyMode.TOKENS
            or chunk % bs
            or len(token_ids) < self.min_tokens
        ):
            self.metrics.count("short")
            return
        per = chunk // bs
        n_chunks = min(len(token_ids) // chunk, len(req.block_hashes) // per)
        if n_chunks == 0:
            self.metrics.count("short")
            return
        n_blocks = n_chunks * per
        gpu, _ = self.index.match(req.block_hashes[:n_blocks])
        if gpu and max(gpu) >= n_blocks:
            self.metrics.count("gpu_covered")
            return
        key = req.block_hashes[n_blocks - 1]  # chained: names the whole chunk-aligned prefix
        now = self.clock()
        at = self._answered.get(key)
        if at is not None and now - at < self.cache_s:
            self.metrics.count("cached")
            return
        pending = self._inflight.get(key)
        if pending is not None:
            self.metrics.count("shared")
            await asyncio.shield(pending)
            return
        if not self._breaker_allows(now):
            self.metrics.count("breaker_open")
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            await self._ask(req.block_hashes[:n_blocks], token_ids[: n_chunks * chunk], per, key)
        finally:
            del self._inflight[key]
            fut.set_result(None)

    async def _ask(
        self, hashes: Sequence[BlockHash], tokens: Sequence[int], per: int, key: BlockHash
    ) -> None:
        body = _ENCODER.encode({"token_ids": list(tokens), "model_name": self.model_name, "world_size": 1})
        t0 = time.perf_counter()
        try:
            raw = await self.transport.post(self.url, body, self.timeout_s)
            resp = _DECODER.decode(raw)
        except TimeoutError:
            self._failed("timeout")
            return
        except Exception as exc:
            self._failed("error", exc)
            return
        self.metrics.seconds.observe(time.perf_counter() - t0)
        self._failures = 0
        if self._open_until:
            self._open_until = 0.0
            self.metrics.breaker_open.set(0)
            log.warning("LMCache coordinator answers again: lookups resumed")
        self._probing = False
        self.metrics.count("ok")
        self._apply(hashes, per, held_prefix_chunks(resp.results))
        self._answered[key] = self.clock()
        self._answered.move_to_end(key)
        while len(self._answered) > _CACHE_ENTRIES:
            self._answered.popitem(last=False)

    def _apply(self, hashes: Sequence[BlockHash], per: int, held: Mapping[str, int]) -> None:
        chunks: dict[ReplicaId, int] = {}
        for iid, n in held.items():
            for rid in self.instances.get(iid, ()):
                chunks[rid] = max(chunks.get(rid, 0), n)
        for rid in self.replicas:
            if self.events_mode(rid):
                continue
            k = chunks.get(rid, 0) * per
            if k:
                self.index.store(rid, hashes[:k], Tier.CPU, speculative=True, ttl_s=self.cache_s)
            stale = [h for h in hashes[k:] if self.index.holds(rid, h, Tier.CPU)]
            if stale:  # the tier no longer holds them (LMCache evicted): stop crediting them
                self.index.remove(rid, stale, Tier.CPU)

    def _breaker_allows(self, now: float) -> bool:
        if not self._open_until:
            return True
        if now < self._open_until or self._probing:
            return False
        self._probing = True  # half-open: this one call decides
        return True

    def _failed(self, outcome: str, exc: BaseException | None = None) -> None:
        self.metrics.count(outcome)
        self._failures += 1
        self._probing = False
        if self._failures >= self.breaker_failures:
            if not self._open_until:
                log.warning(
                    "LMCache coordinator %s failed %d times (%s): lookups paused for %.0f s",
                    self.url,
                    self._failures,
                    exc or outcome,
                    self.breaker_open_s,
                )
            self._open_until = self.clock() + self.breaker_open_s
            self.metrics.breaker_open.set(1)
