"""One simulated vLLM replica: vLLM's HTTP API in front of the engine model, plus its KV-event publisher.

The engine loop is one asyncio task per replica, in wall-clock time::

    while work exists:
        out = model.step(now)                       # pure: what this step does and how long it takes
        sleep until deadline += out.duration        # monotonic deadline, so sleep overshoot is
                                                    # paid back on the next step (lag is a metric)
        deliver out's tokens to request streams     # tokens appear when the step *ends*, as in vLLM
        publish out's KV events as one batch        # one ZMQ batch per step that produced events

Requests that arrive during a step join the next one, as with vLLM's busy loop. A request
arrives at the engine when its API-server side is done (body decoded, checked, block hashes: in
vLLM a separate process from the engine core, which never waits for it), so one replica's long
prompt never holds any engine's steps (``Replica._serve``). A client that goes away (handler
cancelled, or a failed write) aborts its request in the engine.

HTTP (vLLM 0.32 OpenAI server shapes): ``/v1/completions``, ``/v1/chat/completions`` (SSE with
``data: {...}\\n\\n`` and ``data: [DONE]\\n\\n``, ``stream_options.include_usage``), ``/v1/models``,
``/health``, ``/load``, ``/version``, ``/tokenize``, ``/detokenize``, ``/metrics``,
``/kv_event_sources``, ``POST /reset_prefix_cache``, and the sim's own ``GET/POST /sim/faults``.
``usage.prompt_tokens_details.cached_tokens`` is always present here; real vLLM fills it only with
``--enable-prompt-tokens-details``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import xxhash
from aiohttp import web

from .engine import EngineConfig, EngineModel, SimRequest, StepOutput, XxhBlockHasher, compact_ints
from .faults import FaultConfig, Faults, parse_faults
from .metrics import CONTENT_TYPE, SimMetrics, cache_config_labels
from .publisher import (
    DEFAULT_BUFFER_STEPS,
    DEFAULT_HWM,
    DEFAULT_TOPIC,
    EngineEventHashes,
    KVEventPublisher,
    VllmEventHashes,
)
from .tokenizer import SPECIAL_TOKENS, ChatTemplateError, Tokenizer, content_text

log = logging.getLogger(__name__)

_json = msgspec.json.Encoder()
_json_any = msgspec.json.Decoder()
VLLM_VERSION = "0.32.0"
# A late loop pays back at most this much on later steps, so a long stall (GC, a busy host) does
# not turn into a burst of zero-length steps.
MAX_CATCHUP_S = 0.05
DEFAULT_CHAT_MAX_TOKENS = 256
# The engine's clock: arrivals, step deadlines, lag, token times. Not loop.time(): uvloop's clock
# is libuv's millisecond uv_now, so lag measured with it was rounded to whole milliseconds (and
# a wake-up up to ~1 ms late could read as on time) while the target is sub-millisecond.
# time.monotonic() is the same CLOCK_MONOTONIC at full resolution. (Sleeps still go through the
# loop's timers, which libuv rounds to the millisecond; the lag metric shows what that costs.)
_clock = time.monotonic
# A request's own CPU work (decoding a token-id prompt, its block-hash chain) is done in slices of
# about this much CPU, yielding to the loop in between (_yield_behind_due_steps): a 126k-token
# prompt is several ms of work, and all replicas' engine loops share one event loop. A due step
# waits for at most the rest of one slice. 0.2 ms, not 0.5: in six interleaved pairs of the live
# bench, 99.37% of steps within 5 ms against 99.02% (docs/notes/2026-11-sim-live-capacity.md, round 6). See Replica._serve.
SLICE_S = 0.0002
# A late engine loop runs due steps back to back for at most this long before it yields.
BURST_S = 0.001
_DECODE_SLICE_BYTES = 16 * 1024  # ~2.7k ids, ~0.15 ms to decode
KV_EVENT_HASHES = ("vllm", "engine")
_LONG_PREP_TOKENS = 4096  # prompts hashed under the fleet's preparation lock (see Replica)
_HASH_SLICE_BLOCKS = 256  # ~0.08 ms; the slice ends after SLICE_S


class HTTPError(Exception):
    """An OpenAI-style error response: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type_: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.status = status
        self.type = type_
        self.param = param

    def response(self) -> web.Response:
        return error_response(self.status, str(self), self.type, self.param)


