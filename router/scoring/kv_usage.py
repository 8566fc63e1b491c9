"""kv-usage: prefer replicas with free KV cache (fewer preemptions, room for this prompt).

    score_r = 1 - kv_usage_r        (vllm:kv_cache_usage_perc in [0, 1]; unknown counts as 0)

Neutral when all replicas report the same usage. Category: balance.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from ..replicas.registry import Replica
from ..types import RequestInfo


class KVUsageScorer:
    type_name: ClassVar[str] = "kv-usage"

    def score(self, req: RequestInfo, replicas: Sequence[Replica]) -> list[float]:
        usage = [min(1.0, max(0.0, r.kv_usage or 0.0)) for r in replicas]
        if max(usage) - min(usage) <= 1e-12:
            return [1.0] * len(replicas)
        return [1.0 - u for u in usage]
