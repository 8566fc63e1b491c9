"""The pure engine model behind the simulated vLLM engine: one model, two clocks.

Nothing here does I/O, sleeps, reads a clock or touches asyncio. Time is a float in seconds that
the caller passes in:

* **Wall clock** (``engines/sim/server.py``): the server calls ``step(now)``, gets a
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
    .metrics: EngineMetrics (counters + histograms) ; .snapshot() -> MetricsSnapshot
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

KV events are ``router.kv.wire`` structs (the pinned vLLM 0.32 wire shape), ready to encode.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, MutableSequence, Sequence
from dataclasses import dataclass, field

import msgspec
import xxhash

from router.kv.wire import KVEvent

from .block_pool import BlockPool
from .cpu_tier import CpuTier
from .profiles import EngineProfile, get_profile
from .step_time import chunk_attn_pairs, series_bucket_counts

BlockHasher = Callable[[int | None, Sequence[int]], int]
OutputToken = Callable[[str, int], int]

_xxh3 = xxhash.xxh3_64_intdigest
_MASK64 = (1 << 64) - 1


def compact_ints(values: Iterable[int], code: str) -> MutableSequence[int]:
    """``values`` as an ``array(code)`` ('I': token ids, 'Q': 64-bit hashes), or a list when they
    do not fit. Why: a list of n ints is n int objects that the cyclic GC visits one by one
    whenever a collection sees the list (a 100k-token prompt: a few ms of cache misses per
    collection, per copy); an array is one flat buffer the GC never looks at."""
    try:
        return array(code, values)
    except (OverflowError, TypeError):
        return list(values)


def default_output_token(request_id: str, i: int) -> int:
    """Deterministic output token ids (a 32k vocabulary), so replays are reproducible."""
    return _xxh3(request_id.encode(), seed=i) % 32000


def _uint32_bytes(tokens: Sequence[int]) -> bytes | memoryview | None:
    """``tokens`` as uint32 machine bytes (no copy from an ``array('I')``); None if they do not fit."""
    if isinstance(tokens, array) and tokens.typecode == "I":
        return memoryview(tokens).cast("B")
    try:
        return array("I", tokens).tobytes()
    except (OverflowError, TypeError):
        return None


def _block_bytes(tokens: Sequence[int]) -> bytes | memoryview:
    """A block's tokens as the bytes the engine hashes: uint32 machine ints; wider ids (never
    from a real vocabulary) in a tagged int64 or text form that cannot collide with those."""
    raw = _uint32_bytes(tokens)
    if raw is not None:
        return raw
    try:
        return b"\xffq" + array("q", tokens).tobytes()
    except (OverflowError, TypeError):
        return b"\xffr" + ",".join(map(str, tokens)).encode()


class XxhBlockHasher:
    """The engine's block identity: xxh3-64 of a block's token ids, seeded with its parent's
    hash (0 for the first block), so one hash names the whole prefix, like vLLM's chain.

    The engine needs nothing more for its prefix cache, and at ~0.3 us a block it is ~7x cheaper
    than vLLM's pickle + sha256: every prompt block is hashed when its request arrives. vLLM's
    own values, where they are visible (KV events), come from ``publisher.VllmEventHashes``."""

    def __call__(self, parent: int | None, tokens: Sequence[int]) -> int:
        return _xxh3(_block_bytes(tokens), seed=0 if parent is None else parent)

    def chain(
        self, parent: int | None, tokens: Sequence[int], block_size: int, n: int | None = None, first: int = 0
    ) -> list[int]:
        """Hashes of ``n`` full blocks of ``tokens`` from block ``first`` on (default: all the
        rest), chained from ``parent``: exactly ``[h1 := self(parent, block first), ...]``,
        in one loop over one packed buffer."""
        if n is None:
            n = len(tokens) // block_size - first
        raw = _uint32_bytes(tokens[first * block_size : (first + n) * block_size])
        out: list[int] = []
        if raw is None:  # wide ids: block by block, same values
            for j in range(first, first + n):
                parent = self(parent, tokens[j * block_size : (j + 1) * block_size])
                out.append(parent)
            return out
        w = 4 * block_size
        h = 0 if parent is None else parent
        xxh = _xxh3
        for i in range(0, n * w, w):
            h = xxh(raw[i : i + w], h)
            out.append(h)
        return out


default_block_hasher = XxhBlockHasher()


def _synthetic_block_hash(parent: int | None, request_id: str, index: int) -> int:
    seed = ((0 if parent is None else parent) ^ (index * 0x9E3779B97F4A7C15)) & _MASK64
    return _xxh3(b"gen\0" + request_id.encode(), seed=seed)


# -- public structs -----------------------------------------------------------------------------
class EngineConfig(msgspec.Struct, frozen=True):
    """Engine limits. ``num_gpu_blocks`` counts vLLM's null block (usable = num_gpu_blocks - 1)."""

    num_gpu_blocks: int
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    cpu_tier_tokens: int = 0  # 0 disables the CPU tier
    cpu_chunk_tokens: int = 256
    enable_prefix_caching: bool = True
    emit_events: bool = True
    emit_cpu_events: bool = False  # CPU-tier BlockStored/BlockRemoved with medium "CPU"
    profile: str = "tiny"  # step-time profile name (profiles.py), used when none is passed
    time_scale: float = 1.0  # step durations are divided by this

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "cpu_chunk_tokens"):
            v = getattr(self, name)
            if v <= 0:
                raise ValueError(f"invalid {name}: {v} (must be > 0)")
        if self.num_gpu_blocks < 2:
            raise ValueError(f"invalid num_gpu_blocks: {self.num_gpu_blocks} (must be >= 2)")
        if self.time_scale <= 0:
            raise ValueError(f"invalid time_scale: {self.time_scale} (must be > 0)")
        if self.cpu_tier_tokens < 0:
            raise ValueError(f"invalid cpu_tier_tokens: {self.cpu_tier_tokens} (must be >= 0)")

    @classmethod
    def from_profile(
        cls, profile: EngineProfile, block_size: int | None = None, **overrides: object
    ) -> EngineConfig:
        """The profile's capacity and limits, with the KV pool re-counted for ``block_size``.
        Overrides that are None keep the profile's value; unknown names are ignored."""
        bs = block_size or profile.block_size
        base: dict[str, object] = {
            "num_gpu_blocks": profile.num_gpu_blocks(bs),
            "block_size": bs,
            "max_num_seqs": profile.max_num_seqs,
            "max_num_batched_tokens": profile.max_num_batched_tokens,
            "profile": profile.name,
        }
        base.update({k: v for k, v in overrides.items() if v is not None})
        return msgspec.convert(base, cls)