def error_response(status: int, message: str, type_: str, param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": status}}
    return web.Response(status=status, body=_json.encode(body), content_type="application/json")


@dataclass
class ReplicaConfig:
    """Everything about one replica that is not the engine model."""

    model: str = "tiny"
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port
    # KV events. With ``events_bind`` None the vLLM heuristic decides bind vs connect.
    events_endpoint: str | None = "tcp://127.0.0.1:*"
    events_bind: bool | None = None
    replay_endpoint: str | None = "tcp://127.0.0.1:*"
    topic: str = DEFAULT_TOPIC
    buffer_steps: int = DEFAULT_BUFFER_STEPS
    hwm: int = DEFAULT_HWM
    legacy_events: bool = False
    int_block_hashes: bool = True  # False: raw 32-byte digests (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0)
    # Block hashes in KV events: "vllm" = vLLM's sha256 values for the same tokens; "engine" = the
    # engine's own xxh3 identity (publisher.EngineEventHashes says when that is enough, and why).
    kv_event_hashes: str = "vllm"
    max_model_len: int = 2048
    default_chat_max_tokens: int = DEFAULT_CHAT_MAX_TOKENS
    # vLLM's --stream-interval: a stream sends its first token at once, then every this many
    # tokens, and the last ones when it finishes. A request's "stream_interval" can raise it.
    stream_interval: int = 1
    faults: FaultConfig = field(default_factory=FaultConfig)
    seed: int = 0


@dataclass(slots=True)
class _Delta:
    index: int
    token_ids: list[int]
    finish_reason: str | None
    due: float = 0.0  # when the step that produced these tokens ended (its deadline), on _clock


_CUT = object()  # queued to a stream when the replica restarts or stops: cut the connection


class _Chan:
    """What the engine loop hands one HTTP request: a list it appends to and a waiter it wakes.

    Cheaper than an ``asyncio.Queue`` (no getter deque, no per-item wake-up), and ``take()``
    returns everything queued so far, so a handler that fell behind writes several steps'
    chunks at once instead of waking once per step.
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def take(self) -> list[Any]:
        """Every item queued so far (waits for at least one), oldest first."""
        while not self._items:
            w = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await w
            finally:
                self._waiter = None
        items = self._items
        self._items = []
        return items


@dataclass(slots=True)
class _Track:
    """Server-side state of one engine request (one prompt of an HTTP request)."""

    rid: str
    index: int
    queue: _Chan
    prompt_len: int
    arrival: float
    scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    cached_tokens: int = 0
    generated: int = 0
    finished: bool = False
    stream_interval: int = 1
    held: list[int] | None = None  # tokens generated but not yet handed to the stream (interval)


class Replica:
    """A simulated vLLM replica: HTTP server + engine loop + KV-event publisher + metrics + faults."""

    def __init__(
        self,
        config: ReplicaConfig,
        engine_config: EngineConfig,
        tokenizer: Tokenizer,
        *,
        name: str = "r0",
        zmq_ctx: Any = None,
        prep_lock: asyncio.Lock | None = None,
    ) -> None:
        self.config = config
        self.engine_config = engine_config
        self.tokenizer = tokenizer
        self.name = name
        self._zmq_ctx = zmq_ctx
        # The engine's own (cheap) block identity; with kv_event_hashes="vllm" KV events get
        # vLLM's sha256 values from event_hashes, so they equal a real engine's for the same tokens.
        self.hasher = XxhBlockHasher()
        if config.kv_event_hashes not in KV_EVENT_HASHES:
            raise ValueError(f"invalid kv_event_hashes {config.kv_event_hashes!r}: one of {KV_EVENT_HASHES}")
        self.event_hashes: VllmEventHashes | EngineEventHashes = (
            VllmEventHashes(as_bytes=not config.int_block_hashes)
            if config.kv_event_hashes == "vllm"
            else EngineEventHashes(as_bytes=not config.int_block_hashes)
        )
        self.model: EngineModel = self._new_model()
        self.faults = Faults(config.faults, seed=config.seed)
        self.metrics = self._new_metrics()
        self.publisher: KVEventPublisher | None = None
        self._tracks: dict[str, _Track] = {}
        # When the engine's next step starts, on the engine's clock (None: idle). A request that
        # arrives while the loop is late joins that step, so its arrival is stamped no later.
        self._next_step_at: float | None = None
        # Long preparations run one at a time, in arrival order, across the replicas sharing this
        # lock (a fleet shares one): several long prompts arriving together (the trace's arrivals
        # come in bursts) would otherwise be sliced round robin and all finish last.
        self._prep_lock = prep_lock if prep_lock is not None else asyncio.Lock()
        self._wake = asyncio.Event()
        self._epoch = 0  # bumped by restart: a step computed before it is discarded
        self._held_batch: tuple[int, bytes] | None = None  # reorder fault: batch sent after the next
        self._loop_task: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.SockSite | None = None
        self._refuse_task: asyncio.Task[None] | None = None
        self._stopping = False
        self.port = config.port
        self.steps = 0
        self.started_at = time.time()

    # -- properties ------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    @property
    def events_endpoint(self) -> str | None:
        return None if self.publisher is None else self.publisher.endpoint

    @property
    def replay_endpoint(self) -> str | None:
        return None if self.publisher is None else self.publisher.replay_endpoint

    @property
    def listening(self) -> bool:
        return self._site is not None

    def _new_model(self) -> EngineModel:
        return EngineModel(self.engine_config, block_hasher=self.hasher, output_token=self._output_token)

    def _output_token(self, request_id: str, i: int) -> int:
        # Deterministic per (request, position), never a special token, inside the vocabulary.
        n_special = len(SPECIAL_TOKENS)
        span = max(1, self.tokenizer.vocab_size - n_special)
        return n_special + xxhash.xxh3_64_intdigest(request_id.encode(), seed=i) % span

    def _new_metrics(self) -> SimMetrics:
        ec = self.engine_config
        labels = cache_config_labels(
            block_size=ec.block_size,
            num_gpu_blocks=ec.num_gpu_blocks,
            num_cpu_blocks=(ec.cpu_tier_tokens // ec.block_size) or None,
            enable_prefix_caching=ec.enable_prefix_caching,
            # vLLM's value when the events carry its hashes; else none of vLLM's, so a router
            # that reads it knows it cannot recompute them.
            hash_algo=self.event_hashes.algo,
        )
        return SimMetrics(self.config.model, labels)

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        if cfg.events_endpoint is not None:
            self.publisher = KVEventPublisher(
                cfg.events_endpoint,
                replay_endpoint=cfg.replay_endpoint,
                topic=cfg.topic,
                buffer_steps=cfg.buffer_steps,
                hwm=cfg.hwm,
                legacy=cfg.legacy_events,
                bind=cfg.events_bind,
                ctx=self._zmq_ctx,
            )
            self.publisher.start()
        self._runner = web.AppRunner(self.build_app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        await self._listen()
        self._loop_task = asyncio.get_running_loop().create_task(
            self._engine_loop(), name=f"engine:{self.name}"
        )
        if self.faults.config.refuse_connections:
            await self._apply_faults(self.faults.config)

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._cut_all()
        for task in (self._loop_task, self._refuse_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._runner is not None:
            await self._runner.cleanup()
        if self.publisher is not None:
            await self.publisher.close()

    async def _listen(self) -> None:
        assert self._runner is not None
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.config.host, self.port))
        self.port = sock.getsockname()[1]
        self._site = web.SockSite(self._runner, sock)
        await self._site.start()

    async def _unlisten(self) -> None:
        """Stop accepting and drop open connections, as a dead process would."""
        if self._site is not None:
            await self._site.stop()
            self._site = None
        self._cut_all()
        if self._runner is not None and self._runner.server is not None:
            for proto in self._runner.server.connections:
                proto.force_close()

    # -- faults ----------------------------------------------------------------------------------
    async def set_faults(self, config: FaultConfig) -> None:
        """Apply a fault config now (restart is performed once; refuse stops/starts listening)."""
        self.faults.set(config)
        await self._apply_faults(config)

    async def _apply_faults(self, config: FaultConfig) -> None:
        if config.restart:
            self.restart()
        if self._refuse_task is not None:
            self._refuse_task.cancel()
            self._refuse_task = None
        if config.refuse_connections and self._site is not None:
            await self._unlisten()
        elif not config.refuse_connections and self._site is None and not self._stopping:
            await self._listen()
        if config.refuse_connections and config.refuse_for_s > 0:
            self._refuse_task = asyncio.get_running_loop().create_task(
                self._clear_refuse_after(config.refuse_for_s)
            )

    async def _clear_refuse_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self._refuse_task = None
        cfg = msgspec.structs.replace(self.faults.config, refuse_connections=False, refuse_for_s=0.0)
        self.faults.set(cfg)
        if self._site is None and not self._stopping:
            await self._listen()

    def restart(self) -> None:
        """What a process restart looks like from outside: everything in flight is cut, the cache
        is empty, KV-event seq restarts at 0, counters restart, and no AllBlocksCleared is sent."""
        self._epoch += 1
        self._cut_all()
        self.model = self._new_model()
        self._next_step_at = None
        self.event_hashes.clear()
        self.metrics = self._new_metrics()
        self._held_batch = None
        if self.publisher is not None:
            self.publisher.reset()
        self.started_at = time.time()

    def _cut_all(self) -> None:
        for tr in self._tracks.values():
            tr.queue.put_nowait(_CUT)
        self._tracks.clear()

    # -- engine loop -----------------------------------------------------------------------------
    def submit(
        self,
        prompt_ids: Sequence[int],
        max_tokens: int,
        queue: _Chan,
        index: int,
        *,
        arrival: float | None = None,
        block_hashes: list[int] | None = None,
        stream_interval: int = 1,
    ) -> _Track:
        """Queue one prompt in the engine, arrived at ``arrival`` on the engine's clock (default:
        ``engine_now()``; the server's TTFT and e2e count from the wall clock now), with its
        ``block_hashes`` if already computed (``hash_prompt``). The engine never samples EOS:
        every request runs to ``max_tokens`` (vLLM with ``ignore_eos``). Tokens reach ``queue``
        every ``stream_interval`` tokens (the first and the last at once). Raises HTTPError if it
        cannot ever fit."""
        rid = f"req-{uuid.uuid4().hex}"
        wall = _clock()  # the server's latency metrics (TTFT, e2e) count from here, as a client would
        now = self.engine_now() if arrival is None else arrival
        try:
            self.model.add_request(
                SimRequest(
                    request_id=rid, max_tokens=max_tokens, token_ids=prompt_ids, block_hashes=block_hashes,
                    arrival=now,
                ),
                now,
            )  # fmt: skip
        except ValueError as exc:
            raise HTTPError(400, str(exc), param="max_tokens") from exc
        tr = _Track(
            rid=rid, index=index, queue=queue, prompt_len=len(prompt_ids), arrival=wall,
            stream_interval=stream_interval,
        )  # fmt: skip
        self._tracks[rid] = tr
        self._wake.set()
        return tr

    def engine_now(self) -> float:
        """Now on the engine's clock: the wall clock, except while the loop is late, when it is
        the start of the step the loop is about to compute (a request arriving now joins that
        step, as in vLLM; stamping it later would push the engine's clock past the loop's), but
        never more than the catch-up limit back: the loop drops lateness beyond that."""
        now = _clock()
        nxt = self._next_step_at
        return now if nxt is None or nxt > now else max(nxt, now - MAX_CATCHUP_S)

    async def hash_prompt(self, ids: Sequence[int]) -> list[int]:
        """The prompt's block-hash chain, exactly what ``EngineModel.add_request`` computes
        (``self.hasher.chain``), in slices of about ``SLICE_S`` that yield to the loop."""
        bs = self.engine_config.block_size
        n = len(ids) // bs
        chain = self.hasher.chain
        out: list[int] = []
        parent: int | None = None
        t0 = time.perf_counter()
        for j in range(0, n, _HASH_SLICE_BLOCKS):
            part = chain(parent, ids, bs, min(_HASH_SLICE_BLOCKS, n - j), j)
            out += part
            parent = part[-1]
            if j + _HASH_SLICE_BLOCKS < n and time.perf_counter() - t0 > SLICE_S:
                await _yield_behind_due_steps()
                t0 = time.perf_counter()
        return out

    def abort(self, tr: _Track) -> None:
        if self._tracks.pop(tr.rid, None) is not None and not tr.finished:
            self.model.abort_request(tr.rid)
            self.metrics._success["abort"].inc()
            self._wake.set()

    async def _engine_loop(self) -> None:
        clock = _clock
        deadline = awake_since = clock()
        while not self._stopping:
            model = self.model
            if not model.has_unfinished_requests() and not model.has_pending_events():
                self._flush_held_batch()
                self.metrics.on_idle(model.kv_cache_usage)
                self._next_step_at = None
                self._wake.clear()
                await self._wake.wait()
                awake_since = clock()
                # The first step starts when the request arrived (model.now: its arrival, or the
                # last step's end if it arrived before that), not when this loop woke up.
                now = clock()
                arrived = self.model.now if self.model.has_unfinished_requests() else now
                deadline = max(min(arrived, now), now - MAX_CATCHUP_S)
                continue
            epoch = self._epoch
            start = clock()
            if deadline < start - MAX_CATCHUP_S:  # too late to pay back: skip simulated time
                self.metrics.on_dropped(start - MAX_CATCHUP_S - deadline)
                deadline = start - MAX_CATCHUP_S
            out = model.step(max(deadline, model.now))
            self.steps += 1
            if out.duration == 0.0 and not out.new_tokens and not out.events:
                # Nothing schedulable (requests loading from the CPU tier): wait for the next
                # load to finish or for a new request, whichever is first.
                nxt = model.next_event_time()
                self._wake.clear()
                timeout = None if nxt is None else max(0.0, nxt - clock())
                self._next_step_at = None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
                deadline = awake_since = clock()
                continue
            deadline += out.duration
            self._next_step_at = deadline
            delay = deadline - clock()
            if delay > 0 or clock() - awake_since > BURST_S:
                await asyncio.sleep(max(0.0, delay))
                awake_since = clock()
            # else: a late loop runs the next due step at once, without a turn of the loop in
            # between, for up to BURST_S: streams then get several steps' tokens per wake-up and
            # write them at once (same SSE events), instead of one wake-up and write per step.
            lag = clock() - deadline
            if epoch != self._epoch:  # restarted while this step "ran": it never happened
                continue
            self._deliver(out, clock(), deadline)
            self._publish(out)
            self.metrics.on_step(
                model.num_running, model.num_waiting, model.kv_cache_usage, out.num_scheduled_tokens, lag
            )
            if out.num_preemptions:
                self.metrics.on_preemption(out.num_preemptions)

    def _deliver(self, out: StepOutput, now: float, due: float) -> None:
        metrics = self.metrics
        for rid, hit in out.cached_tokens.items():
            tr = self._tracks.get(rid)
            if tr is None or tr.scheduled is not None:
                continue
            tr.scheduled = out.start
            tr.cached_tokens = hit.local + hit.external
            metrics.on_scheduled(tr.prompt_len, hit.local, hit.external_queried, hit.external)
        for rid, ids in out.new_tokens.items():
            tr = self._tracks.get(rid)
            if tr is None:
                continue
            n = len(ids)
            if n == 0:
                continue
            metrics.on_tokens(n)
            if tr.first_token is None:
                tr.first_token = now
                metrics.on_first_token(now - tr.arrival)
                if n > 1:
                    for _ in range(n - 1):
                        metrics.on_inter_token(0.0)
            else:
                assert tr.last_token is not None
                gap = (now - tr.last_token) / n
                for _ in range(n):
                    metrics.on_inter_token(gap)
            first = tr.generated == 0
            tr.last_token = now
            tr.generated += n
            reason = out.finished.get(rid)
            if tr.stream_interval == 1:
                tr.queue.put_nowait(_Delta(tr.index, list(ids), reason, due))
            else:
                held = tr.held
                if held is None:
                    held = tr.held = []
                held += ids
                # vLLM's OutputProcessor: the first output at once, then every stream_interval
                # tokens, and whatever is left when the request finishes.
                if first or reason is not None or len(held) >= tr.stream_interval:
                    tr.held = None
                    tr.queue.put_nowait(_Delta(tr.index, held, reason, due))
            if reason is not None:
                self._finish(tr, reason, now)
        for rid, reason in out.finished.items():
            tr = self._tracks.get(rid)
            if tr is not None and not tr.finished:  # finished without a token this step
                held, tr.held = tr.held or [], None
                tr.queue.put_nowait(_Delta(tr.index, held, reason, due))
                self._finish(tr, reason, now)

    def _finish(self, tr: _Track, reason: str, now: float) -> None:
        tr.finished = True
        self._tracks.pop(tr.rid, None)
        sched = tr.scheduled if tr.scheduled is not None else tr.arrival
        first = tr.first_token if tr.first_token is not None else now
        self.metrics.on_finished(
            reason,
            prompt_tokens=tr.prompt_len,
            generation_tokens=tr.generated,
            e2e_s=now - tr.arrival,
            # sched is on the engine's clock, which a late loop keeps behind the wall clock
            queue_s=max(0.0, sched - tr.arrival),
            prefill_s=max(0.0, first - max(sched, tr.arrival)),
            decode_s=now - first,
        )

    def _publish(self, out: StepOutput) -> None:
        pub = self.publisher
        if pub is None or not out.events:
            return
        events = self.event_hashes.translate(out.events)
        payload = pub.encode(events)
        if self.faults.malformed_event():
            # 0xc1 is the one byte msgpack never uses: the batch cannot be decoded.
            payload = b"\xc1" + payload[1:]
        if self._held_batch is not None:
            held = self._held_batch
            self._held_batch = None
            pub.publish_payload(payload)
            pub.publish_payload(held[1], held[0])
        elif self.faults.reorder_event():
            self._held_batch = (pub.take_seq(), payload)
        else:
            pub.publish_payload(payload)

    def _flush_held_batch(self) -> None:
        if self._held_batch is not None and self.publisher is not None:
            seq, payload = self._held_batch
            self._held_batch = None
            self.publisher.publish_payload(payload, seq)

    # -- HTTP ------------------------------------------------------------------------------------
    def build_app(self) -> web.Application:
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
        return app

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _load(self, request: web.Request) -> web.Response:
        return web.json_response({"server_load": len(self._tracks)})

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": VLLM_VERSION})

    async def _models(self, request: web.Request) -> web.Response:
        name = self.config.model
        card = {
            "id": name,
            "object": "model",
            "created": int(self.started_at),
            "owned_by": "vllm",
            "root": name,
            "parent": None,
            "max_model_len": self.config.max_model_len,
        }
        return web.json_response({"object": "list", "data": [card]})

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def _kv_event_sources(self, request: web.Request) -> web.Response:
        pub = self.publisher
        if pub is None:
            return web.json_response({})
        cfg = self.config
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
        if not self.model.reset_prefix_cache():
            return error_response(500, "Failed to reset prefix cache: blocks in use", "InternalServerError")
        self._wake.set()
        return web.Response(status=200)

    async def _get_faults(self, request: web.Request) -> web.Response:
        body = {"config": msgspec.to_builtins(self.faults.config), "injected": self.faults.injected}
        return web.json_response(body)

    async def _post_faults(self, request: web.Request) -> web.Response:
        try:
            cfg = parse_faults(await request.read())
        except ValueError as exc:
            return error_response(400, str(exc), "BadRequestError")
        await self.set_faults(cfg)
        return web.json_response({"config": msgspec.to_builtins(self.faults.config)})

    async def _read_json(self, request: web.Request) -> dict[str, Any]:
        return self._check_body(_decode_json(await request.read()))

    def _check_body(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise HTTPError(400, "Request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.config.model:
            raise HTTPError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        return body

    async def _tokenize(self, request: web.Request) -> web.Response:
        try:
            body = await self._read_json(request)
            if "messages" in body:
                ids = self._chat_ids(body)
            elif "prompt" in body and isinstance(body["prompt"], str):
                ids = self.tokenizer.encode(body["prompt"], bool(body.get("add_special_tokens", True)))
            else:
                raise HTTPError(400, "Either 'prompt' (string) or 'messages' is required", param="prompt")
        except HTTPError as exc:
            return exc.response()
        return web.json_response(
            {"count": len(ids), "max_model_len": self.config.max_model_len, "tokens": ids, "token_strs": None}
        )

    async def _detokenize(self, request: web.Request) -> web.Response:
        try:
            body = await self._read_json(request)
            tokens = body.get("tokens")
            if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
                raise HTTPError(400, "'tokens' must be a list of integers", param="tokens")
        except HTTPError as exc:
            return exc.response()
        return web.json_response({"prompt": self.tokenizer.decode(tokens)})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    def _chat_ids(self, body: Mapping[str, Any]) -> list[int]:
        """vLLM's chat prompt: the chat template, then the text encoded with the request's
        ``add_special_tokens`` (default False: the template adds BOS). A template that refuses
        the messages is the client's error (400 with the template's reason), as in vLLM."""
        tok = self.tokenizer
        try:
            text = tok.render_chat(
                _messages(body.get("messages")), bool(body.get("add_generation_prompt", True))
            )
        except ChatTemplateError as exc:
            raise HTTPError(400, str(exc)) from exc
        return tok.encode(text, add_special_tokens=bool(body.get("add_special_tokens", False)))

    def _prompts(self, body: Mapping[str, Any], chat: bool, ids: list[int] | None = None) -> list[list[int]]:
        """The request's prompts as token ids. ``ids``: the ``prompt`` already decoded and
        checked as token ids (``decode_json_sliced``)."""
        tok = self.tokenizer
        if chat:
            return [self._chat_ids(body)]
        if ids:
            return [ids]
        prompt = body.get("prompt")
        special = bool(body.get("add_special_tokens", True))
        if isinstance(prompt, str):
            return [tok.encode(prompt, special)]
        if isinstance(prompt, list) and prompt:
            tids = _token_ids(prompt)
            if tids is not None:
                return [tids]
            if all(isinstance(p, str) for p in prompt):
                return [tok.encode(p, special) for p in prompt]
            if all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt):
                return [list(p) for p in prompt]
        raise HTTPError(
            400, "'prompt' must be a string, a list of token ids, or a batch of either", param="prompt"
        )

    def _prep_guard(self, long: bool) -> contextlib.AbstractAsyncContextManager[Any]:
        """The fleet's preparation lock for a long preparation; nothing for a short one."""
        return self._prep_lock if long else contextlib.nullcontext()

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
        read_at = _clock()
        try:
            async with self._prep_guard(len(data) > _DECODE_SLICE_BYTES):
                body, ids = await decode_json_sliced(data)
            body = self._check_body(body)
            prompts = self._prompts(body, chat, ids)
            params = self._params(body, chat, prompts)
        except HTTPError as exc:
            return exc.response()
        # The prompts as flat arrays, and no reference left to the decoded lists: this frame
        # lives as long as the response streams (compact_ints says why that matters).
        prompt_ids = [compact_ints(p, "I") for p in prompts]
        del body, ids, prompts, data
        if self.faults.should_fail():
            return error_response(500, "Injected fault: internal server error", "InternalServerError")
        if self.faults.stalls():
            await self.faults.stall()
            read_at = _clock()
        async with self._prep_guard(sum(len(p) for p in prompt_ids) > _LONG_PREP_TOKENS):
            hashes = [await self.hash_prompt(p) for p in prompt_ids]
        queue = _Chan()
        max_tokens, stream, include_usage, interval = params
        tracks: list[_Track] = []
        fmt = _Formatter(self.config.model, chat, len(prompt_ids), self.tokenizer)
        arrival = self.engine_now()
        try:
            for i, p in enumerate(prompt_ids):
                tracks.append(
                    self.submit(
                        p,
                        max_tokens,
                        queue,
                        i,
                        arrival=arrival,
                        block_hashes=hashes[i],
                        stream_interval=interval,
                    )
                )
        except HTTPError as exc:
            for tr in tracks:
                self.abort(tr)
            return exc.response()
        self.metrics.on_prepared(_clock() - read_at)
        try:
            if stream:
                return await self._stream(request, tracks, queue, fmt, include_usage)
            return await self._unary(request, tracks, queue, fmt)
        finally:
            for tr in tracks:
                self.abort(tr)  # no-op for finished requests; frees blocks of abandoned ones

    def _params(
        self, body: Mapping[str, Any], chat: bool, prompts: Sequence[list[int]]
    ) -> tuple[int, bool, bool, int]:
        mt = body.get("max_completion_tokens") if chat else None
        if mt is None:
            mt = body.get("max_tokens")
        longest = max(len(p) for p in prompts)
        if mt is None:
            mt = (
                16
                if not chat
                else min(self.config.default_chat_max_tokens, self.config.max_model_len - longest)
            )
        if not isinstance(mt, int) or isinstance(mt, bool) or mt < 1:
            raise HTTPError(400, f"max_tokens must be at least 1, got {mt}.", param="max_tokens")
        if int(body.get("n", 1) or 1) != 1:
            raise HTTPError(400, "The simulator supports only n=1.", param="n")
        if any(len(p) == 0 for p in prompts):
            raise HTTPError(400, "The prompt cannot be empty.", param="prompt")
        if longest + mt > self.config.max_model_len:
            raise HTTPError(
                400,
                f"This model's maximum context length is {self.config.max_model_len} tokens. However, you "
                f"requested {longest + mt} tokens ({longest} in the messages, {mt} in the completion). "
                "Please reduce the length of the messages or completion.",
                param="input_tokens",
            )
        opts = body.get("stream_options") or {}
        include_usage = bool(opts.get("include_usage", False)) if isinstance(opts, dict) else False
        interval = body.get("stream_interval")
        if interval is not None and (
            not isinstance(interval, int) or isinstance(interval, bool) or interval < 1
        ):
            raise HTTPError(
                400, f"stream_interval must be at least 1, got {interval}.", param="stream_interval"
            )
        # As vLLM: a request can raise the server's --stream-interval, never lower it.
        interval = max(interval or 1, self.config.stream_interval)
        # ignore_eos is accepted and moot: the sim never samples EOS.
        return mt, bool(body.get("stream", False)), include_usage, interval

    async def _unary(
        self, request: web.Request, tracks: list[_Track], queue: _Chan, fmt: _Formatter
    ) -> web.StreamResponse:
        pending = len(tracks)
        while pending:
            for item in await queue.take():
                if item is _CUT:
                    return _cut(request)
                fmt.add(item)
                if item.finish_reason is not None:
                    pending -= 1
        if self.faults.die_after() is not None:
            self.faults.count("die")
            return _cut(request)
        return web.Response(body=_json.encode(fmt.final(tracks)), content_type="application/json")

    async def _stream(
        self,
        request: web.Request,
        tracks: list[_Track],
        queue: _Chan,
        fmt: _Formatter,
        include_usage: bool,
    ) -> web.StreamResponse:
        """SSE events, byte for byte as before: one ``data: {chunk}\\n\\n`` per chunk. Chunks
        that are ready together (one step's, or several steps' when this handler ran late) go
        out in one write; the end (usage chunk, ``[DONE]``) goes with the last step's chunks."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        die_after = self.faults.die_after()
        sent = 0
        pending = len(tracks)
        started = False
        while pending:
            items = await queue.take()
            if not started and items[0] is not _CUT:
                await resp.prepare(request)  # as soon as there is something to send
                started = True
            out: list[bytes] = []
            cut = False
            due = min((item.due for item in items if item is not _CUT), default=None)
            for item in items:
                if item is _CUT:
                    cut = True
                    break
                for chunk in fmt.sse_chunks(item, include_usage):
                    if die_after is not None and sent >= die_after:
                        self.faults.count("die")
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
                        out.append(b"data: " + _json.encode(fmt.usage_chunk(tracks)) + b"\n\n")
                    out.append(b"data: [DONE]\n\n")
                    if due is not None:  # as the bytes leave (a drain wait is the client's)
                        self.metrics.on_delivered(_clock() - due)
                    await resp.write_eof(b"".join(out))
                    return resp
                if due is not None:
                    self.metrics.on_delivered(_clock() - due)
                await resp.write(b"".join(out))
            if cut:
                return _cut(request, resp if started else None)
        # Only reached if the last chunks were cut by die_after_chunks... which returns above; kept
        # so the function ends the stream properly whatever the loop above does.
        if not started:
            await resp.prepare(request)
        if include_usage:
            await resp.write(b"data: " + _json.encode(fmt.usage_chunk(tracks)) + b"\n\n")
        await resp.write_eof(b"data: [DONE]\n\n")
        return resp


async def _yield_behind_due_steps() -> None:
    """Give the loop a turn, and another: what a preparation slice yields to must include the
    engine steps that fell due while the slice ran.

    Why two: a task that yields with ``sleep(0)`` is queued to run on the loop's next turn, and
    that turn first fires its due timers, whose engine loops queue up *behind* it, so the next
    slice ran before them and a step due during a slice waited for two slices. After a second
    ``sleep(0)`` the slice's task is behind them. Measured in three interleaved pairs of the
    live bench: 99.34-99.53% of steps within 5 ms against 98.92-99.40% with one."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)


