"""A fast fake OpenAI backend for proxy tests and the proxy benchmark. Not a vLLM model.

Run: ``python -m tests.support.fake_openai --port P [--model M] [--chunks 16] [--chunk-delay 0.05]``.
Behaviour is switched at run time with ``POST /_control`` (JSON, fields below) and observed with
``GET /_stats``: requests seen, completed, cancelled (client went away mid-response), last body.

Modes: ``ok``; ``fail`` (HTTP 500 JSON); ``stall`` (accept, never answer); ``die_mid_stream``
(send ``die_after`` chunks then abort the TCP connection); ``slow_first`` (first chunk after
``first_delay`` s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from aiohttp import web

STATS = web.AppKey("stats", dict)
CTRL = web.AppKey("ctrl", dict)
STORE = web.AppKey("store", dict)


def _chunk(i: int, model: str, chat: bool) -> bytes:
    if chat:
        obj: dict[str, Any] = {
            "id": "cmpl-fake",
            "object": "chat.completion.chunk",
            "model": model,
            "choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}],
        }
    else:
        obj = {
            "id": "cmpl-fake",
            "object": "text_completion",
            "model": model,
            "choices": [{"index": 0, "text": f"t{i} ", "finish_reason": None}],
        }
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def _generate(request: web.Request) -> web.StreamResponse:
    stats = request.app[STATS]
    ctrl = request.app[CTRL]
    stats["requests"] += 1
    body = await request.read()
    stats["last_body"] = body.decode(errors="replace")[:2000]
    stats["last_headers"] = {k: v for k, v in request.headers.items()}
    stats["last_target"] = request.message.path  # the request line's target, as received
    req = json.loads(body)
    chat = request.path.endswith("/chat/completions")
    model = ctrl["model"]
    mode = ctrl["mode"]
    if mode == "fail":
        stats["completed"] += 1
        return web.json_response(
            {"error": {"message": "injected failure", "type": "internal_error"}}, status=500
        )
    if mode == "stall":
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            stats["cancelled"] += 1
            raise
    chunks = int(ctrl["chunks"])
    delay = float(ctrl["chunk_delay"])
    usage = {
        "prompt_tokens": 10,
        "completion_tokens": chunks,
        "total_tokens": 10 + chunks,
        "prompt_tokens_details": {"cached_tokens": int(ctrl.get("cached_tokens", 0))},
    }
    if not req.get("stream"):
        if delay:
            await asyncio.sleep(delay)
        stats["completed"] += 1
        text = "".join(f"t{i} " for i in range(chunks))
        choice = {"index": 0, "finish_reason": "length"}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return web.json_response(
            {
                "id": "cmpl-fake",
                "object": "chat.completion" if chat else "text_completion",
                "model": model,
                "choices": [choice],
                "usage": usage,
            }
        )
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    try:
        first_delay = float(ctrl.get("first_delay", 0.0)) if mode == "slow_first" else 0.0
        if first_delay:
            await asyncio.sleep(first_delay)
        for i in range(chunks):
            if delay:
                await asyncio.sleep(delay)
            if mode == "die_mid_stream" and i == int(ctrl.get("die_after", 3)):
                stats["died"] += 1
                assert request.transport is not None
                request.transport.abort()
                return resp
            await resp.write(_chunk(i, model, chat))
        final = {
            "id": "cmpl-fake",
            "object": "text_completion",
            "model": model,
            "choices": [],
            "usage": usage,
        }
        await resp.write(b"data: " + json.dumps(final).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
    except (asyncio.CancelledError, ConnectionResetError):
        stats["cancelled"] += 1
        raise
    stats["completed"] += 1
    return resp


async def _control(request: web.Request) -> web.Response:
    request.app[CTRL].update(await request.json())
    return web.json_response(request.app[CTRL])


async def _stats(request: web.Request) -> web.Response:
    return web.json_response({k: v for k, v in request.app[STATS].items()})


async def _health(request: web.Request) -> web.Response:
    if request.app[CTRL].get("unhealthy"):
        return web.json_response({"status": "unhealthy"}, status=503)
    return web.json_response({"status": "ok"})


async def _models(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "object": "list",
            "data": [{"id": request.app[CTRL]["model"], "object": "model", "owned_by": "fake"}],
        }
    )


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    request.app[STATS]["last_target"] = request.message.path
    return web.json_response({"path": request.path, "len": len(body), "server": request.app[CTRL]["name"]})


async def _responses(request: web.Request) -> web.StreamResponse:
    """vLLM's Responses API with ``VLLM_ENABLE_RESPONSES_API_STORE=1``: the store is this
    process's memory, so an unknown ``previous_response_id`` is a 404 (vLLM's shape)."""
    stats = request.app[STATS]
    store: dict[str, Any] = request.app[STORE]
    stats["requests"] += 1
    body = await request.read()
    stats["last_body"] = body.decode(errors="replace")[:2000]
    req = json.loads(body)
    prev = req.get("previous_response_id")
    if prev is not None and prev not in store:
        err = {
            "message": f"Response with id '{prev}' not found.",
            "type": "invalid_request_error",
            "param": "response_id",
            "code": 404,
        }
        return web.json_response({"error": err}, status=404)
    rid = f"resp_{request.app[CTRL]['name']}{len(store)}"
    out = {
        "id": rid,
        "object": "response",
        "status": "completed",
        "model": request.app[CTRL]["model"],
        "output": [
            {
                "id": f"msg_{len(store)}",
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "ok"}],
            }
        ],
        "usage": {"input_tokens": 10, "output_tokens": 1, "input_tokens_details": {"cached_tokens": 0}},
    }
    store[rid] = out
    stats["completed"] += 1
    if not req.get("stream"):
        return web.json_response(out)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    created = {"type": "response.created", "sequence_number": 0, "response": {**out, "status": "in_progress"}}
    done = {"type": "response.completed", "sequence_number": 1, "response": out}
    for i, ev in enumerate((created, done)):
        await resp.write(f"event: {ev['type']}\ndata: {json.dumps(ev)}\n\n".encode())
        if i == 0:
            await asyncio.sleep(0.01)
    await resp.write_eof()
    return resp


async def _get_response(request: web.Request) -> web.Response:
    out = request.app[STORE].get(request.match_info["rid"])
    if out is None:
        return web.json_response(
            {"error": {"message": "not found", "type": "invalid_request_error", "code": 404}}, status=404
        )
    return web.json_response(out)


async def _kv_event_sources(request: web.Request) -> web.Response:
    """vLLM's list of per-DP-rank event publishers, when ``_control`` set ``dp_sources``."""
    eps = request.app[CTRL].get("dp_sources")
    if not eps:
        return web.json_response({"detail": "Not Found"}, status=404)
    return web.json_response(
        [{"data_parallel_rank": r, "endpoint": ep, "topic": ""} for r, ep in enumerate(eps)]
    )


