"""Policy registry: simple load balancers and the scoring pipeline behind one interface.

``select(req, candidates, explain=None) -> Replica`` is synchronous and never empty-handed
(the router only calls it with at least one candidate). ``needs_match`` tells the router whether
to hash the prompt and match the index first (the simple policies never look at blocks).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from ..replicas.registry import Replica
from ..types import RequestInfo
from .base import Scorer
from .churn import CacheChurnScorer
from .kv_usage import KVUsageScorer
from .latency import TailLatencyScorer
from .pipeline import Explanation, Pipeline, PluginTimer
from .prefix import PrefixCacheScorer
from .queue import QueueDepthScorer
from .session import SessionAffinityScorer, SessionBoundedLoadFilter
from .ttft import EstimatedTTFTScorer


class Policy(Protocol):
    name: str
    needs_match: bool

    def select(
        self, req: RequestInfo, candidates: Sequence[Replica], explain: Explanation | None = None
    ) -> Replica: ...


class RoundRobin:
    needs_match = False

    def __init__(self, rng: random.Random) -> None:
        self.name = "round_robin"
        self._next = 0

    def select(
        self, req: RequestInfo, candidates: Sequence[Replica], explain: Explanation | None = None
    ) -> Replica:
        r = candidates[self._next % len(candidates)]
        self._next += 1
        if explain is not None:
            explain.chosen = r.id
        return r


class RandomPolicy:
    needs_match = False

    def __init__(self, rng: random.Random) -> None:
        self.name = "random"
        self.rng = rng

    def select(
        self, req: RequestInfo, candidates: Sequence[Replica], explain: Explanation | None = None
    ) -> Replica:
        r = candidates[self.rng.randrange(len(candidates))]
        if explain is not None:
            explain.chosen = r.id
        return r


class LeastLoaded:
    """Fewest router in-flight requests (ties at random)."""

    needs_match = False

    def __init__(self, rng: random.Random) -> None:
        self.name = "least_loaded"
        self.rng = rng

    def select(
        self, req: RequestInfo, candidates: Sequence[Replica], explain: Explanation | None = None
    ) -> Replica:
        low = min(r.in_flight for r in candidates)
        ties = [r for r in candidates if r.in_flight == low]
        r = ties[0] if len(ties) == 1 else self.rng.choice(ties)
        if explain is not None:
            explain.chosen = r.id
        return r


class PowerOfTwo:
    """Two random candidates, the one with fewer in-flight requests (Mitzenmacher)."""

    needs_match = False

    def __init__(self, rng: random.Random) -> None:
        self.name = "power_of_two"
        self.rng = rng

    def select(
        self, req: RequestInfo, candidates: Sequence[Replica], explain: Explanation | None = None
    ) -> Replica:
        if len(candidates) == 1:
            r = candidates[0]
        else:
            a, b = self.rng.sample(range(len(candidates)), 2)
            ra, rb = candidates[a], candidates[b]
            r = ra if ra.in_flight <= rb.in_flight else rb
        if explain is not None:
            explain.chosen = r.id
        return r


# Default weights of the cache_aware pipeline, kept by measurement (docs/policy-tuning.md: 8
# simulated H100s, Mooncake conversation x1/x2/x3, synthetic x1/x2, a shared-prompt hot spot). No
# move or combination beat them on TTFT across scenarios; estimated-ttft carries the latency win,
# a stronger prefix-cache pull hot-spots the shared-prompt case. cache-churn (added after the
# sweep) is neutral on Mooncake and +3 hit points on the shared-prompt trace.
DEFAULT_WEIGHTS: dict[str, float] = {
    "cache-churn": 1.0,
    "estimated-ttft": 3.0,
    "prefix-cache": 1.0,
    "queue-depth": 1.0,
    "kv-usage": 0.5,
    "tail-latency": 0.5,
    # Neutral on requests without a session (given or inferred); docs/sessions.md has its sweep.
    "session-affinity": 3.0,
}


def _cache_aware(
    rng: random.Random,
    weights: Mapping[str, float],
    load_factor: float,
    cpu_credit: float,
    plugin_timer: PluginTimer | None,
    name: str = "cache_aware",
    cpu_load_tps: float = 0.0,
) -> Pipeline:
    w = {**DEFAULT_WEIGHTS, **weights}
    unknown = set(w) - set(DEFAULT_WEIGHTS)
    if unknown:
        raise ValueError(f"unknown scorer(s) in weights: {sorted(unknown)}; known: {sorted(DEFAULT_WEIGHTS)}")
    scorers: list[tuple[Scorer, float]] = [
        (EstimatedTTFTScorer(cpu_credit=cpu_credit, cpu_load_tps=cpu_load_tps), w["estimated-ttft"]),
        (CacheChurnScorer(), w["cache-churn"]),
        (PrefixCacheScorer(cpu_credit=cpu_credit, cpu_load_tps=cpu_load_tps), w["prefix-cache"]),
        (QueueDepthScorer(), w["queue-depth"]),
        (KVUsageScorer(), w["kv-usage"]),
        (TailLatencyScorer(), w["tail-latency"]),
        (SessionAffinityScorer(), w["session-affinity"]),
    ]
    return Pipeline(
        name, scorers, [SessionBoundedLoadFilter(load_factor)], rng=rng, plugin_timer=plugin_timer
    )


def _prefix_only(rng: random.Random, cpu_credit: float, plugin_timer: PluginTimer | None) -> Pipeline:
    """Pure affinity, no load term: the baseline that shows why load must be in the score."""
    return Pipeline(
        "prefix_only", [(PrefixCacheScorer(cpu_credit=cpu_credit), 1.0)], rng=rng, plugin_timer=plugin_timer
    )


SimpleFactory = Callable[[random.Random], Policy]
SIMPLE: dict[str, SimpleFactory] = {
    "round_robin": RoundRobin,
    "random": RandomPolicy,
    "least_loaded": LeastLoaded,
    "power_of_two": PowerOfTwo,
}
POLICIES: tuple[str, ...] = (*SIMPLE, "cache_aware", "prefix_only")


def build_policy(
    name: str,
    *,
    rng: random.Random | None = None,
    weights: Mapping[str, float] | None = None,
    load_factor: float = 4.0,
    cpu_credit: float = 0.8,
    plugin_timer: PluginTimer | None = None,
    cpu_load_tps: float = 0.0,
) -> Policy:
    rng = rng or random.Random()
    if name in SIMPLE:
        return SIMPLE[name](rng)
    if name == "cache_aware":
        return _cache_aware(
            rng, weights or {}, load_factor, cpu_credit, plugin_timer, cpu_load_tps=cpu_load_tps
        )
    if name == "prefix_only":
        return _prefix_only(rng, cpu_credit, plugin_timer)
    raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")