def _cut(request: web.Request, resp: web.StreamResponse | None = None) -> web.StreamResponse:
    """End the exchange without a clean end: abort the TCP connection (RST, no terminator)."""
    transport = request.transport
    if transport is not None:
        transport.abort()
    # aiohttp must not try to send anything more; the connection is gone either way.
    raise asyncio.CancelledError


_INT_LIST = list[int]
_ints = msgspec.json.Decoder(list[int])
# Stands for a long token-id prompt while the rest of the body is decoded. Used only for bodies
# without any \u0000 escape, so no string the client sent can equal it (JSON has no raw NULs).
_IDS_SLOT = b'"\\u0000kvrouter-sim-ids\\u0000"'
_IDS_SLOT_VALUE = "\x00kvrouter-sim-ids\x00"


def _decode_json(data: bytes) -> Any:
    try:
        return _json_any.decode(data)
    except msgspec.DecodeError as exc:
        raise HTTPError(400, f"Invalid JSON body: {exc}") from exc
    except RecursionError:  # msgspec's nesting limit: a client mistake, not a server fault
        raise HTTPError(400, "Invalid JSON body: nested too deeply") from None


async def decode_json_sliced(data: bytes, slice_s: float = SLICE_S) -> tuple[Any, list[int] | None]:
    """``(body, ids)``: the body exactly as ``_decode_json(data)`` gives it (same value, same
    errors), and its top-level ``prompt`` as a list of ints if it is a non-empty array of JSON
    integers, else None. A long id array is decoded in slices of ~16 KB that yield to the loop
    (decoding 126k ids at once is ~7 ms), yielding after ``slice_s`` of work; anything
    unusual takes the one-shot path.

    How: the first ``"prompt"`` key is followed by ``[``; up to the first ``]`` there must be
    integers only, decoded slice by slice (cut at commas, each slice as ``list[int]``: a string,
    a float, a bool or a nested array fails, and the one-shot path decides). The rest of the body
    is decoded with a placeholder string in the array's place, and the fast result is used only
    if the placeholder came back as the top-level ``prompt`` (the key was not nested, not
    repeated). Then the whole body is valid JSON and decodes to the same value."""
    if len(data) <= _DECODE_SLICE_BYTES:
        return _decode_json(data), None
    key = data.find(b'"prompt"')
    if key < 0 or data.find(b"\\u0000") >= 0:
        return _decode_json(data), None
    i = key + 8
    n = len(data)
    while i < n and data[i] in b" \t\r\n":
        i += 1
    if i >= n or data[i] != 0x3A:  # ':'
        return _decode_json(data), None
    i += 1
    while i < n and data[i] in b" \t\r\n":
        i += 1
    end = data.find(b"]", i)
    if i >= n or data[i] != 0x5B or end < 0:  # '['
        return _decode_json(data), None
    ids: list[int] = []
    pos = i + 1
    t0 = time.perf_counter()
    try:
        while True:
            cut = data.find(b",", pos + _DECODE_SLICE_BYTES, end) if pos + _DECODE_SLICE_BYTES < end else -1
            stop = end if cut < 0 else cut
            part = _ints.decode(b"[" + data[pos:stop] + b"]")
            if not part and (cut >= 0 or pos != i + 1):  # "[1,]", "[1, ]": invalid JSON
                return _decode_json(data), None
            ids += part
            if cut < 0:
                break
            pos = cut + 1
            if time.perf_counter() - t0 > slice_s:
                await _yield_behind_due_steps()
                t0 = time.perf_counter()
    except msgspec.DecodeError:  # not all integers (ValidationError), or not valid JSON
        return _decode_json(data), None
    try:
        rest = _json_any.decode(data[:i] + _IDS_SLOT + data[end + 1 :])
    except (msgspec.DecodeError, RecursionError):
        return _decode_json(data), None
    if not isinstance(rest, dict) or rest.get("prompt") != _IDS_SLOT_VALUE:
        return _decode_json(data), None
    rest["prompt"] = ids
    return rest, (ids or None)


