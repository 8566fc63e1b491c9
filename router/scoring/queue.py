"""queue-depth: fewer requests ahead is better.

    q_r = max(router in-flight_r, engine running_r + waiting_r)
    score_r = (max q - q_r) / (max q - min q)          (all 1.0 when equal)

The router's own count reacts at dispatch (no scrape lag, so bursts spread); the engine's count
covers traffic from other router replicas. Category: distribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from ..replicas.registry import Replica
from ..types import RequestInfo
from .base import min_max_inverted


class QueueDepthScorer:
    type_name: ClassVar[str] = "queue-depth"

    def score(self, req: RequestInfo, replicas: Sequence[Replica]) -> list[float]:
        return min_max_inverted([r.queue_depth for r in replicas])
