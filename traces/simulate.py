"""Offline simulation: kvrouter's real ``Router`` and policies over the real engine model, in virtual time.

(Over 500 lines: one event loop whose fleet state the slow-replica and outlier hooks share; the CLI
handler and table are in simulate_cli.py, prefill/decode pools in pd_simulate.py.)

No sockets, no threads, no wall clock. One discrete-event loop drives a fleet of
``engines.sim.model.engine.EngineModel`` replicas and one ``router.routing.Router``:

* **Arrivals** at ``timestamp_s / speedup``. Before a request is routed at time ``t`` every busy
  engine is advanced to ``t`` (``run_until(t)``: decode-only stretches are fast-forwarded in
  closed form, so a replica costs O(events), not O(tokens)), and every callback that happened at
  or before ``t`` has been delivered. The router therefore sees exactly what it would see live:
* **Dispatch-time load**: ``Router.dispatch`` counts in-flight and pending prefill tokens at once.
* **First token / finish** callbacks at their virtual times (``Router.first_token`` with the real
  TTFT, so the per-replica prefill-rate EWMA and the tail-latency window learn as they do live;
  ``Router.finish`` with the engine's ``cached_tokens``).
* **Scrapes**: every ``scrape_interval_s`` the engines' running / waiting / KV-usage gauges are
  copied into the replicas, as the live ``/metrics`` scraper does (0.25 s by default).
* **KV events** (``kv_events=True``): each step's ``BlockStored`` / ``BlockRemoved`` /
  ``AllBlocksCleared`` batch is applied to the index at the step's end time. Off: the index holds
  the router's own speculation only (the approximate TTL, as for a replica without events).

Block identity: the trace's ids are already chained prefix hashes (Mooncake, our generators), so
they are used *as is* as the router's block hashes and as the engine's block hashes, with
``block_size = trace.block_tokens`` on both sides (the router's model-name seed is not applied to
precomputed hashes, so both sides agree by construction). The engine's KV pool is the profile's
capacity in tokens re-counted in those blocks. Only full blocks are hashed (vLLM): a partial last
block is never a hit, which the token-weighted oracle (``traces.stats.oracle_hit_ratio``) does
count, so the oracle is a slightly generous upper bound.

Event ordering: an engine step's effects (tokens, finishes, KV events) are stamped with the step's
end. ``run_until(t)`` runs every step that *starts* before ``t``, so the last step of an advance
may end after ``t``; its callbacks wait in a heap and are delivered (with the clock set to their
time) before the first routing decision at or after it. Per replica, step ends are monotonic, so a
replica's callbacks are always delivered in order.

Complexity per request: one router decision (O(replicas) scorers + one index match), one engine
``add_request``, plus one ``run_until`` per busy replica per arrival. At 256 replicas the latter
dominates; see docs/offline-simulator.md for measured rates.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from engines.sim.model.engine import EngineModel
from engines.sim.model.profiles import EngineProfile, get_profile
from engines.sim.model.stats import ITL_BUCKETS, Histogram
from engines.sim.model.structs import EngineConfig, SimRequest
from router.config import OutlierSettings
from router.index import PrefixIndex
from router.kv.apply import IDENTITY_KEYS, apply_batch
from router.kv.wire import KVEvent
from router.replicas.outliers import OutlierDetector
from router.replicas.registry import Replica, ReplicaRegistry
from router.routing import Router, Ticket
from router.scoring.policies import POLICIES, Policy, build_policy
from router.sessions.tracker import SessionTracker
from router.types import BlockHash, ReplicaId, ReplicaSpec, Tier

from .closed_loop import DEFAULT_DECODE_TPS, ArrivalQueue, ClosedLoop, session_completion
from .model import Trace, TraceRequest
from .records import SLO, RequestRecord, summarize
from .stats import oracle_hit_ratio

MODEL = "sim"  # every simulated replica serves one model
OUTLIER_POLICIES = POLICIES  # kvrouter's own (live, the detector runs under every policy)

# A policy factory builds a fresh policy for each run: (rng, clock) -> Policy. Peer emulations
# and sweep prototypes need the virtual clock (e.g. SGLang's periodic tree eviction).
PolicyFactory = Callable[[random.Random, Callable[[], float]], Policy]


class SimConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Everything that defines a simulated fleet and how the trace is played against it."""

    replicas: int = 8
    profile: str = "h100-llama3-8b"
    speedup: float = 1.0  # arrivals at timestamp_s / speedup
    max_requests: int | None = None  # first N requests of the trace
    duration_s: float | None = None  # only requests arriving in the first S simulated seconds
    kv_events: bool = True
    scrape_interval_s: float = 0.25
    seed: int = 0
    time_scale: float = 1.0  # engine step durations are divided by this (faster GPUs)
    cpu_tier_tokens: int = 0  # per-replica CPU (LMCache) tier; 0 = none
    cpu_events: bool = (
        True  # the CPU tier publishes its events (LMCache lmcache_driven); off: GPU-only routing
    )
    num_gpu_blocks: int | None = None  # GPU KV blocks per replica; None = the profile's
    speculative_ttl_s: float = 30.0  # router speculation TTL with KV events (Router default)
    weights: dict[str, float] = {}  # cache_aware weight overrides
    load_factor: float | None = None  # cache_aware bounded-load factor; None = router default
    slo_ttft_s: float = 2.0  # goodput SLO (records.SLO)
    slo_tpot_s: float = 0.1
    # > 0: a session's turn that is not its last keeps its KV pinned this long after it finishes
    # (engines/sim BlockPool.pin: a model of router-requested retention; docs/sessions.md).
    retain_s: float = 0.0
    infer_sessions: bool = False  # infer session continuity from the prefix for requests without an id
    # Closed loop (traces/closed_loop.py): a session's turn is sent when its previous turn (and any
    # sub-agents it spawned) finished, plus the tool pause the trace put between them; off: every
    # request at its trace time. ``decode_tps``: the decode speed the trace's timestamps assumed
    # (None: the trace's metadata, else the generators' 50 tokens/s).
    closed_loop: bool = False
    decode_tps: float | None = None
    # One sick replica (docs/reliability.md): engine ``slow_replica`` runs ``slow_factor`` times
    # slower from ``slow_window[0]`` to ``slow_window[1]`` simulated seconds.
    slow_replica: int | None = None
    slow_factor: float = 1.0
    slow_window: tuple[float, float] = (0.0, math.inf)
    # The live router's outlier detector (router/replicas/outliers.py) on kvrouter's policies;
    # peer emulations run without it, as the peers do.
    outliers: bool = False
    # A heterogeneous fleet: one profile name per replica (``replicas`` must equal its length).
    fleet: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.fleet and len(self.fleet) != self.replicas:
            raise ValueError(f"fleet names {len(self.fleet)} profiles for {self.replicas} replicas")
        if self.replicas < 1:
            raise ValueError(f"invalid replicas: {self.replicas} (must be >= 1)")
        if not self.speedup > 0:
            raise ValueError(f"invalid speedup: {self.speedup} (must be > 0)")
        if not self.scrape_interval_s > 0:
            raise ValueError(f"invalid scrape_interval_s: {self.scrape_interval_s} (must be > 0)")
        if self.decode_tps is not None and not self.decode_tps > 0:
            raise ValueError(f"invalid decode_tps: {self.decode_tps} (must be > 0)")
        if self.max_requests is not None and self.max_requests < 1:
            raise ValueError(f"invalid max_requests: {self.max_requests} (must be >= 1)")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"invalid duration_s: {self.duration_s} (must be > 0)")
        if self.slow_replica is not None and not 0 <= self.slow_replica < self.replicas:
            raise ValueError(f"invalid slow_replica: {self.slow_replica} (must be in [0, {self.replicas}))")
        if not self.slow_factor > 0:
            raise ValueError(f"invalid slow_factor: {self.slow_factor} (must be > 0)")
        if not self.slow_window[0] < self.slow_window[1]:
            raise ValueError(f"invalid slow_window: {self.slow_window} (START must be < END)")


