"""tail-latency: steer away from replicas whose recent p90 TTFT is high.

    t_r = p90 of the replica's last 64 TTFTs (0 when none yet)
    score_r = (max t - t_r) / (max t - min t)       (all 1.0 when equal)

Catches what counts cannot: a replica that is slow for reasons the router does not model (noisy
neighbour, thermal throttling, long prompts stuck in its queue). Category: balance.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from ..replicas.registry import Replica
from ..types import RequestInfo
from .base import min_max_inverted


class TailLatencyScorer:
    type_name: ClassVar[str] = "tail-latency"

    def __init__(self, quantile: float = 0.9) -> None:
        self.quantile = quantile

    def score(self, req: RequestInfo, replicas: Sequence[Replica]) -> list[float]:
        return min_max_inverted([r.tail_ttft(self.quantile) for r in replicas])
