"""estimated-ttft: cache hit and load in one unit, seconds until this request's first token.

    uncached_r = prompt_tokens - gpu_hit_tokens_r - credit_r * cpu_only_hit_tokens_r
    credit_r   = 1 - rate_r / load_rate_r              (cpu_credit until load_rate_r is known)
    est_r      = (pending_prefill_r + uncached_r) / rate_r + step_s * running_r
    score_r    = min_r est_r / est_r                   (1 for the best; all 1.0 when equal)

A CPU-tier (LMCache) hit is not free: it is loaded at ``load_rate_r`` tokens/s instead of being
recomputed at ``rate_r``, so it saves ``1 - rate_r / load_rate_r`` of the recompute time; with
``cpu_only / load_rate`` added to the estimate instead, the formula above is the same thing.
``load_rate_r`` is the replica's measured load rate (``Replica.cpu_load_tps``, learned from the
TTFT of requests dispatched with a CPU-tier hit), else the configured ``lmcache.load_tps``.

``pending_prefill_r`` is the uncached prompt tokens this router dispatched to r that have not
produced a first token yet: the prefill work queued ahead. ``rate_r`` is r's measured prefill rate
(EWMA of uncached tokens / TTFT); until measured, the mean of the candidates' measured rates
(``default_rate`` when none is). ``running_r`` (the larger of engine running and router
in-flight) costs ``step_s`` each: decode steps interleave with prefill
chunks. This is the scorer that lets a long cache hit beat a short queue and a short queue beat a
small hit. Category: affinity + distribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from ..replicas.registry import Replica
from ..types import RequestInfo


def cpu_tier_credit(prefill_tps: float, load_tps: float, fallback: float) -> float:
    """Share of a token's recompute time that loading it from the CPU tier saves:
    ``1 - prefill_tps / load_tps`` in [0, 1]; ``fallback`` while either rate is unknown."""
    if prefill_tps <= 0 or load_tps <= 0:
        return fallback
    saved = 1.0 - prefill_tps / load_tps
    return 0.0 if saved < 0.0 else saved


class EstimatedTTFTScorer:
    type_name: ClassVar[str] = "estimated-ttft"

    def __init__(
        self,
        cpu_credit: float = 0.8,
        default_rate: float = 20_000.0,
        step_s: float = 0.0005,
        cpu_load_tps: float = 0.0,
    ) -> None:
        self.cpu_credit = cpu_credit
        self.cpu_load_tps = cpu_load_tps
        self.default_rate = default_rate
        self.step_s = step_s

    def estimates(self, req: RequestInfo, replicas: Sequence[Replica]) -> list[float]:
        bs = req.block_size
        n = req.prompt_tokens
        gpu = req.gpu_blocks
        anyt = req.any_tier_blocks
        ng = len(gpu)
        fallback = self.cpu_credit
        load_tps = self.cpu_load_tps
        # A replica whose rate is not measured yet borrows the mean of the measured ones: with a
        # fixed default, a fast measured replica would look faster than its idle peers forever.
        measured = [r.prefill_tps for r in replicas if r.prefill_tps]
        default_rate = sum(measured) / len(measured) if measured else self.default_rate
        step_s = self.step_s
        out = []
        for r in replicas:
            s = r.slot
            if s < ng:
                g = gpu[s] * bs
                a = anyt[s] * bs
                if g > n:
                    g = n
                if a > n:
                    a = n
                if a > g:
                    credit = cpu_tier_credit(
                        r.prefill_tps or default_rate, r.cpu_load_tps or load_tps, fallback
                    )
                    uncached = n - g - credit * (a - g)
                else:
                    uncached = float(n - g)
            else:
                uncached = float(n)
            running = r.engine_running
            f = r.in_flight
            busy = f if running is None or running < f else running
            out.append(
                (r.pending_prefill_tokens + uncached) / (r.prefill_tps or default_rate) + step_s * busy
            )
        return out

    def score(self, req: RequestInfo, replicas: Sequence[Replica]) -> list[float]:
        est = self.estimates(req, replicas)
        lo = min(est)
        if max(est) - lo <= 1e-12:
            return [1.0] * len(est)
        lo = max(lo, 1e-9)
        return [lo / max(e, 1e-9) for e in est]
