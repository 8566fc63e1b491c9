"""prefix-cache: how much of the prompt a replica already holds.

    score_r = (gpu_r + credit_r * (any_r - gpu_r)) / total_blocks

``credit_r`` is what a CPU-tier block saves against recomputing it (ttft.cpu_tier_credit: from
the replica's measured prefill and load rates, ``cpu_credit`` until both are known).

``gpu_r`` is the replica's contiguous cached prefix on GPU in blocks, ``any_r`` on GPU or CPU
(LMCache) tier: a CPU block still has to be loaded, so it earns partial credit. A replica whose
index is *uncertain* (``RequestInfo.uncertain_slots``) (missed KV events, not yet rebuilt) keeps only half its credit, so a stale
view cannot hold traffic on it. Neutral (all 1.0) when the request has no blocks.
Category: affinity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from ..replicas.registry import Replica
from ..types import RequestInfo
from .ttft import cpu_tier_credit


class PrefixCacheScorer:
    type_name: ClassVar[str] = "prefix-cache"

    def __init__(
        self, cpu_credit: float = 0.8, uncertain_discount: float = 0.5, cpu_load_tps: float = 0.0
    ) -> None:
        self.cpu_credit = cpu_credit
        self.cpu_load_tps = cpu_load_tps
        self.uncertain_discount = uncertain_discount

    def score(self, req: RequestInfo, replicas: Sequence[Replica]) -> list[float]:
        total = len(req.block_hashes)
        if total == 0:
            return [1.0] * len(replicas)
        gpu = req.gpu_blocks
        anyt = req.any_tier_blocks
        uncertain = req.uncertain_slots
        ng = len(gpu)
        fallback = self.cpu_credit
        load_tps = self.cpu_load_tps
        out = []
        for r in replicas:
            s = r.slot
            if s < ng:
                g = gpu[s]
                a = anyt[s]
            else:
                g = a = 0
            if a > g:
                v = (
                    g + cpu_tier_credit(r.prefill_tps, r.cpu_load_tps or load_tps, fallback) * (a - g)
                ) / total
            else:
                v = g / total
            if s in uncertain:
                v *= self.uncertain_discount
            out.append(v)
        return out
