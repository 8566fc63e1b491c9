"""Replica registry: the router's view of each engine, and the snapshots scorers read.

A ``Replica`` is mutable state owned by the event loop: health, router-tracked load (counted at
dispatch, on every path, so a burst cannot pile onto one replica between two metric scrapes), the
engine's own metrics (scraped), and a window of recent TTFTs. Scorers receive ``Replica`` objects
directly as snapshots: selection is synchronous, so nothing changes under them while they read.

The registry is pure (no I/O): the server's health/scrape tasks and the offline simulator both
feed it, which is how the same policies run live and in virtual time.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from router.index import PrefixIndex
from router.types import ReplicaId, ReplicaSpec

TTFT_WINDOW = 64  # recent TTFTs kept per replica for the tail-latency scorer
# Queue-free requests shorter than this say little about the rate: their TTFT is mostly the wait
# for the engine step in progress (simulated H100 fleet: 256-2000-token prompts read a median
# 4,500-10,000 tokens/s, 8-16k-token prompts 33,000), so a replica serving many short session
# follow-ups read 2-4x slower than an identical one. The log-space estimate that tells two
# replicas' GPUs apart (router/pd/decision.py) learns from longer prompts only.
RATE_TEST_MIN_TOKENS = 2048


@dataclass(slots=True)
class Replica:
    spec: ReplicaSpec
    id: ReplicaId
    url: str
    slot: int
    models: frozenset[str] = frozenset()
    # The name vLLM's block keys belong to: its first served name (base cards of /v1/models have
    # no ``parent``; adapters do). Aliases (--served-model-name a b) key as this name.
    base_model: str | None = None
    # Data parallelism behind one URL: the engine rank this routing target pins with vLLM's
    # X-data-parallel-rank header (None: not a DP target), and the replica whose rank 0 it is not.
    dp_rank: int | None = None
    dp_parent: ReplicaId | None = None
    healthy: bool = True  # admitted to routing (active probes + passive ejection)
    draining: bool = False  # leaving: no new requests, in-flight ones finish
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    # Router-tracked load, updated at dispatch and completion.
    in_flight: int = 0
    pending_prefill_tokens: int = 0  # uncached prompt tokens dispatched, first token not seen yet
    # Engine-reported (scraped from /metrics; None until the first scrape).
    engine_running: float | None = None
    engine_waiting: float | None = None
    engine_queue: float = 0.0  # running + waiting, kept in step by set_engine_load
    kv_usage: float | None = None
    block_size: int | None = None
    num_gpu_blocks: int | None = None
    metrics_ok: bool = False
    has_kv_events: bool = False
    # Recent TTFTs, in arrival order (ring buffer) and sorted (a quantile is one index: the
    # tail-latency scorer reads it on every decision, and a TTFT arrives with every request), and
    # a measured prefill rate (EWMA of uncached tokens / TTFT).
    ttfts: list[float] = field(default_factory=list)
    _ttft_pos: int = 0
    _ttfts_sorted: list[float] = field(default_factory=list)
    prefill_tps: float = 0.0
    # The same from requests with no prefill queued ahead: compute alone, for estimates that add
    # the queue themselves (router/pd/decision.py). 0 until such a request was seen.
    prefill_compute_tps: float = 0.0
    # Its samples from prompts of RATE_TEST_MIN_TOKENS or more, in log space (for the PD
    # decision's test of whether two replicas' GPUs differ): count, EWMA of ln(sample), spread.
    prefill_compute_samples: int = 0
    prefill_compute_log_tps: float = 0.0
    _compute_var: float = 0.0  # EWMA of squared ln deviations of the samples (spread)
    _compute_w2: float = 0.0  # sum of the EWMA's squared sample weights
    cpu_load_tps: float = 0.0  # measured CPU-tier (LMCache) load rate, tokens/s (0: not yet)
    # Uncached prompt tokens routed here, exponentially decayed (see scoring/churn.py): how fast
    # this replica's cache is being overwritten, and how much prefill it has been given.
    churn_tokens: float = 0.0
    churn_at: float = 0.0
    # Requests routed here with a prefill to do, exponentially decayed the same way: their arrival
    # rate (``arrival_rate``), which prices the delay a remote prefill imposes (router/pd/decision.py).
    arrivals: float = 0.0
    arrivals_at: float = 0.0

    def add_churn(self, tokens: int, now: float, tau_s: float) -> None:
        self.churn_tokens = self.churn(now, tau_s) + tokens
        self.churn_at = now

    def churn(self, now: float, tau_s: float) -> float:
        return _decayed(self.churn_tokens, self.churn_at, now, tau_s)

    def add_arrival(self, now: float, tau_s: float) -> None:
        self.arrivals = _decayed(self.arrivals, self.arrivals_at, now, tau_s) + 1.0
        self.arrivals_at = now

    def arrival_rate(self, now: float, tau_s: float) -> float:
        """Prefill-bearing requests per second routed here (decayed count / tau)."""
        return _decayed(self.arrivals, self.arrivals_at, now, tau_s) / tau_s

    @property
    def role(self) -> str:
        return self.spec.role

    @property
    def routable(self) -> bool:
        return self.healthy and not self.draining

    def _record_ttft(self, ttft_s: float) -> None:
        if not math.isfinite(ttft_s):
            return  # the sorted window could not find it again to drop it
        window = self.ttfts
        ordered = self._ttfts_sorted
        if len(window) < TTFT_WINDOW:
            window.append(ttft_s)
        else:
            pos = self._ttft_pos
            del ordered[bisect_left(ordered, window[pos])]
            window[pos] = ttft_s
            self._ttft_pos = (pos + 1) % TTFT_WINDOW
        insort(ordered, ttft_s)

    def observe_ttft(self, ttft_s: float, uncached_tokens: int, ahead_tokens: int = 0) -> None:
        self._record_ttft(ttft_s)
        # The rate is what estimated-ttft divides (pending ahead + uncached) by, so it is measured
        # on that work: this request's uncached tokens plus the prefill it waited behind. Half of
        # the pending tokens at dispatch: the prefill at the head of the queue is on average half
        # done when a request arrives. Measured on its own tokens only, a replica serving session
        # follow-ups (a few hundred new tokens behind queued work) read several times slower than
        # it was and sessions were pushed off their cached prefix under load; with the whole
        # pending count, replicas with long prefills in progress read up to 2x too fast
        # (docs/scoring.md). Only long prefills of its own say something about the rate.
        work = uncached_tokens + ahead_tokens // 2
        if uncached_tokens >= 256 and 0 < ttft_s < math.inf:
            rate = work / ttft_s
            self.prefill_tps = rate if self.prefill_tps == 0 else 0.8 * self.prefill_tps + 0.2 * rate
            if ahead_tokens == 0:
                self._observe_compute_rate(rate, uncached_tokens)

    def _observe_compute_rate(self, rate: float, tokens: int) -> None:
        """EWMA (weight 0.2) of queue-free rate samples, and what router/pd/decision.py needs to
        tell two replicas' rates apart (from prompts of RATE_TEST_MIN_TOKENS or more), in log
        space where one absurd sample (a prompt the index thought uncached but the engine held
        reads a million tokens/s) moves the estimate by its weight, not by 0.2 x its value: the
        EWMA of ln(sample), the samples' spread around it (EWMA of the squared deviation,
        bias-corrected for its zero start) and the sum of the EWMA's squared weights (1 after
        one sample, 0.2 / 1.8 in the long run)."""
        c = self.prefill_compute_tps
        self.prefill_compute_tps = rate if c == 0 else 0.8 * c + 0.2 * rate
        if tokens < RATE_TEST_MIN_TOKENS or not 0.0 < rate < math.inf:
            return
        self.prefill_compute_samples += 1
        ln = math.log(rate)
        if self.prefill_compute_samples == 1:
            self.prefill_compute_log_tps, self._compute_w2 = ln, 1.0
            return
        dev = ln - self.prefill_compute_log_tps
        self._compute_var = 0.8 * self._compute_var + 0.2 * dev * dev
        self.prefill_compute_log_tps += 0.2 * dev
        self._compute_w2 = 0.64 * self._compute_w2 + 0.04

    @property
    def prefill_compute_log_se2(self) -> float:
        """Squared standard error of prefill_compute_log_tps; infinite until two samples."""
        k = self.prefill_compute_samples
        if k < 2:
            return math.inf
        return self._compute_var / (1.0 - 0.8 ** (k - 1)) * self._compute_w2

    def observe_cpu_load(self, ttft_s: float, recompute_tokens: int, loaded_tokens: int) -> None:
        """Learn the CPU-tier load rate from a request that loaded ``loaded_tokens`` and
        recomputed ``recompute_tokens``: TTFT = recompute / prefill_rate + loaded / load_rate.
        Only whole-chunk loads with a known prefill rate and a positive remainder teach it."""
        self._record_ttft(ttft_s)
        if loaded_tokens < 256 or self.prefill_tps <= 0:
            return
        load_s = ttft_s - recompute_tokens / self.prefill_tps
        if load_s <= 0:
            return
        rate = loaded_tokens / load_s
        self.cpu_load_tps = rate if self.cpu_load_tps == 0 else 0.8 * self.cpu_load_tps + 0.2 * rate

    def tail_ttft(self, q: float = 0.9) -> float:
        """Recent TTFT quantile (nearest rank); 0 when nothing observed yet."""
        data = self._ttfts_sorted
        n = len(data)
        if not n:
            return 0.0
        return data[min(n - 1, max(0, math.ceil(q * n) - 1))]

    def set_engine_load(self, running: float | None, waiting: float | None, kv_usage: float | None) -> None:
        # A gauge an engine exports as NaN or Inf is unknown, not a number to score with: one NaN
        # would make every total it enters NaN, and a NaN total never wins nor ties.
        self.engine_running = _finite(running)
        self.engine_waiting = _finite(waiting)
        self.kv_usage = _finite(kv_usage)
        self.engine_queue = (self.engine_running or 0.0) + (self.engine_waiting or 0.0)

    @property
    def queue_depth(self) -> float:
        """Requests ahead of a new one: the larger of router in-flight and engine running+waiting.

        The router's own count is exact for what *this* router sent and reacts instantly; the
        engine's count includes other routers' traffic (scale-out) but lags by a scrape.
        """
        f = self.in_flight
        e = self.engine_queue
        return f if f > e else e


def _decayed(value: float, since: float, now: float, tau_s: float) -> float:
    """``value`` recorded at ``since``, decayed exponentially (time constant ``tau_s``) to ``now``."""
    dt = now - since
    if dt <= 0 or value == 0.0:
        return value
    return value * math.exp(-dt / tau_s)


def _finite(v: float | None) -> float | None:
    return v if v is None or math.isfinite(v) else None


class ReplicaRegistry:
    """All known replicas, by id, with a per-model candidate cache rebuilt on any change."""

    def __init__(self, index: PrefixIndex) -> None:
        self.index = index
        self._replicas: dict[ReplicaId, Replica] = {}
        self._candidates: dict[str | None, list[Replica]] = {}
        self._listeners: list[Callable[[str, Replica], None]] = []
        self.aliases: dict[str, str] = {}  # served-name alias -> the base name keys are seeded with

    def on_change(self, listener: Callable[[str, Replica], None]) -> None:
        """``listener(event, replica)`` with event in added | removed | health."""
        self._listeners.append(listener)

    def _notify(self, event: str, replica: Replica) -> None:
        self._candidates.clear()
        for fn in self._listeners:
            fn(event, replica)

    def add(self, spec: ReplicaSpec) -> Replica:
        rid = spec.id
        existing = self._replicas.get(rid)
        if existing is not None:
            return existing
        slot = self.index.add_replica(rid)
        rep = Replica(spec=spec, id=rid, url=spec.url.rstrip("/"), slot=slot, models=frozenset(spec.models))
        self._replicas[rid] = rep
        self._notify("added", rep)
        return rep

    def add_rank(self, parent: Replica, rank: int) -> Replica:
        """Rank ``rank`` (>= 1) of a data-parallel server as its own routing target: same URL, own
        index slot (its own event stream), pinned with the rank header; leaves with its parent."""
        spec = ReplicaSpec(
            url=parent.spec.url,
            name=f"{parent.id}#dp{rank}",
            models=parent.spec.models,
            role=parent.spec.role,
        )
        existing = self._replicas.get(spec.id)
        if existing is not None:
            return existing
        slot = self.index.add_replica(spec.id)
        rep = Replica(spec=spec, id=spec.id, url=parent.url, slot=slot, models=parent.models)
        rep.base_model, rep.dp_rank, rep.dp_parent = parent.base_model, rank, parent.id
        self._replicas[spec.id] = rep
        self._notify("added", rep)
        return rep

    def remove(self, rid: ReplicaId) -> Replica | None:
        rep = self._replicas.pop(rid, None)
        if rep is not None:
            self.index.remove_replica(rid)
            self._notify("removed", rep)
        return rep

    def sync(self, specs: Iterable[ReplicaSpec]) -> tuple[list[Replica], list[Replica]]:
        """Make the registry hold exactly ``specs``; returns (added, removed)."""
        wanted = {s.id: s for s in specs}
        removed = [
            r for rid, r in list(self._replicas.items()) if rid not in wanted and r.dp_parent not in wanted
        ]
        for r in removed:
            self.remove(r.id)
        added = [self.add(s) for rid, s in wanted.items() if rid not in self._replicas]
        return added, removed

    def get(self, rid: ReplicaId) -> Replica | None:
        return self._replicas.get(rid)

    def __iter__(self) -> Iterator[Replica]:
        return iter(self._replicas.values())

    def __len__(self) -> int:
        return len(self._replicas)

    def set_models(self, rep: Replica, models: Iterable[str], base: Sequence[str] = ()) -> None:
        """``base``: the served names of the base model, first one first (the rest are aliases)."""
        rep.base_model = base[0] if base else rep.base_model
        for alias in base[1:]:
            self.aliases[alias] = base[0]
        new = frozenset(models)
        if new != rep.models:
            rep.models = new
            self._notify("models", rep)

    def set_healthy(self, rep: Replica, healthy: bool) -> None:
        if rep.healthy != healthy:
            rep.healthy = healthy
            self._notify("health", rep)

    def set_draining(self, rep: Replica, draining: bool) -> None:
        if rep.draining != draining:
            rep.draining = draining
            self._notify("health", rep)

    def key_model(self, model: str) -> str:
        """The model name a request's keys are seeded with: an alias keys as its base name."""
        return self.aliases.get(model, model)

    def known_models(self) -> set[str]:
        out: set[str] = set()
        for r in self._replicas.values():
            out |= r.models
        return out

    def candidates(self, model: str | None) -> list[Replica]:
        """Routable replicas serving ``model``. Replicas whose models are not known yet serve any.

        Cached per model; any registry change clears the cache (changes are rare, reads are per
        request).
        """
        cached = self._candidates.get(model)
        if cached is None:
            # prefill-only replicas take leg 1 of split requests only (router/pd/)
            cached = [
                r
                for r in self._replicas.values()
                if r.routable
                and r.spec.role != "prefill"
                and (model is None or not r.models or model in r.models)
            ]
            self._candidates[model] = cached
        return cached

    def prefill_candidates(self, model: str | None) -> list[Replica]:
        """Routable ``prefill`` replicas serving ``model`` (not cached: PD requests only)."""
        return [
            r
            for r in self._replicas.values()
            if r.routable
            and r.spec.role == "prefill"
            and (model is None or not r.models or model in r.models)
        ]

    def serves(self, model: str) -> bool:
        """Whether any replica (healthy or not) serves ``model`` or might (models unknown)."""
        return any(not r.models or model in r.models for r in self._replicas.values())

    def routable(self) -> Sequence[Replica]:
        return self.candidates(None)
