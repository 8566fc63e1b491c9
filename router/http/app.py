"""The router process: app factory, lifecycle, serving, graceful drain.

Endpoints are in endpoints.py, middlewares in middleware.py, what they share in state.py.

Lifecycle (``cleanup_ctx``): one ClientSession with keep-alive pools, the KV-event manager, the
replica monitor (probes, scrapes), discovery tasks. SIGTERM: readiness turns false at once; new
requests are still served for ``drain_grace_s`` (load balancers need that long to notice), then
refused with 503 and the listener closed; in-flight requests get up to ``drain_timeout_s``; exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import random
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence

import aiohttp
from aiohttp import web

from router.admission import Admission
from router.config import Config
from router.discovery import DiscoverySource, build_sources
from router.http.client_limits import (
    RoutingMemoryCollector,
    client_limits_from,
    connection_cap,
    quiet_client_errors,
)
from router.http.coalesce import write_batch
from router.http.endpoints import add_routes
from router.http.fastpath import FastPath
from router.http.limits_middleware import body_middleware, target_middleware
from router.http.listener import ListenerSite, listening_socket
from router.http.middleware import auth_middleware, error_middleware
from router.http.prompt_limits import ContextLimits
from router.http.proxy import Forwarder, ForwardHooks
from router.http.state import RUNNING, STATE, AppState, RequestPath, Running
from router.http.upstream import UpstreamPool
from router.index import PrefixIndex
from router.kv.lmcache_tier import CpuTierModeCollector, build_lookup, event_sink
from router.kv.subscriber import KVEventManager
from router.metrics import RouterMetrics
from router.parity import ParityTracker
from router.pd.route import PDRouter
from router.replicas.autoscale import AutoscaleCollector
from router.replicas.canary import Canary
from router.replicas.engine_metrics import EngineMetrics
from router.replicas.monitor import ReplicaMonitor
from router.replicas.outliers import OutlierCollector, OutlierDetector
from router.replicas.passive import PassiveHealth
from router.replicas.registry import Replica, ReplicaRegistry
from router.routing import Router, RouterLimits, Tokenizer
from router.scoring.policies import build_policy
from router.sessions.tracker import SessionTracker
from router.types import ReplicaSpec

log = logging.getLogger("kvrouter.server")


def build_state(cfg: Config, tokenizer: Tokenizer | None = None) -> AppState:
    metrics = RouterMetrics()
    index = PrefixIndex(cfg.routing.index_capacity, cfg.routing.speculative_ttl_s)
    registry = ReplicaRegistry(index)
    rng = random.Random(cfg.routing.seed)
    policy = build_policy(
        cfg.routing.policy,
        rng=rng,
        weights=cfg.routing.weights,
        load_factor=cfg.routing.load_factor,
        cpu_credit=cfg.routing.cpu_tier_credit,
        cpu_load_tps=cfg.lmcache.load_tps,
        plugin_timer=metrics.plugin_timer,
    )
    parity = ParityTracker(metrics)
    outliers = OutlierDetector(cfg.outliers, registry, time.monotonic, random.Random(cfg.routing.seed))
    router = Router(
        index,
        registry,
        policy,
        block_size=cfg.routing.block_size,
        bytes_per_token=cfg.routing.bytes_per_token,
        max_blocks=cfg.routing.max_blocks,
        speculative_ttl_s=cfg.routing.speculative_ttl_s,
        approximate_ttl_s=cfg.routing.approximate_ttl_s,
        tokenizer=tokenizer,
        observer=parity,
        limits=RouterLimits(cfg.admission.max_in_flight_per_replica, cfg.admission.retry_after_s),
        on_overload=metrics.admission_rejected.labels("replica").inc,
        sessions=SessionTracker(
            capacity=cfg.sessions.capacity, idle_ttl_s=cfg.sessions.idle_ttl_s, infer=cfg.sessions.infer
        )
        if cfg.sessions.enabled
        else None,
        outliers=outliers,
    )
    router.cpu_credit = cfg.routing.cpu_tier_credit
    router.cpu_load_tps = cfg.lmcache.load_tps
    metrics.registry.register(OutlierCollector(outliers))
    metrics.registry.register(AutoscaleCollector(registry))
    admission = Admission(
        cfg.admission.max_in_flight,
        cfg.admission.max_queue,
        cfg.admission.queue_timeout_s,
        cfg.admission.retry_after_s,
        metrics.admission_rejected.labels("router").inc,
    )
    metrics.add_state_collector(lambda: registry, index, parity.collect)
    limits = client_limits_from(cfg.server, metrics.registry)
    metrics.registry.register(RoutingMemoryCollector(index))
    return AppState(cfg, metrics, index, registry, router, parity, admission, limits)


def create_app(
    cfg: Config,
    *,
    tokenizer: Tokenizer | None = None,
    sources: Sequence[DiscoverySource] | None = None,
) -> web.Application:
    """The aiohttp application. ``sources`` overrides discovery (tests); default from config."""
    r = cfg.routing
    if tokenizer is None and r.tokenizer:
        from router.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(
            r.tokenizer, r.chat_template, r.default_chat_template_kwargs, r.trust_request_chat_template
        )
    app = web.Application(
        client_max_size=cfg.server.max_body_bytes,
        middlewares=[error_middleware, target_middleware, auth_middleware, body_middleware],
        handler_args={
            "max_field_size": cfg.server.max_header_bytes,
            "max_line_size": cfg.server.max_header_bytes,
            "lingering_time": 1.0,  # a refused request's unread body: drained (not kept) 1 s, then close
            "keepalive_timeout": cfg.server.keepalive_timeout_s,
        },
    )
    state = build_state(cfg, tokenizer)
    quiet_client_errors(state.limits.log)
    if (renderer := getattr(tokenizer, "renderer", None)) is not None:
        state.metrics.registry.register(renderer)  # kvrouter_chat_renders_total, _render_exact
    state.sources = sources
    app[STATE] = state
    app.cleanup_ctx.append(_lifecycle)
    add_routes(app, debug=cfg.server.enable_debug)
    return app


# ---- lifecycle -------------------------------------------------------------------------------


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    st = app[STATE]
    cfg = st.cfg
    connector = aiohttp.TCPConnector(
        limit=0,
        limit_per_host=cfg.upstream.pool_per_replica,
        keepalive_timeout=30.0,
        ttl_dns_cache=10,
    )
    session = aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,  # relay bytes unchanged, Content-Encoding included
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=cfg.upstream.connect_timeout_s),
        skip_auto_headers=("User-Agent",),
    )
    kv_events = None
    if cfg.kv_events.mode != "off":
        kv_events = KVEventManager(
            event_sink(st.index, cfg.lmcache),
            capacity=cfg.routing.index_capacity,
            registry=st.metrics.registry,
        )
    cpu_lookup = build_lookup(cfg.lmcache, st.index, session, kv_events, st.metrics.registry)
    modes = CpuTierModeCollector(
        lambda: [r.id for r in st.registry], kv_events, cpu_lookup, cfg.lmcache.credit_cpu_tier
    )
    st.metrics.registry.register(modes)
    outliers = st.router.outliers
    assert outliers is not None
    passive = PassiveHealth(
        st.registry,
        st.metrics,
        cfg.health.eject_after_failures,
        max_ejected_fraction=cfg.health.max_ejected_fraction,
        last_success=outliers.last_success,
        probe_grace_s=cfg.outliers.probe_grace_s,
    )

    def on_engine_metrics(rep: Replica, m: EngineMetrics) -> None:
        st.parity.on_engine_metrics(rep, m)
        outliers.observe_engine(rep, m.preemptions, m.kv_usage, m.transfer_failures)

    def on_success(rep: Replica) -> None:
        passive.record_success(rep)
        outliers.record_success(rep)

    def on_failure(rep: Replica, reason: str) -> None:
        passive.record_failure(rep, reason)
        outliers.record_failure(rep, reason)

    pool = UpstreamPool(
        connect_timeout_s=cfg.upstream.connect_timeout_s, max_idle_per_origin=cfg.upstream.pool_per_replica
    )
    monitor = ReplicaMonitor(
        cfg,
        st.registry,
        st.router,
        session,
        st.metrics,
        kv_events,
        passive,
        on_engine_metrics=on_engine_metrics,
        pool=pool,
    )
    forwarder = Forwarder(
        pool,
        st.router,
        cfg.upstream,
        st.metrics,
        ForwardHooks(on_success, on_failure),
        replica_header=cfg.server.replica_header,
    )
    context = ContextLimits(
        monitor.model_cards,
        max_chars_per_token=cfg.routing.max_chars_per_token,
        offload_parse_bytes=cfg.routing.offload_parse_bytes,
    )
    pd = PDRouter(cfg.pd, st.router, st.registry, forwarder, pool, st.metrics.registry, cfg.upstream.api_key)
    path = RequestPath(
        cfg, st.router, st.admission, forwarder, st.metrics, st.drain, st.limits, context, pd, cpu_lookup
    )
    run = Running(session, kv_events, monitor, pool, path)
    app[RUNNING] = run
    canary = Canary(cfg.outliers, st.registry, outliers, session, cfg.upstream.api_key)
    loop = asyncio.get_running_loop()
    drain = st.drain
    write_batch(loop).busy = lambda: drain.active > 1  # coalesce only when writes can share a pass
    if cfg.outliers.enabled:
        run.tasks.append(loop.create_task(_evaluate_outliers(outliers), name="outliers"))
        run.tasks.append(loop.create_task(canary.run(), name="canary"))
    sources = st.sources if st.sources is not None else _default_sources(cfg)
    for src in sources:
        run.tasks.append(
            asyncio.get_running_loop().create_task(_run_source(st, src), name=f"discovery:{src.name}")
        )
    try:
        yield
    finally:
        for t in run.tasks:
            t.cancel()
        for t in run.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await pd.close()
        await canary.close()
        await monitor.close()
        if kv_events is not None:
            await kv_events.close()
        await session.close()
        pool.close()


async def _evaluate_outliers(outliers: OutlierDetector) -> None:
    while True:
        await asyncio.sleep(outliers.cfg.interval_s)
        outliers.evaluate()


def _default_sources(cfg: Config) -> list[DiscoverySource]:
    return build_sources(cfg.discovery)  # --backend URLs are in discovery.static (config.py)


async def _run_source(st: AppState, src: DiscoverySource) -> None:
    """Each source publishes its full set; the registry holds the union over all sources."""

    def publish(specs: Sequence[ReplicaSpec]) -> None:
        st.published[src.name] = list(specs)
        merged: dict[str, ReplicaSpec] = {}
        for source_specs in st.published.values():
            for spec in source_specs:
                merged.setdefault(spec.id, spec)
        added, removed = st.registry.sync(merged.values())
        for r in added:
            log.info("replica %s joined (%s)", r.id, src.name)
        for r in removed:
            st.parity.forget(r.id)
            log.info("replica %s left (%s)", r.id, src.name)

    await src.run(publish)


# ---- running ---------------------------------------------------------------------------------


async def serve(
    cfg: Config, *, ready: Callable[[int], None] | None = None, sock: socket.socket | None = None
) -> int:
    """Run until SIGTERM/SIGINT, then drain. Returns the exit code."""
    app = create_app(cfg)
    st = app[STATE]
    # drain() already gave in-flight requests drain_timeout_s; cleanup must not wait that long again
    # (it would overrun the pod's terminationGracePeriodSeconds).
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    if sock is None:
        sock = listening_socket(cfg.server.host, cfg.server.port, reuse_port=cfg.server.workers > 1)
    aiohttp_handler = runner.server
    assert aiohttp_handler is not None
    rp = app[RUNNING].path  # the lifecycle built it in runner.setup()
    site = ListenerSite(
        runner,
        sock,
        max_connections=connection_cap(cfg.server.max_connections),
        on_refuse=st.metrics.client_errors.labels("connection_cap").inc,
        clients=st.limits.clients if st.limits.clients.max_conns else None,
        protocol_factory=(lambda: FastPath(rp, aiohttp_handler)) if cfg.server.fast_path else None,
    )
    await site.start()
    _tune_gc()
    port = _bound_port(runner)
    log.info(
        "kvrouter listening on %s:%d (policy=%s, build=%s, pid=%d)",
        cfg.server.host,
        port,
        cfg.routing.policy,
        build_kind(),
        os.getpid(),
    )
    if ready is not None:
        ready(port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await drain(st, site)
    await runner.cleanup()
    return 0


GC_GEN0_THRESHOLD = 20_000


def build_kind() -> str:
    """``compiled`` when the request path runs as mypyc extension modules (setup.py), else
    ``python``: which build a running router is, for its start-up log line."""
    path = getattr(sys.modules[FastPath.__module__], "__file__", None) or ""
    return "compiled" if path.endswith((".so", ".pyd")) else "python"


def _tune_gc() -> None:
    """Start-up objects (modules, config, metrics, the app) never become garbage: freeze them out
    of the collector's view, and run young collections less often. The request path makes few
    reference cycles, and each collection walked every container alive; with CPython's default
    threshold (700) they were a visible share of the CPU and of the c=32 p99 in bench-proxy."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])


async def drain(st: AppState, site: web.BaseSite) -> None:
    cfg = st.cfg.server
    guard = st.drain
    guard.draining = True
    log.info("draining: readiness false; accepting for %.1fs more", cfg.drain_grace_s)
    await asyncio.sleep(cfg.drain_grace_s)
    guard.refusing = True
    await site.stop()  # close the listener: new connections are refused
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(cfg.drain_timeout_s):
            await guard.idle.wait()
        log.info("drained in %.2fs", time.monotonic() - t0)
    except TimeoutError:
        log.warning("drain timeout: %d request(s) still in flight are cut", guard.active)


def _bound_port(runner: web.AppRunner) -> int:
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            return int(addr[1])
    return 0
