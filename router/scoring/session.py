"""session-affinity: a session's next turn goes back to the replica holding its KV.

(Also ``SessionBoundedLoadFilter``, the bounded-load filter of ``cache_aware``: the plain rule with
a session's home kept while the affinity term wants it and it is not overloaded in absolute terms.)

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
from .guard import BoundedLoadFilter


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


class SessionBoundedLoadFilter(BoundedLoadFilter):
    """bounded-load, except that a session's home that still holds its KV stays a candidate while

        load_home + 1 <= load_factor * (total_load / n + 1)

    The plain rule's limit, ``load_factor * (total_load + 1) / n``, is relative: at light load
    (a fleet-wide handful of requests) it removes any replica running two or three of them. For a
    session's turn that is the wrong trade: leaving the home recomputes the session's whole
    history elsewhere (tens of thousands of tokens), while staying waits behind a few requests
    that share the batch. Measured on the agentic workload (docs/sessions.md), light load, medium
    pauses: the plain rule moved 830 of 10,800 later turns off a home holding their KV (turns
    that moved missed ~60% of their prompt, turns that stayed 4%). The home's limit adds one
    request of headroom per replica to the fair share, so a home is left for load only when it runs ``load_factor`` times more than an average replica
    plus one; then the estimated-TTFT and queue scorers weigh the wait against the recompute.
    Requests without a session home (``session_home < 0``), whose home lost its KV, or whose
    prompt does not extend the session's last one (``keep x overlap`` 0, e.g. a user key on
    single-turn requests) are filtered exactly as before: non-session traffic routes as it did.
    """

    type_name: ClassVar[str] = "bounded-load"

    def filter(self, req: RequestInfo, replicas: Sequence[Replica]) -> Sequence[Replica]:
        kept = super().filter(req, replicas)
        h = req.session_home
        if h < 0 or req.session_keep * req.session_overlap <= 0.0 or len(kept) == len(replicas):
            return kept
        home = next((r for r in replicas if r.slot == h), None)
        if home is None or any(r is home for r in kept):
            return kept
        n = len(replicas)
        total = sum(r.queue_depth for r in replicas)
        if home.queue_depth + 1 <= self.load_factor * (total / n + 1):
            return [*kept, home]
        return kept
