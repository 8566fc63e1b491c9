"""session-affinity: a session's next turn goes back to the replica holding its KV.

    known session, home r_h:   score_{r_h} = keep,   every other replica 0
    new session (no home):     rendezvous(key, r) highest -> 1, every other replica 0
    no session, or keep = 0:   neutral (all 1.0)

``keep`` (``RequestInfo.session_keep``, filled by router/sessions/tracker.py) is the fraction of
the session's last prompt its home still holds: measured from KV events, else estimated from the
home's cache turnover during the pause. A home the bounded-load filter removed is not a candidate,
so an overloaded home loses the session (bounded load) and the other scorers place it; so does a
home whose KV is gone (keep 0): the prefix scorers then find the replica holding its system prompt
and tools. A new session goes to the highest-random-weight replica (rendezvous hashing of the key
over the candidates), which every router replica computes alike: several routers agree on a new
session's home without talking. The filters run first, so the shared-prefix and load terms still
weigh against it. Category: affinity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import xxhash

from ..replicas.registry import Replica
from ..types import RequestInfo


def rendezvous_weight(key: str, replica_id: str) -> int:
    return xxhash.xxh3_64_intdigest(replica_id.encode(), seed=xxhash.xxh3_64_intdigest(key.encode()))


class SessionAffinityScorer:
    type_name: ClassVar[str] = "session-affinity"

    def score(self, req: RequestInfo, replicas: Sequence[Replica]) -> list[float]:
        key = req.session_id
        n = len(replicas)
        if key is None:
            return [1.0] * n
        home = req.session_home
        if home >= 0:
            keep = req.session_keep
            out = [keep if r.slot == home else 0.0 for r in replicas]
            return out if keep > 0.0 and any(out) else [1.0] * n
        if home == -1:
            best = max(range(n), key=lambda i: rendezvous_weight(key, replicas[i].id))
            return [1.0 if i == best else 0.0 for i in range(n)]
        return [1.0] * n
