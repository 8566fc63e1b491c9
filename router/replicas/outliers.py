"""Outlier detection on what users feel: replicas that answer 200 and still fail users.

Per replica, over the last ``window_s`` (latencies: at most the last ``SAMPLE_CAP`` samples of it),
the detector keeps what the router measures on real traffic (no probe involved):

* **TTFT per uncached prompt token** (``ttft / max(uncached + backlog, 64)``, where backlog is the
  uncached prompt tokens the router had dispatched to the replica ahead of this request: a busier
  replica is not a slower one; short prefills are dominated by per-step overhead, so at least 64
  tokens are counted),
* **inter-token latency** of the streams it relays (mean gap between chunks of one stream; the
  lower quartile over the window is compared: load slows some streams, a slow engine all),
* **success rate** (proxied requests that completed vs. failed on the replica's side),

and from the engine's /metrics: the preemption rate (``vllm:num_preemptions_total``), KV usage
pinned at 100% and KV-transfer failure counters.

Every ``interval_s`` (``evaluate``) each replica's medians are compared with the median of its
*peers* serving the same model (leave-one-out, so a fleet of two still has a reference). A replica
whose TTFT/token or ITL is ``factor`` times worse, whose success rate is ``success_margin`` under
its peers', or whose engine signals say it is sick is **degraded** (its share drops to
``degraded_weight``); degraded ``eject_after_s`` in a row, it is **ejected** for
``base_ejection_s`` x times ejected (capped), unless that would eject more than
``max_ejected_fraction`` of the model's replicas (at least one of two or more) or leave no healthy
one. An ejected replica returns through **slow start**: its share ramps linearly from
``slow_start_min_weight`` to 1 over ``slow_start_s``, as does a replica that joins. The canary
(canary.py) marks an engine that answers nothing **canary_failed** until a canary succeeds.

A fleet where everyone is equally slow has no outlier: ratios are to the peers, never absolute.

Selection reads ``admit``: each candidate is kept with probability weight / max weight (never
none), which works under every policy, round robin included. Pure and clock-injected: the live
router and the offline simulator (traces/simulate.py) drive the same object.
"""

from __future__ import annotations

import logging
import math
import random
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from router.config import OutlierSettings
from router.replicas.registry import Replica, ReplicaRegistry

log = logging.getLogger("kvrouter.outliers")

HEALTHY, DEGRADED, EJECTED, SLOW_START, CANARY_FAILED = (
    "healthy",
    "degraded",
    "ejected",
    "slow_start",
    "canary_failed",
)
STATES = (HEALTHY, DEGRADED, EJECTED, SLOW_START, CANARY_FAILED)
MIN_TOKENS = 64  # TTFT per token counts at least this many uncached tokens
KV_PINNED = 0.999
# Latency samples kept per replica and signal: the window's most recent ones. At thousands of
# requests per second a whole window would hold ~10^5 of them per replica, sorted every interval.
SAMPLE_CAP = 1024
OUTCOME_BUCKET_S = 0.25  # outcomes are counted per bucket of this many seconds


def _samples() -> deque[tuple[float, float]]:
    return deque(maxlen=SAMPLE_CAP)


class OutcomeWindow:
    """Successes and failures over the window, counted per ``OUTCOME_BUCKET_S`` bucket: O(1) per
    request, and memory and evaluation bounded by the window's length, not the request rate."""

    __slots__ = ("_buckets", "ok", "total")

    def __init__(self) -> None:
        self._buckets: deque[list[int]] = deque()  # [bucket number, successes, outcomes]
        self.ok = 0
        self.total = 0

    def add(self, now: float, ok: bool) -> None:
        key = math.floor(now / OUTCOME_BUCKET_S)
        buckets = self._buckets
        if buckets and buckets[-1][0] == key:
            last = buckets[-1]
        else:
            last = [key, 0, 0]
            buckets.append(last)
        last[1] += ok
        last[2] += 1
        self.ok += ok
        self.total += 1

    def trim(self, cutoff: float) -> None:
        """Forget the buckets that ended before ``cutoff`` (a sample stays at most one bucket
        longer than the window)."""
        buckets = self._buckets
        while buckets and (buckets[0][0] + 1) * OUTCOME_BUCKET_S <= cutoff:
            _, ok, n = buckets.popleft()
            self.ok -= ok
            self.total -= n

    def clear(self) -> None:
        self._buckets.clear()
        self.ok = self.total = 0

    def __len__(self) -> int:
        return self.total


