"""session-affinity: a session's next turn goes back to the replica holding its KV.

    known session, home r_h:   score_{r_h} = keep * overlap,   every other replica 0
    new session (no home):     rendezvous(key, r) highest among the replicas with the least
                               prefill queued -> 1, every other replica 0
    no session, or keep * overlap = 0:   neutral (all 1.0)

``keep`` (``RequestInfo.session_keep``, filled by router/sessions/tracker.py) is the fraction of
the session's last prompt its home still holds: measured from KV events, else estimated from the
home's cache turnover during the pause. ``overlap`` (``RequestInfo.session_overlap``) is the share
of this prompt that is the session's last prompt, 0 when it does not extend it: affinity is worth
what the session's own history saves this request, so a key that names a *user* of single-turn
requests (the same system prompt and context, never a continuation) earns none, and a short chat
turn whose new text outweighs its history earns little; the prefix and estimated-TTFT scorers
price their shared prefix as for any request. A home the bounded-load filter removed is not a candidate,
so an overloaded home loses the session (bounded load) and the other scorers place it; so does a
home whose KV is gone (keep 0): the prefix scorers then find the replica holding its system prompt
and tools. A new session goes to the highest-random-weight replica (rendezvous hashing of the key)
among the candidates with the least prefill queued: it holds no KV anywhere yet, so its home is
worth the spread of sessions over the fleet's caches, never a wait behind another prompt (over
all candidates, first turns queued behind prefills and tenants' users were pulled off their
system prompt: up to 1.22x the best peer's p99 TTFT, docs/scenarios.md). At light load that is
every idle replica, which every router replica computes alike: several routers agree on a new
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
            keep = req.session_keep * req.session_overlap
            out = [keep if r.slot == home else 0.0 for r in replicas]
            return out if keep > 0.0 and any(out) else [1.0] * n
        if home == -1:
            lo = min(r.pending_prefill_tokens for r in replicas)
            free = [i for i in range(n) if replicas[i].pending_prefill_tokens <= lo]
            best = max(free, key=lambda i: rendezvous_weight(key, replicas[i].id))
            return [1.0 if i == best else 0.0 for i in range(n)]
        return [1.0] * n