@dataclass(slots=True)
class PolicyRun:
    """One policy's run: per-request records, the shared summary, and simulator counters."""

    name: str
    records: list[RequestRecord]
    summary: dict[str, Any]
    wall_s: float
    sim_end_s: float  # virtual time when the last request finished
    engine_steps: int
    preemptions: int
    kv_events_applied: int
    extra: dict[str, Any] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        out = dict(self.summary)
        out.update(
            {
                "wall_s": self.wall_s,
                "wall_rps": len(self.records) / self.wall_s if self.wall_s > 0 else math.nan,
                "sim_end_s": self.sim_end_s,
                "engine_steps": self.engine_steps,
                "preemptions": self.preemptions,
                "kv_events_applied": self.kv_events_applied,
            }
        )
        out.update(self.extra)
        return out


class _UnrecordedHistogram(Histogram):
    """Drops observations. The simulator reads its latencies from the finished requests, and the
    per-token ITL histogram was the largest single cost of a decode fast-forward (profiled)."""

    def observe(self, v: float) -> None:
        return None

    def observe_series(self, first: float, step: float, n: int) -> None:
        return None


class VirtualClock:
    """The one clock the router, the index and the peer policies read: set by the event loop."""

    __slots__ = ("t",)

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def select_requests(trace: Trace, cfg: SimConfig) -> tuple[TraceRequest, ...]:
    """The requests a run plays: the first ``max_requests``, arriving within ``duration_s``."""
    reqs = trace.requests
    if cfg.max_requests is not None:
        reqs = reqs[: cfg.max_requests]
    if cfg.duration_s is not None:
        limit = cfg.duration_s * cfg.speedup  # in trace seconds
        t0 = reqs[0].timestamp_s if reqs else 0.0
        reqs = tuple(r for r in reqs if r.timestamp_s - t0 < limit)
    return reqs


