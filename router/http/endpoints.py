"""The aiohttp handlers: generate, passthrough, models, health/readiness, metrics, OpenAPI, debug.

Generate requests usually arrive through the fast path (fastpath.py); this handler serves the
ones it hands over (and every request when ``server.fast_path`` is off). Passthrough forwards
other OpenAI / vLLM API paths to a healthy replica (never an arbitrary URL: the router only
talks to replicas it discovered).
"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from router.errors import BadRequest, NotFound, PayloadTooLarge
from router.http.fleet_admin import reset_prefix_cache
from router.http.generate import GENERATE_PATHS, chat_info, completion_info, generate, new_explanation
from router.http.openapi import openapi_spec
from router.http.proxy import AiohttpSink, request_header_lines
from router.http.requests import parse_model
from router.http.state import RUNNING, STATE, Running
from router.index import IndexInvariantError
from router.types import KeyMode, ReplicaId, RequestInfo

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
    # served by vLLM 0.32 too (audit #34): Cohere / v2 embed+rerank, token-in/out, SageMaker
    "/v2/",
    "/inference/",
    "/cohere/",
    "/generative_scoring",
    "/invocations",
    "/tokenizer_info",
)
_json = msgspec.json.Encoder()


def add_routes(app: web.Application, *, debug: bool) -> None:
    for path in GENERATE_PATHS:
        app.router.add_post(path, generate_handler)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/reset_prefix_cache", reset_prefix_cache)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    if debug:
        app.router.add_post("/debug/route", debug_route)
        app.router.add_get("/debug/replicas", debug_replicas)
    app.router.add_route("*", "/{tail:.*}", passthrough)


async def _read_body(request: web.Request) -> bytes:
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(
            f"Request body exceeds {request.app[STATE].cfg.server.max_body_bytes} bytes."
        ) from None


def _upstream_parts(run: Running, request: web.Request) -> tuple[AiohttpSink, bytes, bytes]:
    """The sink for the answer, the request target as the client sent it, and the header lines
    for the engine: what the Forwarder needs from an aiohttp request."""
    headers = request_header_lines(request.raw_headers, run.path.cfg.upstream.api_key)
    return AiohttpSink(request), request.raw_path.encode("utf-8", "surrogateescape"), headers


async def generate_handler(request: web.Request) -> web.StreamResponse:
    run = request.app[RUNNING]
    info = GENERATE_PATHS[request.path]
    with run.path.drain:
        body = await _read_body(request)
        sink, target, headers = _upstream_parts(run, request)
        await generate(run.path, request.path, info, sink, target, headers, body)
        assert sink.response is not None
        return sink.response


async def passthrough(request: web.Request) -> web.StreamResponse:
    run = request.app[RUNNING]
    if not request.path.startswith(PASSTHROUGH_PREFIXES):
        raise NotFound(f"Unknown path {request.path}.")
    if request.method not in ("GET", "POST"):
        # vLLM's API uses only these; TRACE and friends would let an engine that echoes requests
        # reflect the upstream Authorization header (the engines' key) back to the client.
        raise web.HTTPMethodNotAllowed(request.method, ["GET", "POST"])
    with run.path.drain:
        body = await _read_body(request)
        req = RequestInfo(model=parse_model(body), prompt_tokens=0, block_size=run.path.router.block_size)
        if request.path.startswith("/v1/responses/"):  # GET / cancel a stored response: its replica
            req.pin = run.path.router.responses.lookup_path(request.path)
        sink, target, headers = _upstream_parts(run, request)
        await run.path.forwarder.forward(sink, request.method, target, headers, body, req, routed=False)
        assert sink.response is not None
        return sink.response


async def models(request: web.Request) -> web.Response:
    run = request.app[RUNNING]
    return web.Response(
        body=_json.encode({"object": "list", "data": run.monitor.model_cards()}),
        content_type="application/json",
    )


async def health(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


async def ready(request: web.Request) -> web.Response:
    st = request.app[STATE]
    routable = len(st.registry.routable())
    draining = st.drain.draining
    ok = routable > 0 and not draining
    out: dict[str, Any] = {
        "ready": ok,
        "routable_replicas": routable,
        "replicas": len(st.registry),
        "draining": draining,
    }
    if warnings := st.parity.warnings():  # readiness is unaffected: the fleet still serves
        out["warnings"] = warnings
    body = _json.encode(out)
    return web.Response(status=200 if ok else 503, body=body, content_type="application/json")


async def metrics(request: web.Request) -> web.Response:
    st = request.app[STATE]
    return web.Response(body=st.metrics.render(), content_type="text/plain", charset="utf-8")


async def openapi(request: web.Request) -> web.Response:
    st = request.app[STATE]
    if st.openapi is None:  # depends only on the config: build it once
        st.openapi = _json.encode(openapi_spec(st.cfg))
    return web.Response(body=st.openapi, content_type="application/json")


async def debug_route(request: web.Request) -> web.Response:
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
    req = chat_info(st.router, body) if "messages" in probe else completion_info(st.router, body)
    explain = new_explanation(st.router, req)
    st.router.select(req, explain=explain, record=False)
    out = explain.as_dict()
    out["prompt_tokens"] = req.prompt_tokens
    out["key_mode"] = req.key_mode.value if req.key_mode is not KeyMode.NONE else "none"
    pd = request.app[RUNNING].path.pd
    if pd is not None and pd.active(req.model):
        out["pd"] = pd.explain(req, body)  # decode, prefill, both TTFT estimates, the outcome
    return web.Response(body=_json.encode(out), content_type="application/json")


async def debug_replicas(request: web.Request) -> web.Response:
    st = request.app[STATE]
    run = request.app[RUNNING]
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
                "uncertain": st.index.is_uncertain(r.id),
                "ttft_p90_s": r.tail_ttft(),
                "parity_ratio": st.parity.ratio(r.id),
                "kv_events": _kv_stats(run, r.id),
                "outlier": st.router.outliers.describe(r.id) if st.router.outliers is not None else None,
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


def _kv_stats(run: Running, rid: ReplicaId) -> dict[str, Any] | None:
    s = run.kv_events.stats(rid) if run.kv_events is not None else None
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