@dataclass(slots=True)
class ReplicaHealth:
    """What the detector knows about one replica (exported in /debug/replicas)."""

    state: str = HEALTHY
    since: float = 0.0
    ttft: deque[tuple[float, float]] = field(default_factory=_samples)  # (time, seconds per token)
    itl: deque[tuple[float, float]] = field(default_factory=_samples)  # (time, seconds per chunk)
    outcomes: OutcomeWindow = field(default_factory=OutcomeWindow)
    last_success: float = -math.inf
    degraded_since: float | None = None
    ejected_until: float = 0.0
    times_ejected: int = 0
    reason: str = ""
    numbers: dict[str, float] = field(default_factory=dict)  # what the last judgement saw
    # engine signals
    preempt_total: float | None = None
    preempt_at: float = 0.0
    preempt_rate: float = 0.0
    kv_full_since: float | None = None
    joined_at: float = math.inf
    xfer_total: float | None = None
    xfer_failures_at: float = -math.inf


def _median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    if n == 0:
        return 0.0
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else 0.0


class OutlierDetector:
    def __init__(
        self,
        cfg: OutlierSettings,
        registry: ReplicaRegistry,
        clock: Callable[[], float],
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self.registry = registry
        self.clock = clock
        self.rng = rng or random.Random(0)
        self.health: dict[str, ReplicaHealth] = {}
        self.ejections: dict[tuple[str, str], int] = {}  # (replica, reason) -> count
        self.transitions: list[
            tuple[float, str, str, str, str]
        ] = []  # (t, replica, from, to, reason), last 256
        self._abnormal = 0  # replicas not healthy: admit() is a no-op while 0
        registry.on_change(self._on_registry_change)

    # ---- registry ------------------------------------------------------------------------

    def _on_registry_change(self, event: str, rep: Replica) -> None:
        if event == "removed":
            h = self.health.pop(rep.id, None)
            if h is not None and h.state != HEALTHY:
                self._abnormal -= 1
        elif event == "health" and rep.healthy and not rep.draining:
            # Joined (first passing probe) or re-admitted: ramp, when established peers carry
            # the traffic meanwhile (replicas starting together all take their share at once).
            now = self.clock()
            h = self._h(rep.id)
            h.joined_at = min(h.joined_at, now)
            span = self.cfg.slow_start_s
            peers = [
                r
                for r in self.registry
                if r is not rep and r.routable and self._h(r.id).joined_at <= now - span
            ]
            if peers and span > 0:
                h.ttft.clear()
                h.itl.clear()
                h.outcomes.clear()
                self._set(rep.id, h, SLOW_START, "joined", {})

    def _h(self, rid: str) -> ReplicaHealth:
        h = self.health.get(rid)
        if h is None:
            h = self.health[rid] = ReplicaHealth(since=self.clock())
        return h

    def state(self, rid: str) -> str:
        h = self.health.get(rid)
        return HEALTHY if h is None else h.state

    def _set(self, rid: str, h: ReplicaHealth, state: str, reason: str, numbers: dict[str, float]) -> None:
        if h.state == state:
            return
        now = self.clock()
        was = h.state
        self._abnormal += (state != HEALTHY) - (was != HEALTHY)
        h.state, h.since, h.reason = state, now, reason
        h.numbers = dict(numbers)
        if state == EJECTED:
            h.times_ejected += 1
            h.ejected_until = now + min(self.cfg.max_ejection_s, self.cfg.base_ejection_s * h.times_ejected)
            key = (rid, reason)
            self.ejections[key] = self.ejections.get(key, 0) + 1
        if state != DEGRADED:
            h.degraded_since = None
        nums = " ".join(f"{k}={v:.4g}" for k, v in sorted(numbers.items()))
        log.warning("replica %s: %s -> %s (%s) %s", rid, was, state, reason, nums)
        self.transitions.append((now, rid, was, state, reason))
        del self.transitions[:-256]

    # ---- observations (hot path: O(1)) ----------------------------------------------------

    def observe_ttft(self, rep: Replica, ttft_s: float, uncached_tokens: int) -> None:
        now = self.clock()
        h = self._h(rep.id)
        h.ttft.append((now, ttft_s / max(uncached_tokens, MIN_TOKENS)))

    def observe_itl(self, rep: Replica, itl_s: float) -> None:
        self._h(rep.id).itl.append((self.clock(), itl_s))

    def record_success(self, rep: Replica) -> None:
        now = self.clock()
        h = self._h(rep.id)
        h.outcomes.add(now, True)
        h.last_success = now

    def record_failure(self, rep: Replica, reason: str = "") -> None:
        self._h(rep.id).outcomes.add(self.clock(), False)

    def last_success(self, rep: Replica) -> float:
        h = self.health.get(rep.id)
        return -math.inf if h is None else h.last_success

    def observe_engine(
        self, rep: Replica, preemptions: float | None, kv_usage: float | None, transfer_failures: float | None
    ) -> None:
        """Engine counters from one scrape: rates are taken between scrapes."""
        now = self.clock()
        h = self._h(rep.id)
        if preemptions is not None:
            if h.preempt_total is not None and now > h.preempt_at and preemptions >= h.preempt_total:
                rate = (preemptions - h.preempt_total) / (now - h.preempt_at)
                h.preempt_rate = 0.7 * h.preempt_rate + 0.3 * rate
            h.preempt_total, h.preempt_at = preemptions, now
        if kv_usage is not None:
            if kv_usage >= KV_PINNED:
                h.kv_full_since = h.kv_full_since if h.kv_full_since is not None else now
            else:
                h.kv_full_since = None
        if transfer_failures is not None:
            if h.xfer_total is not None and transfer_failures > h.xfer_total:
                h.xfer_failures_at = now
            h.xfer_total = transfer_failures

    def canary_result(self, rep: Replica, ok: bool, detail: str = "") -> None:
        h = self._h(rep.id)
        if not ok and h.state != CANARY_FAILED:
            self._set(rep.id, h, CANARY_FAILED, "canary", {"since_success_s": self.clock() - h.last_success})
            self.ejections[(rep.id, "canary")] = self.ejections.get((rep.id, "canary"), 0) + 1
        elif ok:
            h.last_success = self.clock()
            if h.state == CANARY_FAILED:
                self._set(rep.id, h, SLOW_START if self.cfg.slow_start_s > 0 else HEALTHY, "canary_ok", {})

    # ---- selection -------------------------------------------------------------------------

    def weight(self, rid: str, now: float) -> float:
        h = self.health.get(rid)
        if h is None or h.state == HEALTHY:
            return 1.0
        if h.state == DEGRADED:
            return self.cfg.degraded_weight
        if h.state == SLOW_START:
            lo = self.cfg.slow_start_min_weight
            span = self.cfg.slow_start_s
            return 1.0 if span <= 0 else min(1.0, lo + (1.0 - lo) * (now - h.since) / span)
        return 0.0  # ejected, canary_failed

    def admit(self, cands: list[Replica]) -> list[Replica]:
        """Thin the candidates by weight: kept with probability weight / max weight; never none."""
        if self._abnormal <= 0 or not self.cfg.enabled:
            return cands
        now = self.clock()
        ws = [self.weight(r.id, now) for r in cands]
        top = max(ws)
        if top <= 0.0:
            return cands  # everyone sick: routing somewhere beats refusing
        rnd = self.rng.random
        kept = [r for r, w in zip(cands, ws, strict=True) if w >= top or (w > 0.0 and rnd() * top < w)]
        return kept

    # ---- judgement ---------------------------------------------------------------------------

    def _trim(self, h: ReplicaHealth, cutoff: float) -> None:
        for q in (h.ttft, h.itl):
            while q and q[0][0] < cutoff:
                q.popleft()
        h.outcomes.trim(cutoff)

    def _summary(self, h: ReplicaHealth) -> dict[str, float]:
        n = self.cfg.min_samples
        out: dict[str, float] = {}
        if len(h.ttft) >= n:
            out["ttft_per_token"] = _median([v for _, v in h.ttft])
        if len(h.itl) >= n:
            # The lower quartile: a slow engine makes every step slow, a busy one only some
            # (streams that overlapped long prefills); the fast streams tell them apart.
            out["itl"] = _quantile([v for _, v in h.itl], 0.25)
        if len(h.outcomes) >= n:
            out["success_rate"] = h.outcomes.ok / h.outcomes.total
        return out

    def evaluate(self) -> None:
        """Compare every replica with its peers; move states. Called every ``interval_s``."""
        if not self.cfg.enabled:
            return
        now = self.clock()
        cutoff = now - self.cfg.window_s
        reps = [r for r in self.registry if r.healthy and not r.draining]
        summaries: dict[str, dict[str, float]] = {}
        for r in reps:
            h = self._h(r.id)
            self._trim(h, cutoff)
            summaries[r.id] = self._summary(h)
        for r in reps:
            h = self.health[r.id]
            if h.state == EJECTED:
                if now >= h.ejected_until:
                    self._readmit(r, h)
                continue
            if h.state == CANARY_FAILED:
                continue
            peers = [p for p in reps if p is not r and p.models == r.models and self.state(p.id) != EJECTED]
            reason, numbers = self._judge(r, h, summaries, peers, now)
            self._step(r, h, reason, numbers, reps, now)

    def _judge(
        self,
        r: Replica,
        h: ReplicaHealth,
        summaries: dict[str, dict[str, float]],
        peers: list[Replica],
        now: float,
    ) -> tuple[str, dict[str, float]]:
        """The first signal on which ``r`` is worse than its peers (or its engine says sick)."""
        mine = summaries[r.id]
        for key in ("ttft_per_token", "itl"):
            if key not in mine:
                continue
            f = self.cfg.factor if key == "ttft_per_token" else self.cfg.itl_factor
            ref = [summaries[p.id][key] for p in peers if key in summaries[p.id]]
            if not ref:
                continue
            med = _median(ref)
            if med > 0 and mine[key] >= f * med:
                return key, {key: mine[key], "peer_median": med, "ratio": mine[key] / med}
        if "success_rate" in mine:
            ref = [summaries[p.id]["success_rate"] for p in peers if "success_rate" in summaries[p.id]]
            if ref:
                med = _median(ref)
                if mine["success_rate"] < med - self.cfg.success_margin:
                    return "success_rate", {"success_rate": mine["success_rate"], "peer_median": med}
        if h.preempt_rate >= self.cfg.preemptions_per_s:
            return "preemptions", {"preemptions_per_s": h.preempt_rate}
        if h.kv_full_since is not None and now - h.kv_full_since >= self.cfg.kv_pinned_s:
            return "kv_pinned", {"kv_full_s": now - h.kv_full_since}
        if now - h.xfer_failures_at <= self.cfg.window_s:
            return "kv_transfer", {"transfer_failures": h.xfer_total or 0.0}
        return "", mine

    def _step(
        self,
        r: Replica,
        h: ReplicaHealth,
        reason: str,
        numbers: dict[str, float],
        reps: list[Replica],
        now: float,
    ) -> None:
        h.numbers = numbers
        if not reason:
            if h.state == DEGRADED:
                self._set(r.id, h, HEALTHY, "recovered", numbers)
            elif h.state == SLOW_START and now - h.since >= self.cfg.slow_start_s:
                self._set(r.id, h, HEALTHY, "slow_start_done", numbers)
            return
        if h.state != DEGRADED:
            self._set(r.id, h, DEGRADED, reason, numbers)
            h.degraded_since = now
            return
        assert h.degraded_since is not None
        if now - h.degraded_since >= self.cfg.eject_after_s and self._may_eject(r, reps):
            self._set(r.id, h, EJECTED, reason, numbers)

    def _may_eject(self, r: Replica, reps: list[Replica]) -> bool:
        same = [p for p in reps if p.models == r.models]
        out = sum(1 for p in same if self.state(p.id) in (EJECTED, CANARY_FAILED))
        cap = max(1, math.floor(self.cfg.max_ejected_fraction * len(same))) if len(same) >= 2 else 0
        serving = len(same) - out - 1
        return out < cap and serving >= 1

    def _readmit(self, r: Replica, h: ReplicaHealth) -> None:
        h.ttft.clear()
        h.itl.clear()
        h.outcomes.clear()
        h.preempt_rate = 0.0
        h.kv_full_since = None
        h.xfer_failures_at = -math.inf
        self._set(r.id, h, SLOW_START if self.cfg.slow_start_s > 0 else HEALTHY, "ejection_over", {})

    # ---- export ------------------------------------------------------------------------------

    def describe(self, rid: str) -> dict[str, Any]:
        h = self.health.get(rid)
        if h is None:
            return {"state": HEALTHY}
        now = self.clock()
        return {
            "state": h.state,
            "since_s": round(now - h.since, 3),
            "reason": h.reason,
            "weight": round(self.weight(rid, now), 4),
            "numbers": {k: round(v, 6) for k, v in h.numbers.items()},
            "times_ejected": h.times_ejected,
            "ejected_for_s": round(max(0.0, h.ejected_until - now), 3) if h.state == EJECTED else 0.0,
            "preemptions_per_s": round(h.preempt_rate, 4),
            "seconds_since_success": None if h.last_success == -math.inf else round(now - h.last_success, 3),
        }


class OutlierCollector(Collector):
    """``kvrouter_replica_state{replica,state}`` and ``kvrouter_outlier_ejections_total{replica,reason}``."""

    def __init__(self, detector: OutlierDetector) -> None:
        self.detector = detector

    def collect(self) -> Iterator[Any]:
        d = self.detector
        state = GaugeMetricFamily(
            "kvrouter_replica_state", "1 for the replica's current outlier state", labels=["replica", "state"]
        )
        for rep in d.registry:
            cur = d.state(rep.id)
            for s in STATES:
                state.add_metric([rep.id, s], 1.0 if s == cur else 0.0)
        yield state
        ej = CounterMetricFamily(
            "kvrouter_outlier_ejections",
            "Replicas ejected as outliers, by reason",
            labels=["replica", "reason"],
        )
        for (rid, reason), n in sorted(d.ejections.items()):
            ej.add_metric([rid, reason], float(n))
        yield ej