def _token_ids(prompt: list[Any]) -> list[int] | None:
    """A copy of ``prompt`` if every item is an int (not a bool), else None. msgspec checks a 12k-id
    prompt in C, ~15x faster than a Python loop (which was ~5% of a loaded sim's CPU); what it
    refuses (e.g. ints beyond 64 bits) goes through the exact Python check."""
    try:
        return msgspec.convert(prompt, _INT_LIST)
    except msgspec.ValidationError:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        return None


def _report_endpoint(ep: str) -> str:
    if ep.startswith("tcp://"):
        return "tcp://*:" + ep.rsplit(":", 1)[1]
    return ep


def _messages(raw: Any) -> list[Mapping[str, Any]]:
    if not isinstance(raw, list) or not raw or not all(isinstance(m, dict) for m in raw):
        raise HTTPError(400, "'messages' must be a non-empty list of message objects", param="messages")
    for m in raw:
        if not isinstance(m.get("role"), str):
            raise HTTPError(400, "every message needs a string 'role'", param="messages")
        content_text(m.get("content"))
    return raw


# Stands for the text in a chunk template; no real text contains NULs.
_TEXT_SLOT = "\x00kvrouter-sim-text\x00"
_TEXT_SLOT_JSON = _json.encode(_TEXT_SLOT)


