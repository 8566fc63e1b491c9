"""The cache_aware pipeline in two passes over the candidates, for the hot path.

``Pipeline.select`` runs one filter, seven scorers (each builds its own list, three through
``min_max_inverted``) and a picker: ~25 us per request for two replicas, the largest single
cost of a routed request (docs/benchmarks.md). ``CacheAwareKernel`` computes the same filter,
the same seven scores and the same weighted totals, reading each replica's fields once and
summing in the pipeline's order, so the totals are bit-for-bit the pipeline's and the picker
(same rng) picks the same replica: tests/router/test_fused.py checks that over random fleets.

The scorer modules stay the definition (their docstrings say what each term means and why);
this module only reorganises the arithmetic. ``kernel_for`` returns ``None`` for any other
plugin set (a custom pipeline, a peer emulation), which then runs as a plain pipeline, and the
pipeline itself still runs whenever a decision is explained or its plugins are timed, and for
weights that turn a scorer off.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from math import exp

from ..replicas.registry import Replica
from ..types import RequestInfo
from .base import Filter, Picker, Scorer
from .churn import CHURN_TAU_S, CacheChurnScorer
from .kv_usage import KVUsageScorer
from .latency import TailLatencyScorer
from .prefix import PrefixCacheScorer
from .queue import QueueDepthScorer
from .session import SessionAffinityScorer, SessionBoundedLoadFilter
from .ttft import EstimatedTTFTScorer, cpu_tier_credit

# The order the cache_aware pipeline sums its scorers in (policies._cache_aware): the kernel
# sums in the same order, so its float totals equal the pipeline's exactly.
_ORDER: tuple[type, ...] = (
    EstimatedTTFTScorer,
    CacheChurnScorer,
    PrefixCacheScorer,
    QueueDepthScorer,
    KVUsageScorer,
    TailLatencyScorer,
    SessionAffinityScorer,
)
_EPS = 1e-12  # min_max_inverted's and the scorers' "all equal" tolerance


def kernel_for(
    filters: Sequence[Filter], scorers: Sequence[tuple[Scorer, float]], picker: Picker
) -> CacheAwareKernel | None:
    """The kernel for exactly cache_aware's plugin set: its filter and all seven scorers, in its
    order (another order sums differently), each with a positive weight (the kernel adds every
    term; the pipeline drops a zero-weight scorer, and 0 x NaN is not 0). Else ``None``."""
    if len(filters) != 1 or type(filters[0]) is not SessionBoundedLoadFilter:
        return None
    if [type(s) for s, _ in scorers] != list(_ORDER) or any(not w > 0 for _, w in scorers):
        return None
    return CacheAwareKernel(filters[0], scorers, picker)


class CacheAwareKernel:
    """cache_aware's bounded-load filter, scorers, weighted sum and picker, fused."""

    def __init__(
        self, bounded: SessionBoundedLoadFilter, scorers: Sequence[tuple[Scorer, float]], picker: Picker
    ) -> None:
        self.load_factor = bounded.load_factor
        self.picker = picker
        w = {type(s): weight for s, weight in scorers}
        by_type = {type(s): s for s, _ in scorers}
        self.w_ttft = w.get(EstimatedTTFTScorer, 0.0)
        self.w_churn = w.get(CacheChurnScorer, 0.0)
        self.w_prefix = w.get(PrefixCacheScorer, 0.0)
        self.w_queue = w.get(QueueDepthScorer, 0.0)
        self.w_kv = w.get(KVUsageScorer, 0.0)
        self.w_tail = w.get(TailLatencyScorer, 0.0)
        self.w_session = w.get(SessionAffinityScorer, 0.0)
        ttft = by_type.get(EstimatedTTFTScorer)
        self.ttft = ttft if isinstance(ttft, EstimatedTTFTScorer) else EstimatedTTFTScorer()
        prefix = by_type.get(PrefixCacheScorer)
        self.prefix = prefix if isinstance(prefix, PrefixCacheScorer) else PrefixCacheScorer()
        churn = by_type.get(CacheChurnScorer)
        self.tau_s = churn.tau_s if isinstance(churn, CacheChurnScorer) else CHURN_TAU_S
        session = by_type.get(SessionAffinityScorer)
        self.session = session if isinstance(session, SessionAffinityScorer) else SessionAffinityScorer()
        tail = by_type.get(TailLatencyScorer)
        self.quantile = tail.quantile if isinstance(tail, TailLatencyScorer) else 0.9

    def select(self, req: RequestInfo, candidates: Sequence[Replica], rng: random.Random) -> Replica:
        kept, queues = self._filter(req, candidates)
        totals = self._totals(req, kept, queues)
        return kept[self.picker.pick(totals, kept, rng)]

    def _filter(self, req: RequestInfo, replicas: Sequence[Replica]) -> tuple[Sequence[Replica], list[float]]:
        """SessionBoundedLoadFilter, with each replica's queue depth read once and reused."""
        queues: list[float] = []
        for r in replicas:
            f = r.in_flight
            e = r.engine_queue
            queues.append(f if f > e else e)
        n = len(replicas)
        if n < 2:
            return replicas, queues
        total = sum(queues)
        limit = self.load_factor * (total + 1) / n
        idx = [i for i in range(n) if queues[i] + 1 <= limit]
        if not idx or len(idx) == n:
            return replicas, queues
        h = req.session_home
        if h >= 0 and not req.session_keep * req.session_overlap <= 0.0:  # as session.py, NaN too
            home = next((i for i in range(n) if replicas[i].slot == h), -1)
            if home >= 0 and home not in idx and queues[home] + 1 <= self.load_factor * (total / n + 1):
                idx.append(home)
        return [replicas[i] for i in idx], [queues[i] for i in idx]

    def _totals(self, req: RequestInfo, kept: Sequence[Replica], queues: list[float]) -> list[float]:
        # Seven scorers' terms read off one pass over the replicas and summed in a second; split
        # into functions it would be the pipeline again (a call and a list per term). Every term
        # is added even at weight 0: t + 0.0 is t, bit for bit.
        n_tok = req.prompt_tokens
        bs = req.block_size
        gpu = req.gpu_blocks
        anyt = req.any_tier_blocks
        ng = len(gpu)
        total_blocks = len(req.block_hashes)
        uncertain = req.uncertain_slots
        ttft = self.ttft
        fallback = ttft.cpu_credit
        load_tps = ttft.cpu_load_tps
        p_fallback = self.prefix.cpu_credit
        p_load_tps = self.prefix.cpu_load_tps
        discount = self.prefix.uncertain_discount
        step_s = ttft.step_s
        measured = [r.prefill_tps for r in kept if r.prefill_tps]
        default_rate = sum(measured) / len(measured) if measured else ttft.default_rate
        now = req.now
        tau = self.tau_s
        q = self.quantile
        ests: list[float] = []
        churns: list[float] = []
        caps: list[int] = []
        min_cap = 1
        prefixes: list[float] = []
        usages: list[float] = []
        tails: list[float] = []
        for r in kept:
            s = r.slot
            if s < ng:
                gb = gpu[s]
                ab = anyt[s]
            else:
                gb = ab = 0
            rate = r.prefill_tps or default_rate
            g = gb * bs
            a = ab * bs
            if g > n_tok:
                g = n_tok
            if a > n_tok:
                a = n_tok
            if a > g:
                credit = cpu_tier_credit(rate, r.cpu_load_tps or load_tps, fallback)
                uncached: float = n_tok - g - credit * (a - g)
            else:
                uncached = float(n_tok - g)
            running = r.engine_running
            f = r.in_flight
            busy = f if running is None or running < f else running
            ests.append((r.pending_prefill_tokens + uncached) / rate + step_s * busy)
            if total_blocks:
                if ab > gb:
                    credit = cpu_tier_credit(r.prefill_tps, r.cpu_load_tps or p_load_tps, p_fallback)
                    v = (gb + credit * (ab - gb)) / total_blocks
                else:
                    v = gb / total_blocks
                if s in uncertain:
                    v *= discount
                prefixes.append(0.0 if v < 0.0 else 1.0 if v > 1.0 else v)
            else:
                prefixes.append(1.0)
            churn = r.churn_tokens  # Replica.churn, inline
            dt = now - r.churn_at
            if dt > 0 and churn != 0.0:
                churn *= exp(-dt / tau)
            churns.append(churn)
            cap = (r.num_gpu_blocks or 0) * (r.block_size or bs)
            if cap < min_cap:
                min_cap = cap
            caps.append(cap)
            u = r.kv_usage or 0.0  # min(1, max(0, u)) as kv_usage.py, NaN included
            usages.append(u if 0.0 < u <= 1.0 else 1.0 if u > 1.0 else 0.0)
            tails.append(r.tail_ttft(q))
        # the share of its KV capacity; raw tokens for every replica when some capacity is unknown
        fills = churns if min_cap <= 0 else [c / cap for c, cap in zip(churns, caps, strict=True)]
        e_lo = min(ests)
        e_flat = max(ests) - e_lo <= _EPS
        if e_lo < 1e-9:
            e_lo = 1e-9
        f_lo, f_hi = min(fills), max(fills)
        f_span = f_hi - f_lo
        q_lo, q_hi = min(queues), max(queues)
        q_span = q_hi - q_lo
        u_flat = max(usages) - min(usages) <= _EPS
        t_lo, t_hi = min(tails), max(tails)
        t_span = t_hi - t_lo
        sessions = None
        if req.session_id is not None:  # the scorer itself (rarely set), clamped as the pipeline does
            sessions = [0.0 if v < 0.0 else 1.0 if v > 1.0 else v for v in self.session.score(req, kept)]
        w_ttft, w_churn, w_prefix, w_queue = self.w_ttft, self.w_churn, self.w_prefix, self.w_queue
        w_kv, w_tail, w_session = self.w_kv, self.w_tail, self.w_session
        totals = []
        for i in range(len(kept)):
            e = ests[i]
            t = w_ttft * (1.0 if e_flat else e_lo / (1e-9 if e < 1e-9 else e))  # max(e, 1e-9)
            t = t + w_churn * (1.0 if f_span <= _EPS else (f_hi - fills[i]) / f_span)
            t = t + w_prefix * prefixes[i]
            t = t + w_queue * (1.0 if q_span <= _EPS else (q_hi - queues[i]) / q_span)
            t = t + w_kv * (1.0 if u_flat else 1.0 - usages[i])
            t = t + w_tail * (1.0 if t_span <= _EPS else (t_hi - tails[i]) / t_span)
            totals.append(t + w_session * (1.0 if sessions is None else sessions[i]))
        return totals
