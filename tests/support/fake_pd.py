"""A fake vLLM replica speaking the NixlConnector handoff contract, for PD router tests.

Not a model: it checks what a router sends on each leg and counts what a real engine would count.
Run: ``python -m tests.support.fake_pd --port P --role prefill|decode [--version 0.32.0]``.

* **prefill**: a request with ``kv_transfer_params.do_remote_decode`` must have ``stream`` false, no
  ``stream_options``, ``max_tokens`` 1, no ``min_tokens``; violations answer 400 and are counted.
  The answer is a normal completion with a top-level ``kv_transfer_params`` shaped as vLLM 0.32's
  (``remote_block_ids``, ``remote_engine_id``, ``remote_request_id``, ``remote_host: "localhost"``,
  ``remote_port``, ``tp_size``, ..., ``transfer_mode``). Each handed-off request is remembered by
  ``remote_request_id`` with the ``X-Request-Id`` it came with.
* **decode**: a request whose ``kv_transfer_params`` say ``do_remote_prefill`` must carry the fields
  D needs; its prompt tokens count as ``source="external_kv_transfer"``, others as
  ``local_compute`` (vLLM's ``vllm:prompt_tokens_by_source_total``). Streams SSE like vLLM.

``POST /_control`` (JSON) switches modes: ``mode`` = ok | fail (500) | stall | no_params (prefill
answers with ``kv_transfer_params: null``); ``running`` = the ``vllm:num_requests_running`` it
reports; ``chunk_delay``; ``prefill_tps`` (50,000: prefill sleeps tokens / rate, on P for every
prompt, on D for the tokens it computes itself). ``GET /_stats``: requests, bodies and headers seen, cancellations.
Prompt tokens are estimated as UTF-8 bytes / 4 (the router's byte mode).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from typing import Any

from aiohttp import web

STATS = web.AppKey("stats", dict)
CTRL = web.AppKey("ctrl", dict)


def _prompt_tokens(req: dict[str, Any]) -> int:
    if "messages" in req:
        text = json.dumps(req["messages"])
    else:
        p = req.get("prompt", "")
        if isinstance(p, list):
            return len(p)
        text = str(p)
    return max(1, len(text.encode()) // 4)


def _record(request: web.Request, req: dict[str, Any]) -> None:
    stats = request.app[STATS]
    stats["requests"] += 1
    stats["bodies"].append(req)
    stats["request_ids"].append(request.headers.get("X-Request-Id"))
    del stats["bodies"][:-20]
    del stats["request_ids"][:-20]


async def _generate(request: web.Request) -> web.StreamResponse:
    app = request.app
    stats, ctrl = app[STATS], app[CTRL]
    req = await request.json()
    _record(request, req)
    mode = ctrl["mode"]
    if mode == "fail":
        return web.json_response(
            {"error": {"message": "injected failure", "type": "internal_error"}}, status=500
        )
    if mode == "stall":
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            stats["cancelled"] += 1
            raise
    ktp = req.get("kv_transfer_params") or {}
    if ctrl["role"] == "prefill":
        return await _prefill(request, req, ktp)
    return await _decode(request, req, ktp)


async def _prefill(request: web.Request, req: dict[str, Any], ktp: dict[str, Any]) -> web.Response:
    stats, ctrl = request.app[STATS], request.app[CTRL]
    if not ktp.get("do_remote_decode"):
        stats["violations"].append("prefill replica got a request without do_remote_decode")
    problems = []
    if req.get("stream") is not False:
        problems.append("stream must be false")
    if "stream_options" in req:
        problems.append("stream_options must be removed")
    if req.get("max_tokens") != 1 or req.get("max_completion_tokens", 1) != 1:
        problems.append("max_tokens must be 1")
    if "min_tokens" in req or "min_completion_tokens" in req:
        problems.append("min_tokens must be removed")
    if ktp.get("do_remote_prefill") is not False:
        problems.append("do_remote_prefill must be false")
    if problems:
        stats["violations"].extend(problems)
        return web.json_response(
            {"error": {"message": "; ".join(problems), "type": "BadRequestError"}}, status=400
        )
    n = _prompt_tokens(req)
    try:
        await asyncio.sleep(float(ctrl["prefill_delay"]) + n / float(ctrl["prefill_tps"]))
    except asyncio.CancelledError:
        stats["cancelled"] += 1
        raise
    stats["prefilled_tokens"] += n
    rrid = f"cmpl-{uuid.uuid4().hex[:16]}-0"
    params: dict[str, Any] | None = {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_block_ids": [list(range(1, (n + 15) // 16 + 1))],
        "remote_engine_id": ctrl["engine_id"],
        "remote_request_id": rrid,
        "remote_host": "localhost",  # vLLM's VLLM_NIXL_SIDE_CHANNEL_HOST default
        "remote_port": 5600,
        "tp_size": 1,
        "dcp_size": 1,
        "pp_size": 1,
        "remote_num_tokens": n,
        "remote_blocks_expiry_time": None,
        "transfer_mode": ctrl["transfer_mode"],
    }
    if ctrl["mode"] == "no_params":
        params = None
    else:
        request.app[STATS]["handoffs"][rrid] = request.headers.get("X-Request-Id")
    chat = request.path.endswith("/chat/completions")
    choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
    choice.update({"message": {"role": "assistant", "content": "x"}} if chat else {"text": "x"})
    return web.json_response(
        {
            "id": rrid,
            "object": "chat.completion" if chat else "text_completion",
            "model": ctrl["model"],
            "choices": [choice],
            "usage": {"prompt_tokens": n, "completion_tokens": 1, "total_tokens": n + 1},
            "kv_transfer_params": params,
        }
    )


def _chunk(i: int, model: str, chat: bool) -> bytes:
    if chat:
        choice: dict[str, Any] = {"index": 0, "delta": {"content": f"d{i} "}, "finish_reason": None}
    else:
        choice = {"index": 0, "text": f"d{i} ", "finish_reason": None}
    obj = {
        "id": "cmpl-d",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "model": model,
        "choices": [choice],
    }
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def _decode(request: web.Request, req: dict[str, Any], ktp: dict[str, Any]) -> web.StreamResponse:
    stats, ctrl = request.app[STATS], request.app[CTRL]
    n = _prompt_tokens(req)
    computed = n
    if ktp.get("do_remote_prefill"):
        need = ["remote_engine_id", "remote_request_id", "remote_host", "remote_port"]
        if ktp.get("transfer_mode") != "push":
            need.append("remote_block_ids")
        missing = [k for k in need if ktp.get(k) is None]
        if missing:
            stats["violations"].append(f"decode handoff lacks {missing}")
            stats["local_compute"] += n  # vLLM: "Got invalid KVTransferParams", recomputed
        else:
            stats["external_kv_transfer"] += n
            stats["remote_hosts"].append(ktp["remote_host"])
            computed = 0
    else:
        stats["local_compute"] += n
    # Prefill takes time in proportion to the tokens computed here (the router measures the
    # rate from TTFTs); handed-off tokens cost nothing.
    await asyncio.sleep(computed / float(ctrl["prefill_tps"]))
    chunks = int(req.get("max_tokens") or req.get("max_completion_tokens") or 8)
    delay = float(ctrl["chunk_delay"])
    chat = request.path.endswith("/chat/completions")
    model = ctrl["model"]
    usage = {"prompt_tokens": n, "completion_tokens": chunks, "total_tokens": n + chunks}
    if not req.get("stream"):
        text = "".join(f"d{i} " for i in range(chunks))
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        stats["completed"] += 1
        return web.json_response(
            {"id": "cmpl-d", "object": "text_completion", "model": model, "choices": [choice], "usage": usage}
        )
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    try:
        for i in range(chunks):
            if delay:
                await asyncio.sleep(delay)
            await resp.write(_chunk(i, model, chat))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
    except (asyncio.CancelledError, ConnectionResetError):
        stats["cancelled"] += 1
        raise
    stats["completed"] += 1
    return resp


async def _metrics(request: web.Request) -> web.Response:
    stats, ctrl = request.app[STATS], request.app[CTRL]
    lines = [
        f'vllm:num_requests_running{{model_name="{ctrl["model"]}"}} {float(ctrl["running"])}',
        f'vllm:num_requests_waiting{{model_name="{ctrl["model"]}"}} 0.0',
        f'vllm:kv_cache_usage_perc{{model_name="{ctrl["model"]}"}} 0.1',
        f'vllm:prompt_tokens_by_source_total{{model_name="{ctrl["model"]}",source="local_compute"}} '
        f"{float(stats['local_compute'])}",
        f'vllm:prompt_tokens_by_source_total{{model_name="{ctrl["model"]}",source="external_kv_transfer"}} '
        f"{float(stats['external_kv_transfer'])}",
    ]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


async def _control(request: web.Request) -> web.Response:
    request.app[CTRL].update(await request.json())
    return web.json_response(request.app[CTRL])


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATS])


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _version(request: web.Request) -> web.Response:
    return web.json_response({"version": request.app[CTRL]["version"]})


async def _models(request: web.Request) -> web.Response:
    return web.json_response(
        {"object": "list", "data": [{"id": request.app[CTRL]["model"], "object": "model"}]}
    )


def make_app(role: str, model: str = "fake-model", version: str = "0.32.0") -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATS] = {
        "requests": 0,
        "completed": 0,
        "cancelled": 0,
        "bodies": [],
        "request_ids": [],
        "handoffs": {},
        "violations": [],
        "remote_hosts": [],
        "local_compute": 0,
        "external_kv_transfer": 0,
        "prefilled_tokens": 0,
    }
    app[CTRL] = {
        "role": role,
        "mode": "ok",
        "model": model,
        "version": version,
        "running": 0,
        "chunk_delay": 0.0,
        "prefill_delay": 0.0,
        "prefill_tps": 50_000.0,
        "transfer_mode": "pull",
        "engine_id": str(uuid.uuid4()),
    }
    app.router.add_post("/v1/completions", _generate)
    app.router.add_post("/v1/chat/completions", _generate)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.router.add_get("/version", _version)
    app.router.add_get("/metrics", _metrics)
    app.router.add_post("/_control", _control)
    app.router.add_get("/_stats", _stats)
    return app


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--role", choices=("prefill", "decode"), required=True)
    ap.add_argument("--model", default="fake-model")
    ap.add_argument("--version", default="0.32.0")
    a = ap.parse_args()
    web.run_app(
        make_app(a.role, a.model, a.version),
        host=a.host,
        port=a.port,
        access_log=None,
        print=None,
        handler_cancellation=True,
    )


if __name__ == "__main__":
    main()
