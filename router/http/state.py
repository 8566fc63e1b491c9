"""What the HTTP side holds: the request path's dependencies, the drain guard, the app state.

``RequestPath`` is all that serving a generate request needs (generate.py, fastpath.py, the
aiohttp handler); it exists once the upstream pool and forwarder do, so it is built at start-up
and nothing in it is ever ``None``. ``AppState`` is what ``create_app`` builds (no I/O, no loop);
``Running`` is what the lifecycle starts (sessions, sockets, tasks) and tears down.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from router.admission import Admission
from router.config import Config
from router.discovery import DiscoverySource
from router.errors import Draining
from router.http.client_limits import ClientLimits
from router.http.prompt_limits import ContextLimits
from router.http.proxy import Forwarder
from router.http.upstream import UpstreamPool
from router.index import PrefixIndex
from router.kv.lmcache_lookup import CoordinatorLookup
from router.kv.subscriber import KVEventManager
from router.metrics import RouterMetrics
from router.parity import ParityTracker
from router.pd.route import PDRouter
from router.replicas.monitor import ReplicaMonitor
from router.replicas.registry import ReplicaRegistry
from router.routing import Router
from router.types import ReplicaSpec


class DrainGuard:
    """Counts handled requests so the drain knows when the last one finished; refuses new ones
    (503 + Retry-After) once the drain's grace window is over. ``with guard:`` per request."""

    __slots__ = ("active", "draining", "idle", "refusing")

    def __init__(self) -> None:
        self.draining = False  # readiness false; still serving during the grace window
        self.refusing = False  # past the grace window: new requests get 503
        self.active = 0  # requests being handled (drain waits for 0)
        self.idle = asyncio.Event()
        self.idle.set()

    def __enter__(self) -> None:
        if self.refusing:
            raise Draining()
        self.active += 1
        self.idle.clear()

    def __exit__(self, *exc: object) -> None:
        self.active -= 1
        if self.active == 0:
            self.idle.set()


@dataclass(frozen=True, slots=True)
class RequestPath:
    """Everything one generate request touches, shared by the aiohttp handler and the fast path."""

    cfg: Config
    router: Router
    admission: Admission
    forwarder: Forwarder
    metrics: RouterMetrics
    drain: DrainGuard
    limits: ClientLimits  # deadlines, body budget, per-client limits (client_limits.py)
    context: ContextLimits  # prompt size against max_model_len (prompt_limits.py)
    pd: PDRouter | None = None  # prefill/decode disaggregation (router/pd/route.py)
    cpu_lookup: CoordinatorLookup | None = None  # lookup mode (router/kv/lmcache_lookup.py)


@dataclass(slots=True)
class AppState:
    """Built by ``create_app``: the routing core, no I/O yet."""

    cfg: Config
    metrics: RouterMetrics
    index: PrefixIndex
    registry: ReplicaRegistry
    router: Router
    parity: ParityTracker
    admission: Admission
    limits: ClientLimits
    drain: DrainGuard = field(default_factory=DrainGuard)
    sources: Sequence[DiscoverySource] | None = None  # None: from the config
    published: dict[str, list[ReplicaSpec]] = field(default_factory=dict)  # by discovery source
    openapi: bytes | None = None  # GET /openapi.json body, built on first use


@dataclass(slots=True)
class Running:
    """Started by the app's lifecycle, closed by it: connections, monitors, discovery tasks."""

    session: aiohttp.ClientSession
    kv_events: KVEventManager | None  # None when kv_events.mode is off
    monitor: ReplicaMonitor
    pool: UpstreamPool
    path: RequestPath
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


STATE: web.AppKey[AppState] = web.AppKey("kvrouter_state", AppState)
RUNNING: web.AppKey[Running] = web.AppKey("kvrouter_running", Running)