def fleet_blocks(profile: EngineProfile, block_tokens: int) -> int:
    """Usable KV blocks of one replica in the trace's block unit."""
    return profile.kv_capacity_tokens // block_tokens


def fleet_profiles(cfg: SimConfig) -> list[EngineProfile]:
    """One profile per replica: ``cfg.fleet`` when given, else ``replicas`` x ``profile``."""
    return [get_profile(n) for n in cfg.fleet] if cfg.fleet else [get_profile(cfg.profile)] * cfg.replicas


def policy_factory(name: str, cfg: SimConfig) -> PolicyFactory:
    """Router policies by name (with the config's weight/load-factor overrides), else a peer."""
    if name in POLICIES:
        overrides: dict[str, Any] = {}
        if cfg.load_factor is not None:
            overrides["load_factor"] = cfg.load_factor

        def make(rng: random.Random, clock: Callable[[], float]) -> Policy:
            return build_policy(name, rng=rng, weights=dict(cfg.weights), **overrides)

        return make
    from .peer_policies import PEER_POLICIES

    if name in PEER_POLICIES:
        peer = PEER_POLICIES[name]
        return lambda rng, clock: peer(rng, clock)
    known = ", ".join([*POLICIES, *sorted(PEER_POLICIES)])
    raise ValueError(f"unknown policy {name!r}; known: {known}")


def known_policies() -> list[str]:
    from .peer_policies import PEER_POLICIES

    return [*POLICIES, *sorted(PEER_POLICIES)]


# Closed loop: time step while engines run (a released turn is late by at most this; ~1 decode step).
CLOSED_LOOP_STEP_S = 0.02


def trace_decode_tps(trace: Trace) -> float:
    """The decode speed a generated trace assumed to space its turns (its metadata), else 50."""
    v = trace.meta.get("decode_tps")
    return (
        float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 else DEFAULT_DECODE_TPS
    )


# Callback kinds in the pending heap; at equal times, KV events land first (the engine publishes
# a step's batch as the step ends, before the HTTP layer streams the token).
_KV, _FIRST, _FINISH = 0, 1, 2


