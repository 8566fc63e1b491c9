"""cache-churn: send new prefixes where the cache is being overwritten least.

    churn_r = uncached prompt tokens routed to r, decayed with time constant tau (30 s)
    fill_r  = churn_r / KV capacity of r in tokens (num_gpu_blocks x block_size; raw tokens
              for every replica when some capacity is unknown)
    score_r = (max fill - fill_r) / (max fill - min fill)        (all 1.0 when equal)

Why: every uncached token routed to a replica evicts a cached one once its cache is full. A
policy that only looks at hits and queues keeps sending *new* conversations to whichever
replica happens to win ties, and that replica's cache turns over while the others' sit idle,
so the fleet holds far less than its total capacity (the oracle's upper bound). Balancing the
rate of new tokens per unit of cache spreads the working set over the whole fleet, and it
balances prefill compute too. A request with a long hit still goes home: the prefix-cache and
estimated-TTFT scorers outweigh this one there. Category: balance.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from ..replicas.registry import Replica
from ..types import RequestInfo
from .base import min_max_inverted

CHURN_TAU_S = 30.0


class CacheChurnScorer:
    type_name: ClassVar[str] = "cache-churn"

    def __init__(self, tau_s: float = CHURN_TAU_S) -> None:
        self.tau_s = tau_s

    def score(self, req: RequestInfo, replicas: Sequence[Replica]) -> list[float]:
        now = req.now
        tau = self.tau_s
        caps = [(r.num_gpu_blocks or 0) * (r.block_size or req.block_size) for r in replicas]
        if min(caps) > 0:
            fills = [r.churn(now, tau) / c for r, c in zip(replicas, caps, strict=True)]
        else:
            fills = [r.churn(now, tau) for r in replicas]
        return min_max_inverted(fills)