async def _reset_prefix_cache(request: web.Request) -> web.Response:
    request.app[STATS]["resets"] = request.app[STATS].get("resets", 0) + 1
    return web.Response(status=200)


def make_app(
    model: str = "fake-model", name: str = "fake", chunks: int = 16, chunk_delay: float = 0.0
) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATS] = {
        "requests": 0,
        "completed": 0,
        "cancelled": 0,
        "died": 0,
        "last_body": "",
        "started": time.time(),
    }
    app[CTRL] = {"mode": "ok", "model": model, "name": name, "chunks": chunks, "chunk_delay": chunk_delay}
    app[STORE] = {}
    app.router.add_post("/v1/completions", _generate)
    app.router.add_post("/v1/messages", _generate)
    app.router.add_post("/inference/v1/generate", _generate)
    app.router.add_post("/v1/responses", _responses)
    app.router.add_get("/v1/responses/{rid}", _get_response)
    app.router.add_post("/reset_prefix_cache", _reset_prefix_cache)
    app.router.add_get("/kv_event_sources", _kv_event_sources)
    app.router.add_post("/v2/embed", _echo)
    app.router.add_post("/v1/chat/completions", _generate)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.router.add_post("/_control", _control)
    app.router.add_get("/_stats", _stats)
    app.router.add_post("/tokenize", _echo)
    app.router.add_post("/v1/embeddings", _echo)
    return app


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--model", default="fake-model")
    ap.add_argument("--name", default="fake")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--chunk-delay", type=float, default=0.0)
    a = ap.parse_args()
    app = make_app(a.model, a.name, a.chunks, a.chunk_delay)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(app, host=a.host, port=a.port, access_log=None, print=None, handler_cancellation=True)


if __name__ == "__main__":
    main()
