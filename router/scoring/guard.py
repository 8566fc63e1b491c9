"""bounded-load filter: no replica runs far above the mean while others have room.

    limit = load_factor * (total_load + 1) / n
    keep r  iff  load_r + 1 <= limit                    (load = queue depth, see queue.py)

The consistent-hashing-with-bounded-loads rule (KubeAI CHWBL, SGLang prefix_hash use 1.25): cache
affinity may concentrate traffic, but never beyond ``load_factor`` times the fair share. The
least-loaded replica always passes, so the filter never empties the set. Category: balance.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from ..replicas.registry import Replica
from ..types import RequestInfo


class BoundedLoadFilter:
    type_name: ClassVar[str] = "bounded-load"

    def __init__(self, load_factor: float = 4.0) -> None:
        self.load_factor = load_factor

    def filter(self, req: RequestInfo, replicas: Sequence[Replica]) -> Sequence[Replica]:
        n = len(replicas)
        if n < 2:
            return replicas
        loads = [r.queue_depth for r in replicas]
        limit = self.load_factor * (sum(loads) + 1) / n
        kept = [r for r, q in zip(replicas, loads, strict=True) if q + 1 <= limit]
        return kept or replicas