class _Formatter:
    """OpenAI response/chunk shapes of vLLM 0.32 for one HTTP request (all its prompts)."""

    def __init__(self, model: str, chat: bool, n_prompts: int, tokenizer: Tokenizer) -> None:
        self.model = model
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.tok = tokenizer
        self.ids: list[list[int]] = [[] for _ in range(n_prompts)]
        self.reasons: list[str | None] = [None] * n_prompts
        self.role_sent = [False] * n_prompts
        self._templates: dict[tuple[int, str | None, bool], tuple[bytes, bytes]] = {}

    def add(self, d: _Delta) -> None:
        self.ids[d.index].extend(d.token_ids)
        if d.finish_reason is not None:
            self.reasons[d.index] = d.finish_reason

    def _base(self) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunks(self, d: _Delta, include_usage: bool) -> list[dict[str, Any]]:
        """The chunk objects for one delta (the reference shape; ``sse_chunks`` sends them)."""
        self.add(d)
        role = self.chat and not self.role_sent[d.index]
        self.role_sent[d.index] = True
        return self._chunk_dicts(d.index, self.tok.decode(d.token_ids), d.finish_reason, include_usage, role)

    def _chunk_dicts(
        self, index: int, text: str, finish_reason: str | None, include_usage: bool, role: bool
    ) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self.chat:
            if role:
                first = self._base()
                first["choices"] = [
                    {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}
                ]  # fmt: skip
                out.append(first)
            choice: dict[str, Any] = {
                "index": index,
                "delta": {"content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        else:
            choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
        if finish_reason is not None:
            choice["stop_reason"] = None
        c = self._base()
        c["choices"] = [choice]
        out.append(c)
        if include_usage:
            for chunk in out:
                chunk["usage"] = None
        return out

    def sse_chunks(self, d: _Delta, include_usage: bool) -> list[bytes]:
        """``chunks(d)`` as SSE events (``data: <json>\\n\\n``), byte for byte, from templates:
        per (index, finish_reason, include_usage) the JSON around the text is encoded once, so
        a token costs one string encode instead of building and encoding four dicts."""
        self.add(d)
        text = self.tok.decode(d.token_ids)
        out: list[bytes] = []
        if self.chat and not self.role_sent[d.index]:
            self.role_sent[d.index] = True
            role = self._chunk_dicts(d.index, "", None, include_usage, True)[0]
            out.append(b"data: " + _json.encode(role) + b"\n\n")
        key = (d.index, d.finish_reason, include_usage)
        tpl = self._templates.get(key)
        if tpl is None:
            (c,) = self._chunk_dicts(d.index, _TEXT_SLOT, d.finish_reason, include_usage, False)
            head, tail = _json.encode(c).split(_TEXT_SLOT_JSON)
            tpl = self._templates[key] = (b"data: " + head, tail + b"\n\n")
        out.append(tpl[0] + _json.encode(text) + tpl[1])
        return out

    def usage(self, tracks: Sequence[_Track]) -> dict[str, Any]:
        prompt = sum(t.prompt_len for t in tracks)
        completion = sum(len(x) for x in self.ids)
        return {
            "prompt_tokens": prompt,
            "total_tokens": prompt + completion,
            "completion_tokens": completion,
            "prompt_tokens_details": {"cached_tokens": sum(t.cached_tokens for t in tracks)},
        }

    def usage_chunk(self, tracks: Sequence[_Track]) -> dict[str, Any]:
        c = self._base()
        c["choices"] = []
        c["usage"] = self.usage(tracks)
        return c

    def final(self, tracks: Sequence[_Track]) -> dict[str, Any]:
        choices: list[dict[str, Any]] = []
        for i, ids in enumerate(self.ids):
            text = self.tok.decode(ids)
            if self.chat:
                choices.append(
                    {
                        "index": i,
                        "message": {
                            "role": "assistant",
                            "content": text,
                            "reasoning_content": None,
                            "tool_calls": [],
                        },
                        "logprobs": None,
                        "finish_reason": self.reasons[i],
                        "stop_reason": None,
                    }
                )
            else:
                choices.append(
                    {
                        "index": i,
                        "text": text,
                        "logprobs": None,
                        "finish_reason": self.reasons[i],
                        "stop_reason": None,
                        "prompt_logprobs": None,
                    }
                )
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.usage(tracks),
            "system_fingerprint": None,
            "service_tier": None,
            "kv_transfer_params": None,
        }
