"""One simulated vLLM replica: the engine model run in wall-clock time, its KV-event publisher,
metrics and faults. vLLM's HTTP API in front of it is ``http_api`` (which imports this module,
never the other way round); ``start`` serves the app it builds.

(Over 500 lines: the engine loop, lifecycle, faults and the PD hooks share one replica's state.)

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
prompt never holds any engine's steps (``http_api.ReplicaAPI._serve``). A client that goes away
(handler
cancelled, or a failed write) aborts its request in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from collections.abc import Sequence
from typing import Any

import msgspec
import xxhash
from aiohttp import web

from ..model.block_hash import XxhBlockHasher
from ..model.engine import EngineModel
from ..model.structs import EngineConfig, SimRequest, StepOutput
from .config import KV_EVENT_HASHES, ReplicaConfig
from .faults import FaultConfig, Faults
from .metrics import SimMetrics, cache_config_labels
from .nixl import Nixl
from .openai_format import HTTPError
from .prep import SLICE_S, yield_behind_due_steps
from .publisher import KVEventPublisher
from .streams import CUT, Chan, Delta, Track
from .streams import clock as _clock
from .tokenizer import SPECIAL_TOKENS, Tokenizer
from .vllm_hashes import EngineEventHashes, VllmEventHashes

log = logging.getLogger(__name__)

_json_any = msgspec.json.Decoder()
VLLM_VERSION = "0.32.0"
# A late loop pays back at most this much on later steps, so a long stall (GC, a busy host) does
# not turn into a burst of zero-length steps.
MAX_CATCHUP_S = 0.05
# A late engine loop runs due steps back to back for at most this long before it yields.
BURST_S = 0.001
_HASH_SLICE_BLOCKS = 256  # ~0.08 ms; the slice ends after SLICE_S


class ReplicaRuntime:
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
        self.nixl = Nixl(config.role, config.kv_lease_s, config.kv_load_failure_policy)
        self._remote_rids: set[str] = set()  # requests loading their prompt over NIXL
        self.publisher: KVEventPublisher | None = None
        self._tracks: dict[str, Track] = {}
        # When the engine's next step starts, on the engine's clock (None: idle). A request that
        # arrives while the loop is late joins that step, so its arrival is stamped no later.
        self._next_step_at: float | None = None
        # Long preparations run one at a time, in arrival order, across the replicas sharing this
        # lock (a fleet shares one): several long prompts arriving together (the trace's arrivals
        # come in bursts) would otherwise be sliced round robin and all finish last.
        self.prep_lock = prep_lock if prep_lock is not None else asyncio.Lock()
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

    @property
    def load(self) -> int:
        """Engine requests in flight (vLLM's ``/load`` ``server_load``)."""
        return len(self._tracks)

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
    async def start(self, app: web.Application) -> None:
        """Serve ``app`` (``http_api.build_app(self)``), start the publisher and the engine loop."""
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
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
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
        await self.nixl.close()
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
        for timer in self.nixl.leases.values():  # the pinned blocks died with the process
            timer.cancel()
        self.nixl.leases.clear()
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
            tr.queue.put_nowait(CUT)
        self._tracks.clear()

    # -- engine loop -----------------------------------------------------------------------------
    def submit(
        self,
        prompt_ids: Sequence[int],
        max_tokens: int,
        queue: Chan,
        index: int,
        *,
        arrival: float | None = None,
        block_hashes: list[int] | None = None,
        stream_interval: int = 1,
        hold_kv: bool = False,
        remote_tokens: int = 0,
    ) -> Track:
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
                    arrival=now, hold_kv=hold_kv, remote_tokens=remote_tokens,
                ),
                now,
            )  # fmt: skip
        except ValueError as exc:
            raise HTTPError(400, str(exc), param="max_tokens") from exc
        tr = Track(
            rid=rid, index=index, queue=queue, prompt_len=len(prompt_ids), arrival=wall,
            stream_interval=stream_interval,
        )  # fmt: skip
        self._tracks[rid] = tr
        if remote_tokens:
            self._remote_rids.add(rid)
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
                await yield_behind_due_steps()
                t0 = time.perf_counter()
        return out

    def reset_prefix_cache(self) -> bool:
        """Empty the prefix cache; False (nothing done) while blocks are in use."""
        if not self.model.reset_prefix_cache():
            return False
        self._wake.set()
        return True

    def release_kv(self, rid: str) -> None:
        """PD prefill side: the decode side read the blocks, or their lease ran out."""
        self.model.release_kv(rid)

    def abort(self, tr: Track) -> None:
        self._remote_rids.discard(tr.rid)
        if self._tracks.pop(tr.rid, None) is not None and not tr.finished:
            self.model.abort_request(tr.rid)
            self.metrics._success["abort"].inc()
            self._wake.set()

    async def _engine_loop(self) -> None:
        clock = _clock
        deadline = awake_since = clock()
        while not self._stopping:
            if self.faults.config.stuck:
                # A hung engine core: no step, no token, no KV event; /health still answers.
                self.faults.count("stuck")
                await self.faults.until_changed()
                deadline = awake_since = clock()
                continue
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
            duration = out.duration * self.faults.config.slow_factor
            if out.num_scheduled_tokens and self.faults.preempts():
                duration *= 2.0  # a preempted request's KV is recomputed within the step
                self.metrics.on_preemption(1)
            deadline += duration
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

    # Over the complexity limit on purpose: one dispatch over a step's outputs (tokens, finishes, faults) per request kind.
    def _deliver(self, out: StepOutput, now: float, due: float) -> None:  # noqa: C901
        metrics = self.metrics
        for rid, hit in out.cached_tokens.items():
            tr = self._tracks.get(rid)
            if tr is None or tr.scheduled is not None:
                continue
            tr.scheduled = out.start
            tr.cached_tokens = hit.local + hit.external
            metrics.on_scheduled(tr.prompt_len, hit.local, hit.external_queried, hit.external)
            remote = rid in self._remote_rids
            if remote:
                self._remote_rids.discard(rid)
            metrics.pd.on_prompt(tr.prompt_len, hit.local, hit.external, remote)
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
                tr.queue.put_nowait(Delta(tr.index, list(ids), reason, due))
            else:
                held = tr.held
                if held is None:
                    held = tr.held = []
                held += ids
                # vLLM's OutputProcessor: the first output at once, then every stream_interval
                # tokens, and whatever is left when the request finishes.
                if first or reason is not None or len(held) >= tr.stream_interval:
                    tr.held = None
                    tr.queue.put_nowait(Delta(tr.index, held, reason, due))
            if reason is not None:
                self._finish(tr, reason, now)
        for rid, reason in out.finished.items():
            tr = self._tracks.get(rid)
            if tr is not None and not tr.finished:  # finished without a token this step
                held, tr.held = tr.held or [], None
                tr.queue.put_nowait(Delta(tr.index, held, reason, due))
                self._finish(tr, reason, now)

    def _finish(self, tr: Track, reason: str, now: float) -> None:
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
