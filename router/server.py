"""The router process: app factory, handlers, lifecycle, graceful drain.

Endpoints: ``POST /v1/completions`` and ``/v1/chat/completions`` (routed), ``GET /v1/models``
(union of the replicas'), ``GET /health`` (liveness: the event loop answers), ``GET /ready``
(readiness: at least one routable replica and not draining), ``GET /metrics`` (Prometheus), the
debug endpoints when enabled, and a passthrough of other OpenAI / vLLM API paths to a healthy
replica (never an arbitrary URL: the router only talks to replicas it discovered).

Lifecycle (``cleanup_ctx``): one ClientSession with keep-alive pools, the KV-event manager, the
replica manager (probes, scrapes), discovery tasks. SIGTERM: readiness turns false at once; new
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
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from .admission import Admission
from .config import Config
from .discovery import DiscoverySource, build_sources
from .errors import (
    BadRequest,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    RouterError,
    error_body,
)
from .fastpath import FastPath
from .generate import (
    GENERATE_PATHS,
    Active,
    bearer_ok,
    chat_info,
    check_api_key,
    completion_info,
    count_error,
    generate,
    new_explanation,
)
from .health import ReplicaManager
from .index import IndexInvariantError, PrefixIndex
from .kv_events import KVEventManager
from .listener import ListenerSite, listening_socket
from .metrics import RouterMetrics
from .openapi import openapi_spec
from .parity import ParityTracker
from .proxy import AiohttpSink, Forwarder, ForwardHooks, request_header_lines
from .replicas import ReplicaRegistry
from .requests import parse_model
from .routing import Router, Tokenizer
from .scoring.policies import build_policy
from .types import KeyMode, ReplicaId, ReplicaSpec, RequestInfo
from .upstream import UpstreamPool

log = logging.getLogger("kvrouter.server")
_proxy_log = logging.getLogger("kvrouter.proxy")

# Paths forwarded as-is to a healthy replica (vLLM's OpenAI server surface minus admin/dev).
PASSTHROUGH_PREFIXES = (
    "/v1/",
    "/tokenize",
    "/detokenize",
    "/pooling",
    "/score",
    "/rerank",
    "/classify",
    "/version",
)
_PUBLIC = frozenset(("/health", "/ready", "/metrics", "/openapi.json"))
_json = msgspec.json.Encoder()


@dataclass(slots=True)
class AppState:
    cfg: Config
    metrics: RouterMetrics
    index: PrefixIndex
    registry: ReplicaRegistry
    router: Router
    parity: ParityTracker
    admission: Admission
    session: aiohttp.ClientSession | None = None
    kv_events: KVEventManager | None = None
    manager: ReplicaManager | None = None
    forwarder: Forwarder | None = None
    pool: UpstreamPool | None = None
    draining: bool = False  # readiness false; still serving during the grace window
    refusing: bool = False  # past the grace window: new requests get 503
    active: int = 0  # requests being handled (drain waits for 0)
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    sources: Sequence[DiscoverySource] | None = None
    published: dict[str, list[ReplicaSpec]] = field(default_factory=dict)  # by discovery source
    openapi: bytes | None = None  # GET /openapi.json body


STATE: web.AppKey[AppState] = web.AppKey("kvrouter_state", AppState)


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
        plugin_timer=metrics.plugin_timer,
    )
    parity = ParityTracker(metrics)
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
    )
    router.max_in_flight_per_replica = cfg.admission.max_in_flight_per_replica
    router.retry_after_s = cfg.admission.retry_after_s
    router.on_overload = metrics.admission_rejected.labels("replica").inc
    admission = Admission(
        cfg.admission.max_in_flight,
        cfg.admission.max_queue,
        cfg.admission.queue_timeout_s,
        cfg.admission.retry_after_s,
        metrics.admission_rejected.labels("router").inc,
    )
    metrics.add_state_collector(lambda: registry, index, parity.collect)
    return AppState(cfg, metrics, index, registry, router, parity, admission)


def create_app(
    cfg: Config,
    *,
    tokenizer: Tokenizer | None = None,
    sources: Sequence[DiscoverySource] | None = None,
) -> web.Application:
    """The aiohttp application. ``sources`` overrides discovery (tests); default from config."""
    r = cfg.routing
    if tokenizer is None and r.tokenizer:
        from .tokenizer import load_tokenizer

        tokenizer = load_tokenizer(
            r.tokenizer, r.chat_template, r.default_chat_template_kwargs, r.trust_request_chat_template
        )
    app = web.Application(
        client_max_size=cfg.server.max_body_bytes,
        middlewares=[_error_middleware, _auth_middleware],
        handler_args={
            "max_field_size": cfg.server.max_header_bytes,
            "max_line_size": cfg.server.max_header_bytes,
        },
    )
    state = build_state(cfg, tokenizer)
    if (renderer := getattr(tokenizer, "renderer", None)) is not None:
        state.metrics.registry.register(renderer)  # kvrouter_chat_renders_total, _render_exact
    state.sources = sources
    app[STATE] = state
    app.cleanup_ctx.append(_lifecycle)
    for path in GENERATE_PATHS:
        app.router.add_post(path, _generate)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.router.add_get("/ready", _ready)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/openapi.json", _openapi)
    if cfg.server.enable_debug:
        app.router.add_post("/debug/route", _debug_route)
        app.router.add_get("/debug/replicas", _debug_replicas)
    app.router.add_route("*", "/{tail:.*}", _passthrough)
    return app


# ---- lifecycle -------------------------------------------------------------------------------


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    st = app[STATE]
    cfg = st.cfg
    st.idle.set()
    connector = aiohttp.TCPConnector(
        limit=0,
        limit_per_host=cfg.upstream.pool_per_replica,
        keepalive_timeout=30.0,
        ttl_dns_cache=10,
    )
    st.session = aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,  # relay bytes unchanged, Content-Encoding included
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=cfg.upstream.connect_timeout_s),
        skip_auto_headers=("User-Agent",),
    )
    if cfg.kv_events.mode != "off":
        st.kv_events = KVEventManager(
            st.index, capacity=cfg.routing.index_capacity, registry=st.metrics.registry
        )
        st.router.is_uncertain = st.kv_events.is_uncertain
    st.manager = ReplicaManager(
        cfg,
        st.registry,
        st.router,
        st.session,
        st.metrics,
        st.kv_events,
        on_engine_metrics=st.parity.on_engine_metrics,
    )
    manager = st.manager
    st.pool = UpstreamPool(
        connect_timeout_s=cfg.upstream.connect_timeout_s, max_idle_per_origin=cfg.upstream.pool_per_replica
    )
    st.forwarder = Forwarder(
        st.pool,
        st.router,
        cfg.upstream,
        st.metrics,
        ForwardHooks(manager.record_success, manager.record_failure),
        replica_header=cfg.server.replica_header,
    )
    sources = st.sources if st.sources is not None else _default_sources(cfg)
    for src in sources:
        st.tasks.append(
            asyncio.get_running_loop().create_task(_run_source(st, src), name=f"discovery:{src.name}")
        )
    try:
        yield
    finally:
        for t in st.tasks:
            t.cancel()
        for t in st.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await manager.close()
        if st.kv_events is not None:
            await st.kv_events.close()
        await st.session.close()
        if st.pool is not None:
            st.pool.close()


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


# ---- middleware ------------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json_error(err: RouterError) -> web.Response:
    return web.Response(
        status=err.status, body=err.body(), content_type="application/json", headers=err.headers()
    )


@web.middleware
async def _error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    st = request.app[STATE]
    try:
        return await handler(request)
    except RouterError as err:
        count_error(st, err)
        return _json_error(err)
    except web.HTTPRequestEntityTooLarge:
        st.metrics.client_errors.labels("413").inc()
        return _json_error(PayloadTooLarge(f"Request body exceeds {st.cfg.server.max_body_bytes} bytes."))
    except web.HTTPException as exc:
        if exc.status >= 400:
            msg = exc.reason or "error"
            body = error_body(msg, "invalid_request_error" if exc.status < 500 else "internal_error")
            # keep the exception's own headers (a 405 must say Allow), not its text content type
            keep = {
                k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")
            }
            return web.Response(status=exc.status, body=body, content_type="application/json", headers=keep)
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except (UnicodeError, RecursionError) as exc:
        # msgspec raises these, not DecodeError, for invalid UTF-8 in a body, a lone surrogate
        # (\ud800) that later fails to encode for hashing, or nesting past its depth limit (5000
        # '['): client mistakes, so 400, not 500 (tests/reliability/test_bad_input.py).
        st.metrics.client_errors.labels("400").inc()
        what = "is nested too deeply" if isinstance(exc, RecursionError) else "is not valid UTF-8 / Unicode"
        return _json_error(BadRequest(f"Request body {what}."))
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return web.Response(
            status=500,
            body=error_body("Internal router error.", "internal_error"),
            content_type="application/json",
        )


@web.middleware
async def _auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    cfg = request.app[STATE].cfg.server
    path = request.path
    if path in _PUBLIC:
        return await handler(request)
    if path.startswith("/debug/"):
        if cfg.admin_token and not bearer_ok(request.headers.get("Authorization", ""), (cfg.admin_token,)):
            raise Forbidden("Debug endpoints need the admin token.")
        return await handler(request)
    check_api_key(request.app[STATE], request.headers.get("Authorization", ""))
    return await handler(request)


# ---- handlers --------------------------------------------------------------------------------


async def _read_body(request: web.Request) -> bytes:
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(
            f"Request body exceeds {request.app[STATE].cfg.server.max_body_bytes} bytes."
        ) from None


async def _generate(request: web.Request) -> web.StreamResponse:
    st = request.app[STATE]
    info = GENERATE_PATHS[request.path]
    with Active(st):
        body = await _read_body(request)
        sink, target, headers = _upstream_parts(st, request)
        await generate(st, request.path, info, sink, target, headers, body)
        assert sink.response is not None
        return sink.response


def _upstream_parts(st: AppState, request: web.Request) -> tuple[AiohttpSink, bytes, bytes]:
    """The sink for the answer, the request target as the client sent it, and the header lines
    for the engine: what the Forwarder needs from an aiohttp request."""
    headers = request_header_lines(request.raw_headers, st.cfg.upstream.api_key)
    return AiohttpSink(request), request.raw_path.encode("utf-8", "surrogateescape"), headers


async def _passthrough(request: web.Request) -> web.StreamResponse:
    st = request.app[STATE]
    if not request.path.startswith(PASSTHROUGH_PREFIXES):
        raise NotFound(f"Unknown path {request.path}.")
    if request.method not in ("GET", "POST"):
        # vLLM's API uses only these; TRACE and friends would let an engine that echoes requests
        # reflect the upstream Authorization header (the engines' key) back to the client.
        raise web.HTTPMethodNotAllowed(request.method, ["GET", "POST"])
    with Active(st):
        body = await _read_body(request)
        model = parse_model(body)
        req = RequestInfo(model=model or "", prompt_tokens=0, block_size=st.router.block_size)
        if model is None:
            req.model = None  # type: ignore[assignment]  # any replica
        assert st.forwarder is not None
        sink, target, headers = _upstream_parts(st, request)
        await st.forwarder.forward(sink, request.method, target, headers, body, req, routed=False)
        assert sink.response is not None
        return sink.response


async def _models(request: web.Request) -> web.Response:
    st = request.app[STATE]
    assert st.manager is not None
    return web.Response(
        body=_json.encode({"object": "list", "data": st.manager.model_cards()}),
        content_type="application/json",
    )


async def _health(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


async def _ready(request: web.Request) -> web.Response:
    st = request.app[STATE]
    routable = len(st.registry.routable())
    ready = routable > 0 and not st.draining
    body = _json.encode(
        {"ready": ready, "routable_replicas": routable, "replicas": len(st.registry), "draining": st.draining}
    )
    return web.Response(status=200 if ready else 503, body=body, content_type="application/json")


async def _metrics(request: web.Request) -> web.Response:
    st = request.app[STATE]
    return web.Response(body=st.metrics.render(), content_type="text/plain", charset="utf-8")


async def _openapi(request: web.Request) -> web.Response:
    st = request.app[STATE]
    if st.openapi is None:  # depends only on the config: build it once
        st.openapi = _json.encode(openapi_spec(st.cfg))
    return web.Response(body=st.openapi, content_type="application/json")


async def _debug_route(request: web.Request) -> web.Response:
    """The decision for a body, without forwarding it. Note: it draws from the policy's state like
    a real request would (round-robin position, tie-break RNG), so it explains the *next* decision."""
    st = request.app[STATE]
    body = await _read_body(request)
    try:
        probe = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise BadRequest(f"Request body is not valid JSON: {exc}") from None
    if not isinstance(probe, dict):
        raise BadRequest("Request body must be a JSON object.")
    req = chat_info(st, body) if "messages" in probe else completion_info(st, body)
    explain = new_explanation(st, req)
    st.router.select(req, explain=explain, record=False)
    out = explain.as_dict()
    out["prompt_tokens"] = req.prompt_tokens
    out["key_mode"] = req.key_mode.value if req.key_mode is not KeyMode.NONE else "none"
    return web.Response(body=_json.encode(out), content_type="application/json")


async def _debug_replicas(request: web.Request) -> web.Response:
    st = request.app[STATE]
    rows = []
    for r in st.registry:
        rows.append(
            {
                "id": r.id,
                "url": r.url,
                "slot": r.slot,
                "models": sorted(r.models),
                "healthy": r.healthy,
                "draining": r.draining,
                "in_flight": r.in_flight,
                "pending_prefill_tokens": r.pending_prefill_tokens,
                "engine_running": r.engine_running,
                "engine_waiting": r.engine_waiting,
                "kv_usage": r.kv_usage,
                "block_size": r.block_size,
                "num_gpu_blocks": r.num_gpu_blocks,
                "has_kv_events": r.has_kv_events,
                "index_blocks": st.index.replica_blocks(r.id),
                "index_confirmed": list(st.index.confirmed_digest(r.id)),
                "uncertain": st.router.is_uncertain(r.id),
                "ttft_p90_s": r.tail_ttft(),
                "parity_ratio": st.parity.ratio(r.id),
                "kv_events": _kv_stats(st, r.id),
            }
        )
    # A full recount, O(indexed blocks): cheap enough for a debug call, and what the reliability
    # tests assert after every fault.
    try:
        st.index.check_invariants()
        invariants = "ok"
    except IndexInvariantError as exc:
        invariants = str(exc)
    out = {"replicas": rows, "block_size": st.router.block_size, "index_invariants": invariants}
    return web.Response(body=_json.encode(out), content_type="application/json")


def _kv_stats(st: AppState, rid: ReplicaId) -> dict[str, Any] | None:
    s = st.kv_events.stats(rid) if st.kv_events is not None else None
    if s is None:
        return None
    return {
        "last_seq": s.last_seq,
        "batches": s.batches,
        "gaps": s.gaps,
        "restarts": s.restarts,
        "replays": s.replays,
        "stale": s.stale,
        "decode_errors": s.decode_errors,
        "connected": s.connected,
    }


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
    site = ListenerSite(
        runner,
        sock,
        max_connections=cfg.server.max_connections,
        on_refuse=st.metrics.client_errors.labels("connection_cap").inc,
        protocol_factory=(lambda: FastPath(st, aiohttp_handler)) if cfg.server.fast_path else None,
    )
    await site.start()
    _tune_gc()
    port = _bound_port(runner)
    log.info(
        "kvrouter listening on %s:%d (policy=%s, pid=%d)",
        cfg.server.host,
        port,
        cfg.routing.policy,
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
    st.draining = True
    log.info("draining: readiness false; accepting for %.1fs more", cfg.drain_grace_s)
    await asyncio.sleep(cfg.drain_grace_s)
    st.refusing = True
    await site.stop()  # close the listener: new connections are refused
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(cfg.drain_timeout_s):
            await st.idle.wait()
        log.info("drained in %.2fs", time.monotonic() - t0)
    except TimeoutError:
        log.warning("drain timeout: %d request(s) still in flight are cut", st.active)


def _bound_port(runner: web.AppRunner) -> int:
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            return int(addr[1])
    return 0
