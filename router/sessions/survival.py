"""How much of a paused session's KV its home replica probably still holds.

vLLM evicts cached blocks in LRU order (free-queue order: the least recently used block that no
running request holds goes first). A session's blocks were last used when its last turn ran;
every block the replica writes after that is *newer* and pushes them towards eviction. Once the
replica has written about ``capacity - session_blocks`` newer blocks the session's oldest blocks
start to go, and after ``capacity`` newer blocks none is left::

    written   = turnover_r(now) - turnover_r(at the session's last turn)     (blocks)
    surviving = clamp((capacity_r - written) / session_blocks, 0, 1)         (expected fraction)

``turnover_r`` is the replica's cumulative count of blocks written: the uncached prompt blocks and
the output blocks this router dispatched to it (the ``TurnoverMeter``), or the engine's own count
where one is measured (``BlockStored`` events, which the KV-event layer can feed in). It misses
blocks that other traffic *re-used* (a hit moves an old block ahead of the session's without
writing one), so it errs towards "still there"; the scorer treats the result as a probability.

With KV events the estimate is not used: the index's match of the session's prompt on its home is
what the engine reported (see ``tracker.py``).
"""

from __future__ import annotations

from ..types import ReplicaId


def surviving_fraction(written_since: float, session_blocks: int, capacity_blocks: int) -> float:
    if session_blocks <= 0:
        return 0.0
    if capacity_blocks <= 0:
        return 1.0  # capacity unknown: no basis to predict an eviction
    v = (capacity_blocks - written_since) / session_blocks
    return 0.0 if v <= 0.0 else 1.0 if v >= 1.0 else v


class TurnoverMeter:
    """Cumulative blocks written per replica (monotonic counters, one float per replica)."""

    __slots__ = ("_written",)

    def __init__(self) -> None:
        self._written: dict[ReplicaId, float] = {}

    def add(self, replica: ReplicaId, blocks: float) -> float:
        v = self._written.get(replica, 0.0) + blocks
        self._written[replica] = v
        return v

    def written(self, replica: ReplicaId) -> float:
        return self._written.get(replica, 0.0)

    def forget(self, replica: ReplicaId) -> None:
        self._written.pop(replica, None)