class _Fleet:
    """One run's state: engines, replicas, the router and the pending-callback heap."""

    def __init__(
        self,
        trace: Trace,
        cfg: SimConfig,
        make_policy: PolicyFactory,
        rng: random.Random,
        outliers: bool = False,
        clock: VirtualClock | None = None,
        roles: Sequence[str] = (),  # PD runs: replica i's role (default both)
    ) -> None:
        bs = trace.block_tokens
        if bs <= 0:
            raise ValueError(f"trace {trace.name!r} has no block ids (block_tokens=0): nothing to simulate")
        self.bs = bs
        self.cfg = cfg
        self.clock = clock or VirtualClock()
        profiles = fleet_profiles(cfg)
        self.profile = profiles[0]
        self.policy = make_policy(rng, self.clock)
        # Events only matter to a policy that reads the index; the others skip their cost.
        self.use_events = cfg.kv_events and bool(self.policy.needs_match)
        econfs = [
            EngineConfig.from_profile(
                profile,
                block_size=bs,
                emit_events=self.use_events,
                cpu_tier_tokens=cfg.cpu_tier_tokens or None,
                emit_cpu_events=cfg.cpu_events and bool(cfg.cpu_tier_tokens),
                num_gpu_blocks=cfg.num_gpu_blocks,
                time_scale=cfg.time_scale,
            )
            for profile in profiles
        ]
        self.capacity_blocks = max(e.num_gpu_blocks for e in econfs) - 1
        self.index = PrefixIndex(
            capacity_per_replica=self.capacity_blocks,
            speculative_ttl_s=cfg.speculative_ttl_s,
            clock=self.clock,
        )
        self.registry = ReplicaRegistry(self.index)
        self.outliers: OutlierDetector | None = None
        if outliers:
            self.outliers = OutlierDetector(
                OutlierSettings(), self.registry, self.clock, random.Random(cfg.seed)
            )
        self.router = Router(
            self.index,
            self.registry,
            self.policy,
            block_size=bs,
            speculative_ttl_s=cfg.speculative_ttl_s,
            clock=self.clock,
            sessions=SessionTracker(infer=cfg.infer_sessions),
            outliers=self.outliers,
        )
        self.engines: list[EngineModel] = []
        self.replicas: list[Replica] = []
        for i, (profile, econf) in enumerate(zip(profiles, econfs, strict=True)):
            role = roles[i] if i < len(roles) else "both"
            rep = self.registry.add(
                ReplicaSpec(url=f"sim://replica-{i}", name=f"r{i}", models=(MODEL,), role=role)
            )
            self.index.set_capacity(rep.id, econf.num_gpu_blocks - 1)
            rep.has_kv_events = cfg.kv_events
            rep.block_size = bs
            rep.num_gpu_blocks = econf.num_gpu_blocks
            if cfg.cpu_tier_tokens:  # the index bounds the CPU tier by its own size, not the GPU's
                self.index.set_capacity(rep.id, max(1, cfg.cpu_tier_tokens // bs), Tier.CPU)
            self.registry.set_healthy(rep, True)
            self.replicas.append(rep)
            eng = EngineModel(econf, profile)
            eng.metrics.itl = _UnrecordedHistogram(ITL_BUCKETS)
            self.engines.append(eng)
        self.rid_to_idx = {r.id: i for i, r in enumerate(self.replicas)}
        self.busy: set[int] = set()
        # Per replica: request id -> ticket, for requests whose first token is not known yet.
        self.awaiting: list[dict[str, Ticket]] = [{} for _ in range(cfg.replicas)]
        self.tickets: dict[str, Ticket] = {}
        self.heap: list[tuple[float, int, int, int, Any]] = []
        self.seq = 0
        self.kv_events_applied = 0
        self.steps = 0
        self.records: dict[str, RequestRecord] = {}
        self.trace = trace
        # Closed loop: told of every finished (or failed) request, to release what waits for it.
        self.on_done: Callable[[str, float], None] | None = None
        self._finishes: list[float] = []  # closed loop: times of finishes not delivered yet
        self._t0 = 0.0
        self._last_tick = -1
        self._edges: list[tuple[float, float]] = []
        self._next_eval = 0.0
        self._last_turn: dict[str, str] = {}

    # ---- engine side ----------------------------------------------------------------------

    def advance(self, i: int, t: float) -> None:
        """Run engine ``i`` up to ``t``; apply callbacks at or before ``t``, queue later ones."""
        eng = self.engines[i]
        out = eng.run_until(t)
        if not out.steps:
            if not eng.has_work():
                self.busy.discard(i)
            return
        self.steps += out.steps
        for ts, events in out.event_batches:
            self._emit(ts, _KV, i, events, t)
        awaiting = self.awaiting[i]
        if awaiting:
            # Workaround (reported): run_until reports finishes but not first tokens of requests
            # still running, so read the engine's per-request first-token stamp.
            reqs = eng._reqs
            done = []
            for rid, ticket in awaiting.items():
                r = reqs.get(rid)
                if r is None:
                    continue  # finished within this advance: handled with the finish below
                ft = r.first_token
                if ft is not None:
                    done.append(rid)
                    self._emit(ft, _FIRST, i, ticket, t)
            for rid in done:
                del awaiting[rid]
        for f in out.finished:
            pending = awaiting.pop(f.request_id, None)
            if pending is not None and f.first_token_time is not None:
                self._emit(f.first_token_time, _FIRST, i, pending, t)
            self._emit(f.finish_time, _FINISH, i, f, t)
        if not eng.has_work():
            self.busy.discard(i)

    def _emit(self, ts: float, kind: int, i: int, payload: Any, now: float) -> None:
        if ts <= now:
            self._deliver(ts, kind, i, payload)
        else:
            self.seq += 1
            heapq.heappush(self.heap, (ts, kind, self.seq, i, payload))
            if kind == _FINISH and self.on_done is not None:
                heapq.heappush(self._finishes, ts)

    def _next_finish(self, now: float) -> float:
        """Closed loop: no request finishes before this. Finishes already computed (waiting in the
        callback heap) are exact; an unfinished request needs at least its remaining output
        tokens in steps, each at least the profile's fixed step cost, after its engine's clock."""
        fin = self._finishes
        while fin and fin[0] <= now:
            heapq.heappop(fin)
        lo = fin[0] if fin else math.inf
        for i in self.busy:
            eng = self.engines[i]
            step = eng.step_model.step_ms(0, 0.0, 0, 0) * eng._ms_to_s
            if step <= 0:
                return now
            left = min(
                (r.max_tokens - r.num_output for q in (eng.running, eng.waiting, eng.loading) for r in q),
                default=0,
            )
            if left > 0:
                lo = min(lo, max(eng.now, now) + left * step)
        return lo

    def deliver_until(self, t: float) -> None:
        heap = self.heap
        while heap and heap[0][0] <= t:
            ts, kind, _seq, i, payload = heapq.heappop(heap)
            self._deliver(ts, kind, i, payload)

    def _deliver(self, ts: float, kind: int, i: int, payload: Any) -> None:
        # The router and index read the clock: stamp the callback with its own time, then leave the
        # clock at the later of that and where it was (late deliveries never move time backwards).
        clock = self.clock
        saved = clock.t
        clock.t = ts
        if kind == _KV:
            self._apply_events(self.replicas[i].id, payload)
        elif kind == _FIRST:
            ticket: Ticket = payload
            self.router.first_token(ticket, ts - ticket.dispatched_at)
        else:
            f = payload
            ticket = self.tickets.pop(f.request_id)
            if self.outliers is not None:
                if f.first_token_time is not None and f.output_tokens > 1:
                    self.router.observe_itl(
                        ticket, (f.finish_time - f.first_token_time) / (f.output_tokens - 1)
                    )
                self.outliers.record_success(ticket.replica)
            self.router.finish(ticket, True, f.cached_tokens)
            rec = self.records[f.request_id]
            rec.output_tokens = f.output_tokens
            rec.cached_tokens = max(f.cached_tokens, 0)
            if f.first_token_time is not None:
                rec.ttft_s = f.first_token_time - f.arrival
            rec.e2e_s = f.finish_time - f.arrival
            if self.on_done is not None:
                self.on_done(f.request_id, ts)
        clock.t = saved if saved > ts else ts

    def _apply_events(self, rid: ReplicaId, events: Sequence[KVEvent]) -> None:
        # The live router's applier; the simulated engines publish router keys already.
        apply_batch(self.index, rid, events, IDENTITY_KEYS)
        self.kv_events_applied += len(events)

    def advance_all(self, t: float) -> None:
        self.deliver_until(t)
        for i in list(self.busy):
            if self.engines[i].now < t:
                self.advance(i, t)
        self.deliver_until(t)

    def scrape(self) -> None:
        for rep, eng in zip(self.replicas, self.engines, strict=True):
            rep.engine_running = float(eng.num_running)
            rep.engine_waiting = float(eng.num_waiting)
            rep.kv_usage = eng.kv_cache_usage
            rep.metrics_ok = True
            if self.outliers is not None:
                self.outliers.observe_engine(
                    rep, float(eng.metrics.num_preemptions), eng.kv_cache_usage, None
                )

    def _slow_edges(self) -> list[tuple[float, float]]:
        """(time, factor) changes of the slow replica, in order."""
        cfg = self.cfg
        if cfg.slow_replica is None or cfg.slow_factor == 1.0:
            return []
        return [(cfg.slow_window[0], cfg.slow_factor), (cfg.slow_window[1], 1.0)]

    def _ticks(self, t: float, edges: list[tuple[float, float]], next_eval: float) -> float:
        """Slow-window edges and outlier evaluations due up to ``t``, in time order."""
        while True:
            due_edge = edges[0][0] if edges else math.inf
            due_eval = next_eval if self.outliers is not None else math.inf
            at = min(due_edge, due_eval)
            if at > t:
                return next_eval
            self.advance_all(at)
            self.clock.t = max(self.clock.t, at)
            if due_edge <= due_eval:
                _, factor = edges.pop(0)
                assert self.cfg.slow_replica is not None
                self.engines[self.cfg.slow_replica].set_slow_factor(factor)
            else:
                assert self.outliers is not None
                self.outliers.evaluate()
                next_eval += self.outliers.cfg.interval_s

    # ---- the run --------------------------------------------------------------------------

    def run(
        self, reqs: Sequence[TraceRequest], name: str, on_route: Callable[[TraceRequest], None] | None
    ) -> None:
        self._t0 = reqs[0].timestamp_s if reqs else 0.0
        self._last_tick = -1
        self._edges = self._slow_edges()
        self._next_eval = 0.0
        # Retention is asked for turns whose session returns (a client that closes its last turn).
        self._last_turn = (
            {r.session_id: r.request_id for r in reqs if r.session_id is not None}
            if self.cfg.retain_s
            else {}
        )
        if self.cfg.closed_loop:
            self._run_closed(reqs, name, on_route)
        else:
            for r in reqs:
                self._arrive(r, (r.timestamp_s - self._t0) / self.cfg.speedup, name, on_route)
        # Drain: no more arrivals, so every engine runs to idle and every callback is delivered.
        for i in list(self.busy):
            self.advance(i, math.inf)
        self.deliver_until(math.inf)

    def _run_closed(
        self, reqs: Sequence[TraceRequest], name: str, on_route: Callable[[TraceRequest], None] | None
    ) -> None:
        """Closed loop (traces/closed_loop.py): a turn is due when what it waits for has finished,
        plus its pause. Finishes are only known by advancing the engines, so while anything runs
        time moves to the earliest possible finish (``_next_finish``) in steps of at least
        ``CLOSED_LOOP_STEP_S``; a turn released inside a step is sent at the step's end (late by
        at most one step, the same for every policy)."""
        loop = ClosedLoop(reqs, self.cfg.speedup, self.cfg.decode_tps or trace_decode_tps(self.trace))
        due = ArrivalQueue(loop.roots())

        def released(request_id: str, t: float) -> None:
            for at, r in loop.finished(request_id, t):
                due.push(at, r)

        self.on_done = released
        now = 0.0
        while True:
            nxt = due.peek()
            running = bool(self.busy or self.heap)
            if not running and nxt == math.inf:
                break
            if running:
                # Jump to the earliest possible finish (it may release a turn), at least one step.
                horizon = max(now + CLOSED_LOOP_STEP_S, min(self._next_finish(now), nxt))
                if horizon < nxt:
                    now = horizon
                    self._advance_to(now)
                    continue
            t, r = due.pop()
            now = max(now, t)
            self._arrive(r, now, name, on_route)
        self.on_done = None

    def _advance_to(self, t: float) -> None:
        self._next_eval = self._ticks(t, self._edges, self._next_eval)
        # Scrapes are lazy: the router only reads the gauges when it decides, so only the last
        # scrape tick at or before this arrival is taken (the values are those a live scraper
        # would have stored then); ticks with no decision after them cost nothing.
        interval = self.cfg.scrape_interval_s
        tick = math.floor(t / interval)
        if tick > self._last_tick:
            self._last_tick = tick
            ts = tick * interval
            self.advance_all(ts)
            self.clock.t = max(self.clock.t, ts)
            self.scrape()
        self.advance_all(t)

    def _arrive(
        self, r: TraceRequest, t: float, name: str, on_route: Callable[[TraceRequest], None] | None
    ) -> None:
        cfg = self.cfg
        bs = self.bs
        router = self.router
        self._advance_to(t)
        self.clock.t = t
        n = r.input_length
        # Full blocks only, as vLLM and the router hash; trace ids serve as both sides' hashes.
        full: list[BlockHash] = list(r.hash_ids[: n // bs])  # type: ignore[arg-type]
        rec = RequestRecord(request_id=r.request_id, target=name, send_s=t, prompt_tokens=n)
        self.records[r.request_id] = rec
        if on_route is not None:
            on_route(r)
        info = router.request_info(
            MODEL,
            block_hashes=full,
            prompt_tokens=n,
            max_tokens=max(1, r.output_length),
            session_id=r.session_id,
        )
        replica = router.select(info)
        ticket = router.dispatch(info, replica)
        i = self.rid_to_idx[replica.id]
        rec.replica = replica.id
        try:
            self.engines[i].add_request(
                SimRequest(
                    r.request_id,
                    max(1, r.output_length),
                    prompt_len=n,
                    block_hashes=full,
                    retain_s=cfg.retain_s
                    if r.session_id is not None and self._last_turn.get(r.session_id) != r.request_id
                    else 0.0,
                ),
                now=t,
            )
        except ValueError as exc:
            rec.error = str(exc)
            router.finish(ticket, False, None)
            if self.on_done is not None:
                self.on_done(r.request_id, t)
            return
        self.tickets[r.request_id] = ticket
        self.awaiting[i][r.request_id] = ticket
        self.busy.add(i)


def run_policy(
    trace: Trace,
    cfg: SimConfig,
    name: str,
    make_policy: PolicyFactory | None = None,
    *,
    reqs: Sequence[TraceRequest] | None = None,
) -> PolicyRun:
    """Play the trace against a fresh fleet routed by one policy."""
    if reqs is None:
        reqs = select_requests(trace, cfg)
    factory = make_policy or policy_factory(name, cfg)
    rng = random.Random(cfg.seed)
    start = time.perf_counter()
    fleet = _Fleet(trace, cfg, factory, rng, outliers=cfg.outliers and name in OUTLIER_POLICIES)
    set_session = getattr(fleet.policy, "set_session", None)
    on_route = (lambda r: set_session(r.session_id)) if set_session is not None else None
    fleet.run(reqs, name, on_route)
    wall = time.perf_counter() - start
    records = [fleet.records[r.request_id] for r in reqs]
    end = max((rec.send_s + (rec.e2e_s or 0.0) for rec in records), default=0.0)
    preemptions = sum(e.metrics.num_preemptions for e in fleet.engines)
    # summarize() spreads over the replicas that got requests; a hot spot that starves the others
    # needs the whole fleet in the denominator.
    counts = dict.fromkeys((r.id for r in fleet.replicas), 0)
    for rec in records:
        if rec.replica is not None:
            counts[ReplicaId(rec.replica)] += 1
    mean = len(records) / len(counts)
    spread: dict[str, Any] = {"fleet_max_over_mean": max(counts.values()) / mean if mean else math.nan}
    if fleet.outliers is not None:
        spread["outlier_ejections"] = sum(fleet.outliers.ejections.values())
        spread["outlier_transitions"] = [
            f"{t:.1f}s {rid} {a}->{b} ({why})" for t, rid, a, b, why in fleet.outliers.transitions
        ]
    if cfg.slow_replica is not None:
        slow_id = fleet.replicas[cfg.slow_replica].id
        lo, hi = cfg.slow_window
        inside = [rec for rec in records if lo <= rec.send_s < hi]
        spread["slow_replica_share_in_window"] = (
            sum(1 for rec in inside if rec.replica == slow_id) / len(inside) if inside else math.nan
        )
    if any(r.session_id is not None for r in reqs):
        spread.update(session_completion(reqs, fleet.records))
    if cfg.cpu_tier_tokens:
        # Tokens loaded from the CPU tier (vLLM's external_prefix_cache_hits), over all prompt
        # tokens: the part of hit_ratio (which counts both tiers) that the LMCache tier served.
        prompt = sum(rec.prompt_tokens for rec in records) or 1
        spread["cpu_hit_ratio"] = sum(e.metrics.external_prefix_cache_hits for e in fleet.engines) / prompt
    return PolicyRun(
        name=name,
        records=records,
        summary=summarize(
            records, slo=SLO(cfg.slo_ttft_s, cfg.slo_tpot_s), replicas=[r.id for r in fleet.replicas]
        ),
        wall_s=wall,
        sim_end_s=end,
        engine_steps=fleet.steps,
        preemptions=preemptions,
        kv_events_applied=fleet.kv_events_applied,
        extra=spread,
    )


def oracle(trace: Trace, cfg: SimConfig, reqs: Sequence[TraceRequest] | None = None) -> dict[str, Any]:
    """The single-LRU-cache upper bound for the fleet's total KV capacity (token-weighted)."""
    if reqs is None:
        reqs = select_requests(trace, cfg)
    sub = msgspec.structs.replace(trace, requests=tuple(reqs))
    blocks = sum(fleet_blocks(p, trace.block_tokens) for p in fleet_profiles(cfg))
    hr = oracle_hit_ratio(sub, blocks)
    return msgspec.to_builtins(hr)  # type: ignore[no-any-return]


def build_report(
    trace: Trace, cfg: SimConfig, reqs: Sequence[TraceRequest], runs: Sequence[PolicyRun]
) -> dict[str, Any]:
    """The one report shape (``--json``): oracle bound plus every policy's summary."""
    orc = oracle(trace, cfg, reqs)
    return {
        "trace": trace.name,
        "requests": len(reqs),
        "config": msgspec.to_builtins(cfg),
        "oracle_hit_ratio": orc["token_hit_lru"],
        "oracle": orc,
        "policies": {r.name: r.report() for r in runs},
    }


def simulate_runs(
    trace: Trace,
    cfg: SimConfig,
    policies: Sequence[str],
    factories: Mapping[str, PolicyFactory] | None = None,
) -> list[PolicyRun]:
    """Run every policy on a fresh fleet with the same requests, keeping the records."""
    reqs = select_requests(trace, cfg)
    return [run_policy(trace, cfg, n, (factories or {}).get(n), reqs=reqs) for n in policies]


def simulate(
    trace: Trace,
    cfg: SimConfig,
    policies: Sequence[str],
    factories: Mapping[str, PolicyFactory] | None = None,
) -> dict[str, Any]:
    """``simulate_runs`` reduced to the JSON-ready report."""
    runs = simulate_runs(trace, cfg, policies, factories)
    return build_report(trace, cfg, select_requests(trace, cfg), runs)