class SimRequest(msgspec.Struct):
    """One request as the engine sees it.

    Give either ``token_ids`` (the server: real prompt ids; the engine then tracks output ids,
    fills ``BlockStored.token_ids`` and, when ``block_hashes`` is None, hashes the prompt's full
    blocks itself with ``block_hasher``) or ``prompt_len`` plus ``block_hashes`` (the simulator:
    engine hashes of the prompt's ``prompt_len // block_size`` full blocks, chained). No EOS is
    ever sampled: a request always runs to ``max_tokens`` (vLLM with ``ignore_eos``)."""

    request_id: str
    max_tokens: int
    prompt_len: int = 0  # 0: len(token_ids)
    block_hashes: Sequence[int] | None = None
    token_ids: Sequence[int] | None = None
    arrival: float = 0.0


class CachedTokens(msgspec.Struct, frozen=True, gc=False):
    """Prefix-cache result of a request's first scheduling, in tokens (vLLM's accounting)."""

    local: int  # GPU prefix-cache hit: whole blocks, at most num_tokens - 1
    external: int  # loaded from the CPU tier beyond the GPU hit
    external_queried: int  # tokens asked of the CPU tier (num_tokens - local); 0 without one


class FinishedRequest(msgspec.Struct, frozen=True, gc=False):
    request_id: str
    finish_reason: str  # "length" (max_tokens reached) or "abort"
    arrival: float
    first_scheduled: float | None
    first_token_time: float | None
    finish_time: float
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int  # -1 when aborted before being scheduled
    num_preemptions: int


class StepOutput(msgspec.Struct, gc=False):
    """What one step did. Everything in it takes effect at ``end = start + duration``."""

    start: float
    end: float
    duration: float  # seconds, already divided by time_scale
    new_tokens: dict[str, list[int]]  # request id -> the one token it produced (not for partial prefills)
    finished: dict[str, str]  # request id -> finish reason ("length"); aborts are not reported here
    finished_requests: list[FinishedRequest]
    cached_tokens: dict[str, CachedTokens]  # requests scheduled for compute for the first time
    events: list[KVEvent]  # this step's batch (vLLM publishes one per step), in order
    num_scheduled_tokens: int
    num_preemptions: int


class AdvanceOutput(msgspec.Struct, gc=False):
    now: float  # the engine is busy until here (>= the last step start, may exceed ``t``)
    steps: int
    finished: list[FinishedRequest]
    event_batches: list[tuple[float, list[KVEvent]]]


