"""The pure engine model behind the simulated vLLM engine: one model, two clocks.

(Over 500 lines: one scheduler, whose step, schedule and fast-forward share its private state.)

Nothing here does I/O, sleeps, reads a clock or touches asyncio. Time is a float in seconds that
the caller passes in:

* **Wall clock** (``engines/sim/replica/runtime.py``): the server calls ``step(now)``, gets a
  ``StepOutput`` whose ``end = now + duration``, sleeps until ``end``, then delivers the
  step's tokens, finished requests and KV-event batch, and calls ``step(end)`` again while
  ``has_work()``. When a step schedules nothing (``duration == 0``; e.g. every request is
  loading from the CPU tier) it waits for ``next_event_time()`` or a new request.
* **Virtual clock** (``traces/`` offline simulator): ``run_until(t)`` runs every step that
  *starts* before ``t`` and returns what finished; ``add_request(req, t)`` then queues an
  arrival. Decode-only stretches are summed in closed form (see *Fast-forward*), so a replica
  costs O(events), not O(tokens).

Either way the state transition of a step is applied at once: the schedule is made at the step's
start, and its results (tokens, finishes, frees) are stamped with the step's end. Requests added
while a step is "in flight" are scheduled by the next step, as in vLLM.

API (all times in seconds, on the caller's clock)::

    EngineModel(config: EngineConfig, profile: EngineProfile | None = None,
                time_scale: float | None = None, *,  # None: config.profile / config.time_scale
                block_hasher: BlockHasher | None = None, output_token: OutputToken | None = None)
    .add_request(req: SimRequest, now: float | None = None) -> None   # now defaults to req.arrival
    .abort_request(request_id: str, now: float | None = None) -> FinishedRequest | None
    .step(now: float) -> StepOutput
    .run_until(t: float) -> AdvanceOutput
    .has_work() -> bool ; .has_unfinished_requests() -> bool ; .has_pending_events() -> bool
    .next_event_time() -> float | None ; .now -> float (engine busy until)
    .num_running, .num_waiting (incl. CPU loads), .kv_cache_usage -> gauges
    .reset_prefix_cache(reset_cpu: bool = False) -> bool
    .held_blocks(request_id) -> list[int] | None ; .release_kv(request_id) -> bool   # PD prefill
    .metrics: EngineStats (counters + histograms) ; .snapshot() -> MetricsSnapshot
    .check_invariants() -> None

Scheduling (vllm/v1/core/sched/scheduler.py ``schedule``): a per-step token budget
``max_num_batched_tokens``. Running requests first, in admission order: each gets
``min(remaining, budget)`` tokens (1 for a decode, a chunk for a partial prefill). When blocks
run out, the *last* running request is preempted (recompute: its blocks are freed tail first, its
computed tokens reset to 0, generated tokens kept, and it goes back to the *head* of the waiting
queue); a step that preempted admits nobody. Then FCFS admission from the waiting queue while
fewer than ``max_num_seqs`` run and budget remains: prefix-cache lookup (at most
``num_tokens - 1`` tokens, whole blocks: vLLM always recomputes the last token, so 487 prompt
tokens at block 16 hit at most 480), then the CPU tier for the rest; admission stops at the
first request whose blocks do not fit.

CPU tier (optional, ``cpu_tier_tokens > 0``): a hit beyond the GPU hit is loaded
asynchronously: the request holds its blocks, waits ``load_ms = base + per_token * loaded`` (not
slowing other requests' steps), then rejoins the waiting queue head and prefills the rest.

Fast-forward (``run_until`` only): when nothing waits or loads and every running request is
decoding, k steps are applied at once, k being the largest count that (a) starts before ``t``,
(b) finishes no request (the finishing step runs normally), and (c) needs no more new blocks
than are free (so no preemption happens inside the stretch). Step times form an arithmetic
series; token counts, block allocations, caching, generated-block hashes and ITL histogram
observations are applied in bulk with the same results as stepping (tests assert it). The only
difference: KV events of the stretch are published as one batch stamped at its end.

Block hashes: prompt blocks are hashed by the caller (``SimRequest.block_hashes``, full blocks
only). Blocks completed by generated tokens are cached too (vLLM does): with ``token_ids`` given,
output tokens come from ``output_token(request_id, i)`` and the block hash from
``block_hasher(parent, tokens)``; without them (the simulator) a generated block gets a
per-request synthetic hash that never collides with a prompt hash in practice.

PD (NIXL): a request with ``hold_kv`` (prefill side) keeps its blocks pinned after it finishes,
until ``release_kv``; one with ``remote_tokens`` (decode side) loads those tokens past its own hit
over the profile's KV link like a CPU-tier load (``ready_at``), counted as external.

KV events are ``router.kv.wire`` structs (the pinned vLLM 0.32 wire shape), ready to encode.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

import xxhash

from ..wire import KVEvent
from .block_hash import BlockHasher, default_block_hasher, synthetic_block_hash
from .block_pool import BlockPool
from .cpu_tier import CpuTier
from .profiles import EngineProfile, get_profile
from .stats import EngineStats, MetricsSnapshot
from .step_time import chunk_attn_pairs
from .structs import (
    AdvanceOutput,
    CachedTokens,
    EngineConfig,
    FinishedRequest,
    SimRequest,
    StepOutput,
    compact_ints,
)

OutputToken = Callable[[str, int], int]

_xxh3 = xxhash.xxh3_64_intdigest


def default_output_token(request_id: str, i: int) -> int:
    """Deterministic output token ids (a 32k vocabulary), so replays are reproducible."""
    return _xxh3(request_id.encode(), seed=i) % 32000


# -- internal request state ---------------------------------------------------------------------
class _Req:
    __slots__ = (
        "arrival",
        "blocks",
        "cpu_stored",
        "first_sched",
        "first_token",
        "hashes",
        "hold",
        "id",
        "last_token",
        "max_tokens",
        "num_cached_blocks",
        "num_cached_tokens",
        "num_computed",
        "num_external",
        "num_output",
        "num_preemptions",
        "prompt_len",
        "ready_at",
        "remote",
        "retain_s",
        "tokens",
    )

    def __init__(self, req: SimRequest, prompt_len: int, hashes: Sequence[int], arrival: float) -> None:
        self.id = req.request_id
        self.prompt_len = prompt_len
        # Flat arrays, not lists: they live as long as the request (see compact_ints)
        self.hashes = compact_ints(hashes, "Q")
        self.max_tokens = req.max_tokens
        self.retain_s = req.retain_s
        self.tokens = compact_ints(req.token_ids, "I") if req.token_ids is not None else None
        self.arrival = arrival
        self.num_computed = 0
        self.num_output = 0
        self.blocks: list[int] = []
        self.num_cached_blocks = 0  # leading blocks already registered in the prefix cache
        self.num_preemptions = 0
        self.num_external = 0  # tokens loaded from the CPU tier at the last admission
        self.num_cached_tokens = -1  # set when first scheduled for compute (vLLM)
        self.first_sched: float | None = None
        self.first_token: float | None = None
        self.last_token = 0.0
        self.ready_at = 0.0  # CPU-tier load completion
        self.cpu_stored = 0  # prompt blocks already offered to the CPU tier
        self.remote = req.remote_tokens  # PD: tokens to load over the KV link (first admission only)
        self.hold = req.hold_kv  # PD: keep the blocks after finishing, until release_kv()


class EngineModel:
    """See the module docstring for the API and semantics."""

    def __init__(
        self,
        config: EngineConfig,
        profile: EngineProfile | None = None,
        time_scale: float | None = None,
        *,
        block_hasher: BlockHasher | None = None,
        output_token: OutputToken | None = None,
    ) -> None:
        if profile is None:
            profile = get_profile(config.profile)
        if time_scale is None:
            time_scale = config.time_scale
        if time_scale <= 0:
            raise ValueError(f"invalid time_scale: {time_scale} (must be > 0)")
        self.config = config
        self.profile = profile
        self.time_scale = time_scale
        self.step_model = profile.step
        self._ms_to_s = 1.0 / (1000.0 * time_scale)
        self.block_hasher = block_hasher or default_block_hasher
        self.output_token = output_token or default_output_token
        self.pool = BlockPool(
            config.num_gpu_blocks,
            config.block_size,
            enable_caching=config.enable_prefix_caching,
            emit_events=config.emit_events,
        )
        self.cpu: CpuTier | None = (
            CpuTier(
                config.cpu_tier_tokens,
                config.cpu_chunk_tokens,
                config.block_size,
                emit_events=config.emit_events and config.emit_cpu_events,
                save_unfull_chunk=config.cpu_save_unfull_chunk,
            )
            if config.cpu_tier_tokens > 0
            else None
        )
        self.metrics = EngineStats()
        self.waiting: deque[_Req] = deque()
        self.running: list[_Req] = []
        self.loading: list[_Req] = []
        self._reqs: dict[str, _Req] = {}
        # PD prefill side: finished requests' blocks pinned for a decode replica to read.
        self.held: dict[str, list[int]] = {}
        self._t = 0.0  # end of the last step: when the engine can start the next one

    # -- public API ---------------------------------------------------------------------------
    @property
    def now(self) -> float:
        return self._t

    def add_request(self, req: SimRequest, now: float | None = None) -> None:
        """Queue a request (FCFS) at ``now`` (default: ``req.arrival``). Raises ValueError for
        malformed or impossible requests (more KV blocks than the pool holds)."""
        bs = self.config.block_size
        if req.request_id in self._reqs:
            raise ValueError(f"duplicate request_id: {req.request_id!r}")
        prompt_len = req.prompt_len or (len(req.token_ids) if req.token_ids is not None else 0)
        if prompt_len <= 0 or req.max_tokens <= 0:
            raise ValueError(
                f"invalid request {req.request_id!r}: prompt_len {prompt_len}, "
                f"max_tokens {req.max_tokens} (must be > 0)"
            )
        if req.token_ids is not None and len(req.token_ids) != prompt_len:
            raise ValueError(f"invalid token_ids: {len(req.token_ids)} ids for prompt_len {prompt_len}")
        hashes = req.block_hashes
        if hashes is None:
            if req.token_ids is None:
                raise ValueError(f"invalid request {req.request_id!r}: needs block_hashes or token_ids")
            chain = getattr(self.block_hasher, "chain", None)
            if chain is not None:  # the same values, one call (XxhBlockHasher)
                hashes = chain(None, req.token_ids, bs)
            else:
                hashes = []
                parent: int | None = None
                for j in range(prompt_len // bs):
                    parent = self.block_hasher(parent, req.token_ids[j * bs : (j + 1) * bs])
                    hashes.append(parent)
        elif len(hashes) != prompt_len // bs:
            raise ValueError(
                f"invalid block_hashes: {len(hashes)} hashes for {prompt_len} tokens "
                f"(need prompt_len // block_size = {prompt_len // bs})"
            )
        # The last output token is sampled but never computed: its KV needs no slot.
        need = -(-(prompt_len + req.max_tokens - 1) // bs)
        if need > self.config.num_gpu_blocks - 1:
            raise ValueError(
                f"invalid request {req.request_id!r}: needs {need} KV blocks, the pool has "
                f"{self.config.num_gpu_blocks - 1} (prompt_len + max_tokens - 1 exceeds KV capacity)"
            )
        t = req.arrival if now is None else now
        r = _Req(req, prompt_len, hashes, t)
        self._reqs[r.id] = r
        self.waiting.append(r)
        if t > self._t:
            self._t = t

    def abort_request(self, request_id: str, now: float | None = None) -> FinishedRequest | None:
        """Drop a request wherever it is and free its blocks; idempotent (None if unknown).
        Not counted in request_success and not reported by a later step."""
        r = self._reqs.get(request_id)
        if r is None:
            return None
        if r in self.running:
            self.running.remove(r)
        elif r in self.loading:
            self.loading.remove(r)
        else:
            self.waiting.remove(r)
        return self._finish(r, self._t if now is None else now, "abort")

    def held_blocks(self, request_id: str) -> list[int] | None:
        """The block ids a finished ``hold_kv`` request still pins (NIXL ``remote_block_ids``)."""
        return self.held.get(request_id)

    def release_kv(self, request_id: str) -> bool:
        """Unpin a held request's blocks (the decode side read them, or the lease ran out); they
        stay in the prefix cache, evictable. False if nothing was held under that id."""
        blocks = self.held.pop(request_id, None)
        if blocks is None:
            return False
        self.pool.free_blocks(reversed(blocks))
        return True

    # Gauges and predicates for the wall-clock server.
    def has_unfinished_requests(self) -> bool:
        return bool(self._reqs)

    def has_pending_events(self) -> bool:
        """True when KV events (e.g. AllBlocksCleared after a reset) wait for the next step."""
        return bool(self.pool._events) or (self.cpu is not None and bool(self.cpu._events))

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.loading)

    @property
    def kv_cache_usage(self) -> float:
        return self.pool.usage

    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self.loading)

    def next_event_time(self) -> float | None:
        """When the next step can do something: ``now`` if requests wait or run, the earliest
        CPU-load completion if requests only load, None when idle."""
        if self.running or self.waiting:
            return self._t
        if self.loading:
            return max(self._t, min(r.ready_at for r in self.loading))
        return None

    def reset_prefix_cache(self, reset_cpu: bool = False) -> bool:
        """vLLM ``/reset_prefix_cache``: fails (False) while any request holds blocks."""
        ok = self.pool.reset_prefix_cache()
        if ok and reset_cpu and self.cpu is not None:
            self.cpu.clear()
        return ok

    def snapshot(self) -> MetricsSnapshot:
        m = self.metrics
        return MetricsSnapshot(
            num_requests_running=len(self.running),
            num_requests_waiting=len(self.waiting) + len(self.loading),
            kv_cache_usage_perc=self.pool.usage,
            prefix_cache_queries=m.prefix_cache_queries,
            prefix_cache_hits=m.prefix_cache_hits,
            external_prefix_cache_queries=m.external_prefix_cache_queries,
            external_prefix_cache_hits=m.external_prefix_cache_hits,
            num_preemptions=m.num_preemptions,
            prompt_tokens=m.prompt_tokens,
            prompt_tokens_cached=m.prompt_tokens_cached,
            generation_tokens=m.generation_tokens,
            request_success=m.request_success,
            cpu_cache_usage_perc=self.cpu.usage if self.cpu is not None else 0.0,
        )

    def set_slow_factor(self, factor: float) -> None:
        """Every later step takes ``factor`` times its modelled time (a throttled or noisy GPU;
        the offline simulator's ``--slow-replica``). 1 restores the profile's speed."""
        if not factor > 0:
            raise ValueError(f"invalid slow factor: {factor} (must be > 0)")
        self._ms_to_s = factor / (1000.0 * self.time_scale)

    def step(self, now: float) -> StepOutput:
        """Run one engine step starting at ``now``; the engine is busy until ``.end``."""
        out = StepOutput(now, now, 0.0, {}, {}, [], {}, [], 0, 0)
        self._step(now, out.finished_requests, out)
        return out

    def run_until(self, t: float) -> AdvanceOutput:
        """Virtual time: run every step that starts before ``t`` (fast-forwarding decode-only
        stretches). Returns the finished requests and the event batches, in time order."""
        out = AdvanceOutput(self._t, 0, [], [])
        emit = self.config.emit_events
        while True:
            start = self.next_event_time()
            if start is None or start >= t:
                break
            if not self.waiting and not self.loading and self._fast_forward(start, t, out):
                continue
            so = StepOutput(start, start, 0.0, {}, {}, [], {}, [], 0, 0) if emit else None
            scheduled = self._step(start, out.finished, so)
            if scheduled:
                out.steps += 1
                if so is not None and so.events:
                    out.event_batches.append((so.end, so.events))
            elif self.loading:
                # Nothing fit; the only progress possible is a load completing.
                nxt = min(r.ready_at for r in self.loading)
                if nxt <= start:
                    break
                self._t = nxt
            else:
                break
        out.now = self._t
        return out

    # -- scheduling -----------------------------------------------------------------------------
    def _allocate(self, r: _Req, num_new: int, hit: list[int], ext: int, delay_cache: bool = False) -> bool:
        """vLLM ``allocate_slots``: room for ``num_new`` tokens after the computed, hit and
        externally loaded ones, or False (nothing changed) when the free queue is too short."""
        pool = self.pool
        bs = self.config.block_size
        computed = r.num_computed + len(hit) * bs + ext
        need = -(-(computed + num_new) // bs) - len(r.blocks) - len(hit)
        if need < 0:
            need = 0
        if pool.num_pinned:
            pool.release_pins(self._t, need + (pool.num_evictable(hit) if hit else 0))
        if hit:
            if need + pool.num_evictable(hit) > pool.num_free:
                return False
            pool.touch(hit)
            if not r.blocks:
                r.num_cached_blocks = len(hit)
            r.blocks.extend(hit)
        elif need > pool.num_free:
            return False
        if need:
            r.blocks.extend(pool.get_new_blocks(need))
        if not delay_cache:
            ntok = r.prompt_len + r.num_output
            self._cache(r, min(computed + num_new, ntok))
        return True

    def _cache(self, r: _Req, num_tokens: int) -> None:
        num_full = num_tokens // self.config.block_size
        if num_full > r.num_cached_blocks:
            self.pool.cache_full_blocks(r.blocks, r.hashes, r.num_cached_blocks, num_full, r.tokens)
            r.num_cached_blocks = num_full

    def _free(self, r: _Req) -> None:
        self.pool.free_blocks(reversed(r.blocks))
        r.blocks = []
        r.num_cached_blocks = 0

    def _preempt(self, r: _Req) -> None:
        self._free(r)
        r.num_computed = 0
        r.num_preemptions += 1
        self.metrics.num_preemptions += 1
        self.waiting.appendleft(r)

    # Over the complexity limit on purpose: one pass over running then waiting requests under one token and block budget, as
    # vLLM's Scheduler.schedule; split, the budget state would travel through every piece.
    def _schedule(self, now: float, out: StepOutput | None) -> dict[_Req, int]:  # noqa: C901
        cfg = self.config
        bs = cfg.block_size
        m = self.metrics
        budget = cfg.max_num_batched_tokens
        sched: dict[_Req, int] = {}
        if self.loading:
            ready = [r for r in self.loading if r.ready_at <= now]
            if ready:
                for r in ready:
                    self.loading.remove(r)
                    self._cache(r, r.num_computed)  # loaded blocks join the prefix cache
                for r in reversed(ready):
                    self.waiting.appendleft(r)

        running = self.running
        preempted = 0
        i = 0
        while i < len(running) and budget > 0:
            r = running[i]
            n = min(r.prompt_len + r.num_output - r.num_computed, budget)
            ok = True
            while not self._allocate(r, n, [], 0):
                victim = running.pop()
                if victim in sched:
                    budget += sched.pop(victim)
                self._preempt(victim)
                preempted += 1
                if victim is r:
                    ok = False
                    break
            if not ok:
                break
            sched[r] = n
            budget -= n
            i += 1

        if not preempted:
            waiting = self.waiting
            cpu = self.cpu
            while waiting and budget > 0 and len(running) < cfg.max_num_seqs:
                r = waiting[0]
                ntok = r.prompt_len + r.num_output
                hit: list[int] = []
                ext = 0
                looked_up = r.num_computed == 0
                remote = 0
                if looked_up:
                    r.num_external = 0
                    hit = self.pool.find_longest_cache_hit(r.hashes, (ntok - 1) // bs)
                    if r.remote:
                        # NIXL: D asks P for everything past its own hit; the last token is
                        # recomputed for its logits (vLLM caps a full load at num_tokens - 1).
                        remote = ext = max(0, min(r.remote, ntok - 1) - len(hit) * bs)
                        r.remote = 0  # a preempted request recomputes: the lease is gone
                    elif cpu is not None:
                        cpu_tokens = min(cpu.lookup(r.hashes) * bs, ntok - 1)
                        ext = max(0, cpu_tokens - len(hit) * bs)
                gpu_hit = len(hit) * bs
                if ext > 0:
                    if not self._allocate(r, 0, hit, ext, delay_cache=True):
                        break
                    self._record_lookup(r, ntok, gpu_hit, ext, bool(remote))
                    waiting.popleft()
                    if r.first_sched is None:
                        r.first_sched = now
                        m.queue_time.observe(now - r.arrival)
                    r.num_computed += gpu_hit + ext
                    r.num_external = ext
                    load_ms = (
                        self.profile.kv_link.transfer_ms(ext) if remote else self.step_model.cpu_load_ms(ext)
                    )
                    r.ready_at = now + load_ms * self._ms_to_s
                    self.loading.append(r)
                    continue
                n = min(ntok - r.num_computed - gpu_hit, budget)
                if not self._allocate(r, n, hit, 0):
                    break
                if looked_up:
                    self._record_lookup(r, ntok, gpu_hit, 0)
                waiting.popleft()
                running.append(r)
                r.num_computed += gpu_hit
                if r.first_sched is None:
                    r.first_sched = now
                    m.queue_time.observe(now - r.arrival)
                if r.num_cached_tokens < 0:
                    r.num_cached_tokens = r.num_computed
                    if out is not None:
                        out.cached_tokens[r.id] = CachedTokens(
                            r.num_computed - r.num_external,
                            r.num_external,
                            ntok - r.num_computed + r.num_external
                            if cpu is not None or r.num_external
                            else 0,
                        )
                sched[r] = n
                budget -= n
        if out is not None:
            out.num_preemptions = preempted
        return sched

    def _record_lookup(self, r: _Req, ntok: int, gpu_hit: int, ext: int, remote: bool = False) -> None:
        # vLLM records prefix-cache stats at admission; lookups of preempted requests go to
        # separate "preempted" stats that the Prometheus counters do not include.
        if r.num_preemptions:
            return
        m = self.metrics
        if self.config.enable_prefix_caching:
            m.prefix_cache_queries += ntok
            m.prefix_cache_hits += gpu_hit
        if self.cpu is not None or remote:
            m.external_prefix_cache_queries += ntok - gpu_hit
            m.external_prefix_cache_hits += ext

    # -- one step -------------------------------------------------------------------------------
    def _step(self, now: float, finished: list[FinishedRequest], out: StepOutput | None) -> bool:
        sched = self._schedule(now, out)
        if not sched:
            if out is not None:
                out.events = self._take_events()
            return False
        bs = self.config.block_size
        prefill = 0
        pairs = 0.0
        num_decode = 0
        ctx = 0
        for r, n in sched.items():
            ntok = r.prompt_len + r.num_output
            if n == 1 and r.num_output > 0 and r.num_computed + 1 == ntok:
                num_decode += 1
                ctx += ntok
            else:
                prefill += n
                pairs += chunk_attn_pairs(n, r.num_computed)
        dur = self.step_model.step_ms(prefill, pairs, num_decode, ctx) * self._ms_to_s
        end = now + dur
        m = self.metrics
        cpu = self.cpu
        tracked_out = out is not None
        for r, n in sched.items():
            r.num_computed += n
            ntok = r.prompt_len + r.num_output
            if cpu is not None and r.cpu_stored < r.prompt_len // bs:
                done = min(r.num_computed, r.prompt_len)
                r.cpu_stored = cpu.store(r.hashes, r.cpu_stored, done // bs, done == r.prompt_len)
            if r.num_computed < ntok:
                continue  # a non-final prefill chunk samples nothing
            tok = self._append_token(r)
            m.generation_tokens += 1
            first = r.first_token is None
            if first:
                r.first_token = end
                m.ttft.observe(end - r.arrival)
                m.prompt_tokens += r.prompt_len
                m.prompt_tokens_cached += max(r.num_cached_tokens, 0)
            else:
                m.itl.observe(end - r.last_token)
            r.last_token = end
            done_req = r.num_output >= r.max_tokens
            if tracked_out:
                assert out is not None
                out.new_tokens[r.id] = [tok if tok >= 0 else self.output_token(r.id, r.num_output - 1)]
                if done_req:
                    out.finished[r.id] = "length"
            if done_req:
                self.running.remove(r)
                finished.append(self._finish(r, end, "length"))
        self._t = end
        if out is not None:
            out.end = end
            out.duration = dur
            out.num_scheduled_tokens = sum(sched.values())
            out.events = self._take_events()
        return True

    def _append_token(self, r: _Req) -> int:
        """Sample one output token; hash the block it completes. Returns the id or -1."""
        i = r.num_output
        r.num_output += 1
        tok = -1
        if r.tokens is not None:
            tok = self.output_token(r.id, i)
            r.tokens.append(tok)
        ntok = r.prompt_len + r.num_output
        bs = self.config.block_size
        if ntok % bs == 0:
            self._hash_block(r, ntok // bs - 1)
        return tok

    def _hash_block(self, r: _Req, j: int) -> None:
        assert j == len(r.hashes)
        bs = self.config.block_size
        parent = r.hashes[j - 1] if j > 0 else None
        if r.tokens is not None:
            r.hashes.append(self.block_hasher(parent, r.tokens[j * bs : (j + 1) * bs]))
        else:
            r.hashes.append(synthetic_block_hash(parent, r.id, j))

    def _finish(self, r: _Req, t: float, reason: str) -> FinishedRequest:
        if r.hold and reason != "abort":
            self.held[r.id] = r.blocks  # pinned (still referenced) until release_kv()
            r.blocks = []
        elif r.retain_s > 0 and reason != "abort" and r.blocks:
            self.pool.pin(list(reversed(r.blocks)), t + r.retain_s)  # retention across a tool pause
            r.blocks = []
            r.num_cached_blocks = 0
        else:
            self._free(r)
        del self._reqs[r.id]
        if reason != "abort":
            self.metrics.request_success += 1
            self.metrics.e2e.observe(t - r.arrival)
        return FinishedRequest(
            request_id=r.id,
            finish_reason=reason,
            arrival=r.arrival,
            first_scheduled=r.first_sched,
            first_token_time=r.first_token,
            finish_time=t,
            prompt_tokens=r.prompt_len,
            output_tokens=r.num_output,
            cached_tokens=r.num_cached_tokens,
            num_preemptions=r.num_preemptions,
        )

    def _take_events(self) -> list[KVEvent]:
        ev = self.pool.take_events()
        if self.cpu is not None and self.cpu.emit_events:
            ev.extend(self.cpu.take_events())
        return ev

    # -- fast-forward ---------------------------------------------------------------------------
    # Over the complexity limit on purpose: the skip is valid only while every guard holds; the guards read best in one place.
    def _fast_forward(self, start: float, t: float, out: AdvanceOutput) -> bool:  # noqa: C901
        """Apply k >= 2 decode-only steps at once (see module docstring). False if not possible."""
        running = self.running
        if not running:
            return False
        bs = self.config.block_size
        ctx0 = 0
        k_fin = 1 << 62
        for r in running:
            ntok = r.prompt_len + r.num_output
            if r.num_output == 0 or r.num_computed + 1 != ntok:
                return False
            ctx0 += ntok
            left = r.max_tokens - r.num_output
            if left < k_fin:
                k_fin = left
        B = len(running)
        sm = self.step_model
        k = sm.steps_starting_before((t - start) / self._ms_to_s, B, ctx0, k_fin - 1)
        if k < 2:
            return False
        if self._blocks_needed(k) > self.pool.num_free:
            lo, hi = 1, k - 1
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if self._blocks_needed(mid) <= self.pool.num_free:
                    lo = mid
                else:
                    hi = mid - 1
            k = lo
            if k < 2:
                return False
        to_s = self._ms_to_s
        t0 = sm.step_ms(0, 0.0, B, ctx0) * to_s
        delta = sm.e_ms * B * to_s
        end = start + sm.decode_stretch_ms(k, B, ctx0) * to_s
        itl = self.metrics.itl
        pool = self.pool
        for r in running:
            ntok = r.prompt_len + r.num_output
            nb = -(-(ntok + k - 1) // bs) - len(r.blocks)
            if nb > 0:
                r.blocks.extend(pool.get_new_blocks(nb))
            if r.tokens is not None:
                for j in range(k):
                    r.tokens.append(self.output_token(r.id, r.num_output + j))
            r.num_output += k
            r.num_computed += k
            for j in range(ntok // bs, (ntok + k) // bs):
                self._hash_block(r, j)
            self._cache(r, r.num_computed)
            itl.observe(start + t0 - r.last_token)
            itl.observe_series(t0 + delta, delta, k - 1)
            r.last_token = end
        self.metrics.generation_tokens += B * k
        self._t = end
        out.steps += k
        if self.config.emit_events:
            ev = self._take_events()
            if ev:
                out.event_batches.append((end, ev))
        return True

    def _blocks_needed(self, k: int) -> int:
        bs = self.config.block_size
        need = 0
        for r in self.running:
            nb = -(-(r.prompt_len + r.num_output + k - 1) // bs) - len(r.blocks)
            if nb > 0:
                need += nb
        return need

    def check_invariants(self) -> None:
        """Recount block ownership and queue membership against the pool."""
        self.pool.check_invariants()
        if self.cpu is not None:
            self.cpu.check_invariants()
        held: dict[int, int] = {}
        for r in (*self.running, *self.loading, *self.waiting):
            for b in r.blocks:
                held[b] = held.get(b, 0) + 1
            assert len(r.hashes) == (r.prompt_len + r.num_output) // self.config.block_size
        for blocks in self.held.values():
            for b in blocks:
                held[b] = held.get(b, 0) + 1
        for b in range(1, self.pool.num_blocks):
            assert self.pool.ref_cnt[b] == held.get(b, 0), f"block {b} ref count"
        assert len(self._reqs) == len(self.running) + len(self.loading) + len(self.waiting)
        assert len(self.running) <= self.config.max_num_seqs
