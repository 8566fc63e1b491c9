"""vLLM's HTTP API in front of one simulated replica (vLLM 0.32 OpenAI server shapes).

``/v1/completions``, ``/v1/chat/completions`` (SSE with ``data: {...}\\n\\n`` and
``data: [DONE]\\n\\n``, ``stream_options.include_usage``), ``/v1/models``, ``/health``, ``/load``,
``/version``, ``/tokenize``, ``/detokenize``, ``/metrics``, ``/kv_event_sources``,
``POST /reset_prefix_cache``, and the sim's own ``GET/POST /sim/faults``.
``usage.prompt_tokens_details.cached_tokens`` is always present here; real vLLM fills it only with
``--enable-prompt-tokens-details``.

A request's API-server side (``prep``) runs here; its prompts then go to the replica's engine
(``ReplicaRuntime.submit``) and its response is written as the engine loop delivers tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import msgspec
from aiohttp import web

from ..model.structs import compact_ints
from . import prep
from .faults import Faults, parse_faults
from .metrics import CONTENT_TYPE
from .openai_format import HTTPError, ResponseFormatter, error_response, json_encoder
from .runtime import ReplicaRuntime
from .streams import CUT, Chan, Track, clock

VLLM_VERSION = "0.32.0"
log = logging.getLogger(__name__)


def build_app(replica: ReplicaRuntime) -> web.Application:
    """The aiohttp application serving ``replica``."""
    return ReplicaAPI(replica).app()


class ReplicaAPI:
    """The HTTP handlers of one replica."""

    def __init__(self, replica: ReplicaRuntime) -> None:
        self.replica = replica

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        r = app.router
        r.add_post("/v1/completions", self._completions)
        r.add_post("/v1/chat/completions", self._chat_completions)
        r.add_get("/v1/models", self._models)
        r.add_get("/health", self._health)
        r.add_get("/load", self._load)
        r.add_get("/version", self._version)
        r.add_post("/tokenize", self._tokenize)
        r.add_post("/detokenize", self._detokenize)
        r.add_get("/metrics", self._metrics)
        r.add_get("/kv_event_sources", self._kv_event_sources)
        r.add_post("/reset_prefix_cache", self._reset_prefix_cache)
        r.add_get("/sim/faults", self._get_faults)
        r.add_post("/sim/faults", self._post_faults)
        r.add_post("/sim/nixl/read", self._nixl_read)
        return app

    async def _nixl_read(self, request: web.Request) -> web.Response:
        """The prefill side of a simulated NIXL read (nixl.py): releases the leased blocks."""
        try:
            body = prep.decode_json(await request.read())
        except HTTPError as exc:
            return exc.response()
        if not isinstance(body, dict):
            return web.json_response({"error": "body must be a JSON object"}, status=400)
        status, out = self.replica.nixl.serve_read(body, self.replica.release_kv)
        if status == 200 and out.get("stale"):
            self.replica.metrics.pd.after_expiry.inc()
        return web.json_response(out, status=status)

    async def _health(self, request: web.Request) -> web.Response:
        delay = self.replica.faults.config.health_stall_s
        if delay > 0:  # a loaded host: the probe is slow, the engine still serves
            self.replica.faults.count("health_stall")
            await asyncio.sleep(delay)
        return web.Response(status=200)

    async def _load(self, request: web.Request) -> web.Response:
        return web.json_response({"server_load": self.replica.load})

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": VLLM_VERSION})

    async def _models(self, request: web.Request) -> web.Response:
        name = self.replica.config.model
        card = {
            "id": name,
            "object": "model",
            "created": int(self.replica.started_at),
            "owned_by": "vllm",
            "root": name,
            "parent": None,
            "max_model_len": self.replica.config.max_model_len,
        }
        return web.json_response({"object": "list", "data": [card]})

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.replica.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def _kv_event_sources(self, request: web.Request) -> web.Response:
        pub = self.replica.publisher
        if pub is None:
            return web.json_response({})
        cfg = self.replica.config
        # As vLLM reports it: the configured endpoint, with a bound wildcard/ephemeral port made
        # concrete. A bound endpoint is reported as tcp://*:PORT, which tells a router (like real
        # vLLM's) to connect to this replica's host on PORT.
        endpoint = _report_endpoint(pub.endpoint) if pub.binds else pub.endpoint
        replay = None if pub.replay_endpoint is None else _report_endpoint(pub.replay_endpoint)
        src = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": endpoint,
            "replay_endpoint": replay,
            "buffer_steps": cfg.buffer_steps,
            "hwm": cfg.hwm,
            "max_queue_size": 100_000,
            "topic": cfg.topic,
            "data_parallel_rank": 0,
        }
        return web.json_response({"0": src})

    async def _reset_prefix_cache(self, request: web.Request) -> web.Response:
        if not self.replica.reset_prefix_cache():
            return error_response(500, "Failed to reset prefix cache: blocks in use", "InternalServerError")
        return web.Response(status=200)

    async def _get_faults(self, request: web.Request) -> web.Response:
        body = {
            "config": msgspec.to_builtins(self.replica.faults.config),
            "injected": self.replica.faults.injected,
        }
        return web.json_response(body)

    async def _post_faults(self, request: web.Request) -> web.Response:
        try:
            cfg = parse_faults(await request.read())
        except ValueError as exc:
            return error_response(400, str(exc), "BadRequestError")
        await self.replica.set_faults(cfg)
        return web.json_response({"config": msgspec.to_builtins(self.replica.faults.config)})

    async def _read_json(self, request: web.Request) -> dict[str, Any]:
        return prep.check_body(prep.decode_json(await request.read()), self.replica.config.model)

    async def _tokenize(self, request: web.Request) -> web.Response:
        try:
            body = await self._read_json(request)
            if "messages" in body:
                ids = prep.chat_ids(body, self.replica.tokenizer)
            elif "prompt" in body and isinstance(body["prompt"], str):
                ids = self.replica.tokenizer.encode(
                    body["prompt"], bool(body.get("add_special_tokens", True))
                )
            else:
                raise HTTPError(400, "Either 'prompt' (string) or 'messages' is required", param="prompt")
        except HTTPError as exc:
            return exc.response()
        return web.json_response(
            {
                "count": len(ids),
                "max_model_len": self.replica.config.max_model_len,
                "tokens": ids,
                "token_strs": None,
            }
        )

    async def _detokenize(self, request: web.Request) -> web.Response:
        try:
            body = await self._read_json(request)
            tokens = body.get("tokens")
            if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
                raise HTTPError(400, "'tokens' must be a list of integers", param="tokens")
        except HTTPError as exc:
            return exc.response()
        return web.json_response({"prompt": self.replica.tokenizer.decode(tokens)})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    def _prep_guard(self, long: bool) -> contextlib.AbstractAsyncContextManager[Any]:
        """The fleet's preparation lock for a long preparation; nothing for a short one."""
        return self.replica.prep_lock if long else contextlib.nullcontext()

    async def _serve(self, request: web.Request, chat: bool) -> web.StreamResponse:
        """One completion request: its API-server side (JSON decode, checks, block-hash chain),
        then its prompts in the engine's queue, then the response as the engine loop delivers.

        The API-server side runs in slices of ~``SLICE_S`` (``decode_json_sliced``,
        ``hash_prompt``) that yield to the event loop, and no engine loop waits for it: as in
        vLLM, where the API server is a separate process from the engine core, the engine keeps
        stepping while a request is prepared, and the request arrives at the engine (its arrival
        time, ``engine_now()``) when it is ready. That wall time, counted from the body being
        read, is ``kvrouter_sim_prepare_seconds``; a client's TTFT includes it, as with vLLM.
        All replicas share one event loop, so this is what keeps one replica's 126k-token
        prompt (several ms of CPU) from making every other replica's steps late: they wait at
        most one slice. Long preparations (> 4k tokens, or a body over 16 KB) take the fleet's
        preparation lock, one at a time in arrival order: the trace's arrivals come in bursts,
        and several long prompts sliced round robin would all finish last.
        """
        data = await request.read()
        read_at = clock()
        try:
            async with self._prep_guard(len(data) > prep.DECODE_SLICE_BYTES):
                body, ids = await prep.decode_json_sliced(data)
            body = prep.check_body(body, self.replica.config.model)
            prompts = prep.prompts(body, chat, self.replica.tokenizer, ids)
            params = prep.params(body, chat, prompts, self.replica.config)
        except HTTPError as exc:
            return exc.response()
        ktp = body.get("kv_transfer_params")
        nixl = self.replica.nixl
        hold_kv = nixl.prefills(ktp) and len(prompts) == 1 and not params[1]
        remote_tokens = 0
        if nixl.decodes(ktp) and len(prompts) == 1:
            assert isinstance(ktp, dict)
            remote_tokens, failed = await self._remote_read(ktp, len(prompts[0]))
            if failed is not None:
                return failed
        # The prompts as flat arrays, and no reference left to the decoded lists: this frame
        # lives as long as the response streams (compact_ints says why that matters).
        prompt_ids = [compact_ints(p, "I") for p in prompts]
        del body, ids, prompts, data
        if self.replica.faults.should_fail():
            return error_response(500, "Injected fault: internal server error", "InternalServerError")
        if self.replica.faults.stalls():
            await self.replica.faults.stall()
            read_at = clock()
        async with self._prep_guard(sum(len(p) for p in prompt_ids) > prep.LONG_PREP_TOKENS):
            hashes = [await self.replica.hash_prompt(p) for p in prompt_ids]
        queue = Chan()
        max_tokens, stream, include_usage, interval = params
        tracks: list[Track] = []
        fmt = ResponseFormatter(self.replica.config.model, chat, len(prompt_ids), self.replica.tokenizer)
        arrival = self.replica.engine_now()
        try:
            for i, p in enumerate(prompt_ids):
                tracks.append(
                    self.replica.submit(
                        p,
                        max_tokens,
                        queue,
                        i,
                        arrival=arrival,
                        block_hashes=hashes[i],
                        stream_interval=interval,
                        hold_kv=hold_kv,
                        remote_tokens=remote_tokens,
                    )
                )
        except HTTPError as exc:
            for tr in tracks:
                self.replica.abort(tr)
            return exc.response()
        self.replica.metrics.on_prepared(clock() - read_at)
        try:
            if stream:
                return await self._stream(request, tracks, queue, fmt, include_usage)
            return await self._unary(request, tracks, queue, fmt, self._lease if hold_kv else None)
        finally:
            for tr in tracks:
                self.replica.abort(tr)  # no-op for finished requests; frees blocks of abandoned ones

    async def _remote_read(self, ktp: dict[str, Any], prompt_len: int) -> tuple[int, web.Response | None]:
        """Decode side of a handoff: (tokens to load, or 0 to compute; an error response or None)."""
        nixl = self.replica.nixl
        pd = self.replica.metrics.pd
        if not nixl.valid(ktp):
            log.warning("Got invalid KVTransferParams: %s; computing the prompt locally", ktp)
            return 0, None
        ok, _ = await nixl.read(ktp)
        if ok:
            link = self.replica.model.profile.kv_link
            pd.xfer_time.observe(link.transfer_ms(prompt_len) / 1000 / self.replica.engine_config.time_scale)
            pd.bytes.observe(link.bytes_for(prompt_len))
            return prompt_len, None
        pd.failed_transfers.inc()
        if nixl.failure_policy == "recompute":
            return 0, None
        self.replica.metrics._success["error"].inc()
        return 0, error_response(500, "KV transfer from the prefill instance failed", "InternalServerError")

    def _lease(self, tr: Track) -> dict[str, Any]:
        """Prefill side, the request done: pin its blocks under a lease, describe them for D."""
        rep = self.replica
        blocks = rep.model.held_blocks(tr.rid) or []
        rid = tr.rid
        rep.nixl.lease(rid, lambda: rep.release_kv(rid), rep.metrics.pd.expired.inc)
        return rep.nixl.params_for(rid, blocks, rep.config.host, rep.port, tr.prompt_len, tr.cached_tokens)

    async def _unary(
        self,
        request: web.Request,
        tracks: list[Track],
        queue: Chan,
        fmt: ResponseFormatter,
        lease: Callable[[Track], dict[str, Any]] | None = None,
    ) -> web.StreamResponse:
        pending = len(tracks)
        while pending:
            for item in await queue.take():
                if item is CUT:
                    return _cut(request)
                fmt.add(item)
                if item.finish_reason is not None:
                    pending -= 1
        if self.replica.faults.die_after() is not None:
            self.replica.faults.count("die")
            return _cut(request)
        body = fmt.final(tracks)
        if lease is not None:
            body["kv_transfer_params"] = lease(tracks[0])
        return web.Response(body=json_encoder.encode(body), content_type="application/json")

    # Over the complexity limit on purpose: one SSE loop (chunks, usage, faults, disconnect); vLLM's generator is one piece too.
    async def _stream(  # noqa: C901
        self,
        request: web.Request,
        tracks: list[Track],
        queue: Chan,
        fmt: ResponseFormatter,
        include_usage: bool,
    ) -> web.StreamResponse:
        """SSE events, byte for byte as before: one ``data: {chunk}\\n\\n`` per chunk. Chunks
        that are ready together (one step's, or several steps' when this handler ran late) go
        out in one write; the end (usage chunk, ``[DONE]``) goes with the last step's chunks."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        die_after = self.replica.faults.die_after()
        stop_after = self.replica.faults.stop_after()
        sent = 0
        pending = len(tracks)
        started = False
        while pending:
            items = await queue.take()
            if not started and items[0] is not CUT:
                await resp.prepare(request)  # as soon as there is something to send
                started = True
            out: list[bytes] = []
            cut = False
            due = min((item.due for item in items if item is not CUT), default=None)
            for item in items:
                if item is CUT:
                    cut = True
                    break
                for chunk in fmt.sse_chunks(item, include_usage):
                    if stop_after is not None and sent >= stop_after:
                        if out:
                            await resp.write(b"".join(out))
                        await _hold_open(self.replica.faults)
                        return _cut(request, resp if started else None)
                    if die_after is not None and sent >= die_after:
                        self.replica.faults.count("die")
                        cut = True
                        break
                    out.append(chunk)
                    sent += 1
                if cut:
                    break
                if item.finish_reason is not None:
                    pending -= 1
                    if not pending:
                        break  # the response is complete; nothing after this is read
            if out:
                if not pending and not cut:  # the end goes in the same write
                    if include_usage:
                        out.append(b"data: " + json_encoder.encode(fmt.usage_chunk(tracks)) + b"\n\n")
                    out.append(b"data: [DONE]\n\n")
                    if due is not None:  # as the bytes leave (a drain wait is the client's)
                        self.replica.metrics.on_delivered(clock() - due)
                    await resp.write_eof(b"".join(out))
                    return resp
                if due is not None:
                    self.replica.metrics.on_delivered(clock() - due)
                await resp.write(b"".join(out))
            if cut:
                return _cut(request, resp if started else None)
        # Only reached if the last chunks were cut by die_after_chunks... which returns above; kept
        # so the function ends the stream properly whatever the loop above does.
        if not started:
            await resp.prepare(request)
        if include_usage:
            await resp.write(b"data: " + json_encoder.encode(fmt.usage_chunk(tracks)) + b"\n\n")
        await resp.write_eof(b"data: [DONE]\n\n")
        return resp


async def _hold_open(faults: Faults) -> None:
    """stop_after_chunks: send nothing more, keep the connection open, until the client leaves
    (this handler is cancelled) or the faults change."""
    faults.count("stop")
    try:
        await faults.until_changed()
    except asyncio.CancelledError:
        faults.count("stop_closed")  # the client closed the connection (what tests look for)
        raise


def _cut(request: web.Request, resp: web.StreamResponse | None = None) -> web.StreamResponse:
    """End the exchange without a clean end: abort the TCP connection (RST, no terminator)."""
    transport = request.transport
    if transport is not None:
        transport.abort()
    # aiohttp must not try to send anything more; the connection is gone either way.
    raise asyncio.CancelledError


def _report_endpoint(ep: str) -> str:
    if ep.startswith("tcp://"):
        return "tcp://*:" + ep.rsplit(":", 1)[1]
    return ep