class MetricsSnapshot(msgspec.Struct, frozen=True, gc=False):
    """Gauges and counters under vLLM's meaning (``vllm:`` metric names without the prefix)."""

    num_requests_running: int
    num_requests_waiting: int
    kv_cache_usage_perc: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    external_prefix_cache_queries: int
    external_prefix_cache_hits: int
    num_preemptions: int
    prompt_tokens: int
    prompt_tokens_cached: int
    generation_tokens: int
    request_success: int
    cpu_cache_usage_perc: float


# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                           60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip


@dataclass(slots=True)
class Histogram:
    """Prometheus-style histogram: ``counts[i]`` observations in (bounds[i-1], bounds[i]], the
    last slot is +Inf. Not cumulative; the exporter accumulates."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, v: float) -> None:
        self.counts[bisect_left(self.bounds, v)] += 1
        self.sum += v
        self.count += 1

    def observe_series(self, first: float, step: float, n: int) -> None:
        """Observe ``first + j*step`` for j in [0, n) in O(buckets)."""
        if n <= 0:
            return
        cum = series_bucket_counts(first, step, n, self.bounds)
        prev = 0
        for i, c in enumerate(cum):
            self.counts[i] += c - prev
            prev = c
        self.counts[-1] += n - prev
        self.sum += n * first + step * n * (n - 1) / 2
        self.count += n


@dataclass(slots=True)
class EngineMetrics:
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    external_prefix_cache_queries: int = 0
    external_prefix_cache_hits: int = 0
    num_preemptions: int = 0
    prompt_tokens: int = 0
    prompt_tokens_cached: int = 0
    generation_tokens: int = 0
    request_success: int = 0
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    itl: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS))
    queue_time: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS))


# -- internal request state ---------------------------------------------------------------------
class _Req:
    __slots__ = (
        "arrival",
        "blocks",
        "cpu_stored",
        "first_sched",
        "first_token",
        "hashes",
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
        "tokens",
    )

    def __init__(self, req: SimRequest, prompt_len: int, hashes: Sequence[int], arrival: float) -> None:
        self.id = req.request_id
        self.prompt_len = prompt_len
        # Flat arrays, not lists: they live as long as the request (see compact_ints)
        self.hashes = compact_ints(hashes, "Q")
        self.max_tokens = req.max_tokens
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
            )
            if config.cpu_tier_tokens > 0
            else None
        )
        self.metrics = EngineMetrics()
        self.waiting: deque[_Req] = deque()
        self.running: list[_Req] = []
        self.loading: list[_Req] = []
        self._reqs: dict[str, _Req] = {}
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

    def _schedule(self, now: float, out: StepOutput | None) -> dict[_Req, int]:
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
                if looked_up:
                    r.num_external = 0
                    hit = self.pool.find_longest_cache_hit(r.hashes, (ntok - 1) // bs)
                    if cpu is not None:
                        cpu_tokens = min(cpu.lookup(r.hashes) * bs, ntok - 1)
                        ext = max(0, cpu_tokens - len(hit) * bs)
                gpu_hit = len(hit) * bs
                if ext > 0:
                    if not self._allocate(r, 0, hit, ext, delay_cache=True):
                        break
                    self._record_lookup(r, ntok, gpu_hit, ext)
                    waiting.popleft()
                    if r.first_sched is None:
                        r.first_sched = now
                        m.queue_time.observe(now - r.arrival)
                    r.num_computed += gpu_hit + ext
                    r.num_external = ext
                    r.ready_at = now + self.step_model.cpu_load_ms(ext) * self._ms_to_s
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
                            ntok - r.num_computed + r.num_external if cpu is not None else 0,
                        )
                sched[r] = n
                budget -= n
        if out is not None:
            out.num_preemptions = preempted
        return sched

    def _record_lookup(self, r: _Req, ntok: int, gpu_hit: int, ext: int) -> None:
        # vLLM records prefix-cache stats at admission; lookups of preempted requests go to
        # separate "preempted" stats that the Prometheus counters do not include.
        if r.num_preemptions:
            return
        m = self.metrics
        if self.config.enable_prefix_caching:
            m.prefix_cache_queries += ntok
            m.prefix_cache_hits += gpu_hit
        if self.cpu is not None:
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
            r.hashes.append(_synthetic_block_hash(parent, r.id, j))

    def _finish(self, r: _Req, t: float, reason: str) -> FinishedRequest:
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
    def _fast_forward(self, start: float, t: float, out: AdvanceOutput) -> bool:
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
        for b in range(1, self.pool.num_blocks):
            assert self.pool.ref_cnt[b] == held.get(b, 0), f"block {b} ref count"
        assert len(self._reqs) == len(self.running) + len(self.loading) + len(self.waiting)
        assert len(self.running) <= self.config.max_num_seqs
