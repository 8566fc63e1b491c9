"""Emulations of peer routers' policies, for evaluation only (never shipped in ``router/``).

Each class implements kvrouter's ``Policy`` protocol (``name``, ``needs_match``,
``select(req, candidates, explain=None)``) so ``kvrouter simulate --policy sglang_cache_aware``
runs it against the same fleet, trace and engine model as our own policies. The sources are the
sections of docs/reference/peers.md named in each docstring; the limits of each emulation
are stated there and in docs/offline-simulator.md.

Common stand-in: peers that match on raw characters (SGLang, vLLM router ``cache_aware``) match
here on the request's *block ids*, one id standing for one 512-token (trace) block, and the match
rate is matched tokens / prompt tokens. That is kinder to them than characters would be in one way
(no tokenizer/template mismatch, issue class 6 in peers.md §8) and equal in the other (a block
boundary is as coarse as a differing character).
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable, Sequence
from typing import ClassVar

import xxhash

from router.index import PrefixIndex
from router.replicas.registry import Replica
from router.scoring.base import min_max_inverted
from router.scoring.kv_usage import KVUsageScorer
from router.scoring.pipeline import Explanation, Pipeline
from router.scoring.policies import Policy, PowerOfTwo
from router.scoring.prefix import PrefixCacheScorer
from router.types import ReplicaId, RequestInfo

_HUGE = 1 << 40  # "unbounded" capacity of an approximate tree between eviction cycles


class ApproxTreeCacheAware:
    """SGLang Model Gateway ``cache_aware`` (peers.md §2; sgl-model-gateway policies/cache_aware.rs).

    Per request, with load = the router's own in-flight count per worker::

        imbalanced = max_load - min_load > balance_abs_threshold
                     and max_load > min_load * balance_rel_threshold
        imbalanced          -> the min-load worker (first of equal loads, as Rust's min_by_key)
        else match_rate = longest prefix match over all workers' approximate trees / prompt
             match_rate > cache_threshold -> a worker holding that longest match
             otherwise                   -> the min-load worker
        either way the chosen worker's tree gets the whole prompt (optimistic insert)

    The approximate tree never hears from the engine: it only knows what was routed where, and it
    forgets only by its periodic LRU eviction (every ``eviction_interval_s``, each worker's tree
    is cut to ``max_tree_size`` characters, least recently used first). Here the tree is a private
    ``PrefixIndex`` of block ids, and ``max_tree_size`` characters are converted to blocks at
    ``chars_per_token`` characters per token.

    Defaults are the CLI defaults (peers.md §2: 0.3 / 64 / 1.5, 120 s, 67,108,864 chars). Limits:
    the tie among workers sharing the longest match is broken at random (the Rust tree returns the
    first tenant of a concurrent hash map: arbitrary); the tree is per model, one model here.
    """

    needs_match = False  # it keeps its own tree: the router's index and speculation stay unused

    def __init__(
        self,
        rng: random.Random,
        clock: Callable[[], float],
        *,
        name: str = "sglang_cache_aware",
        cache_threshold: float = 0.3,
        balance_abs_threshold: int = 64,
        balance_rel_threshold: float = 1.5,
        eviction_interval_s: float = 120.0,
        max_tree_size: int = 67_108_864,
        chars_per_token: int = 4,
    ) -> None:
        self.name = name
        self.rng = rng
        self.clock = clock
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.eviction_interval_s = eviction_interval_s
        self.max_tree_size = max_tree_size
        self.chars_per_token = chars_per_token
        self.tree = PrefixIndex(capacity_per_replica=_HUGE, speculative_ttl_s=0.0, clock=clock)
        self._slots: dict[ReplicaId, int] = {}
        self._next_eviction = eviction_interval_s
        self.decisions = {"imbalanced": 0, "cache_hit": 0, "min_load": 0}

    def _slot(self, r: Replica) -> int:
        s = self._slots.get(r.id)
        if s is None:
            s = self._slots[r.id] = self.tree.add_replica(r.id)
        return s

    def _maybe_evict(self, block_size: int) -> None:
        now = self.clock()
        if self.eviction_interval_s <= 0 or now < self._next_eviction:
            return
        while self._next_eviction <= now:
            self._next_eviction += self.eviction_interval_s
        limit = max(1, self.max_tree_size // (self.chars_per_token * max(1, block_size)))
        for rid in self._slots:
            self.tree.set_capacity(rid, limit)  # drops the least recently inserted/touched blocks
            self.tree.set_capacity(rid, _HUGE)

    def select(
        self, req: RequestInfo, candidates: Sequence[Replica], explain: Explanation | None = None
    ) -> Replica:
        self._maybe_evict(req.block_size)
        loads = [r.in_flight for r in candidates]
        lo = min(loads)
        hi = max(loads)
        min_load = candidates[loads.index(lo)]
        imbalanced = hi - lo > self.balance_abs_threshold and hi > lo * self.balance_rel_threshold
        if imbalanced:
            choice = min_load
            self.decisions["imbalanced"] += 1
        else:
            matched, _ = self.tree.match(req.block_hashes) if req.block_hashes else ([], [])
            best = 0
            ties: list[Replica] = []
            for r in candidates:
                s = self._slot(r)
                m = matched[s] if s < len(matched) else 0
                if m > best:
                    best, ties = m, [r]
                elif m == best and m > 0:
                    ties.append(r)
            n = req.prompt_tokens
            rate = min(n, best * req.block_size) / n if n > 0 else 0.0
            if rate > self.cache_threshold and ties:
                choice = ties[0] if len(ties) == 1 else self.rng.choice(ties)
                self.decisions["cache_hit"] += 1
            else:
                choice = min_load
                self.decisions["min_load"] += 1
        if req.block_hashes:
            self._slot(choice)
            self.tree.store(choice.id, req.block_hashes)
        if explain is not None:
            explain.chosen = choice.id
        return choice


class ConsistentHash:
    """vLLM router ``consistent_hash`` (peers.md §3; vllm-project/router policies/consistent_hash.rs).

    A ring of 160 virtual nodes per worker; the key is the session id when the client sends one
    (``X-Session-ID`` and friends; here the trace's ``session_id``, set by the simulator through
    ``set_session``), else a hash of the whole request body, i.e. a different key per distinct
    prompt. No load term. Limit: the ring hash is xxh3 instead of the router's furc/murmur hash (same
    uniformity, different placement).
    """

    needs_match = False
    VNODES = 160

    def __init__(
        self, rng: random.Random, clock: Callable[[], float], *, name: str = "vllm_consistent_hash"
    ) -> None:
        self.name = name
        self._session: str | None = None
        self._ring_for: tuple[str, ...] = ()
        self._points: list[int] = []
        self._owners: list[str] = []

    def set_session(self, session_id: str | None) -> None:
        self._session = session_id

    def _ring(self, candidates: Sequence[Replica]) -> None:
        ids = tuple(r.url for r in candidates)
        if ids == self._ring_for:
            return
        pts = sorted(
            (xxhash.xxh3_64_intdigest(f"{url}:{i}".encode()), url) for url in ids for i in range(self.VNODES)
        )
        self._points = [p for p, _ in pts]
        self._owners = [u for _, u in pts]
        self._ring_for = ids

    def select(
        self, req: RequestInfo, candidates: Sequence[Replica], explain: Explanation | None = None
    ) -> Replica:
        self._ring(candidates)
        if self._session is not None:
            key = xxhash.xxh3_64_intdigest(b"session:" + self._session.encode())
        else:
            h = xxhash.xxh3_64()
            h.update(req.prompt_tokens.to_bytes(8, "little"))
            for b in req.block_hashes:
                h.update((b & ((1 << 64) - 1)).to_bytes(8, "little"))
            key = h.intdigest()
        k = bisect.bisect_left(self._points, key)
        url = self._owners[k % len(self._owners)]
        choice = next(r for r in candidates if r.url == url)
        if explain is not None:
            explain.chosen = choice.id
        return choice


class PowerOfTwoInFlight(PowerOfTwo):
    """vLLM router ``power_of_two`` (peers.md §3; policies/power_of_two.rs): two distinct random
    workers, the one with the lower load (ties to the first drawn). Load = router in-flight; the
    optional cached ``/get_loads`` poll (every 5 s) is left out: vLLM engines do not serve it.
    That is kvrouter's own ``power_of_two``, under the peer's name."""

    def __init__(
        self, rng: random.Random, clock: Callable[[], float] | None = None, *, name: str = "vllm_power_of_two"
    ) -> None:
        super().__init__(rng)
        self.name = name


class WaitingQueueScorer:
    """llm-d ``queue-scorer`` (peers.md §6): ``(max_q - q) / (max_q - min_q)`` on the engine's
    scraped *waiting* queue only (all 1.0 when equal)."""

    type_name: ClassVar[str] = "llmd-queue"

    def score(self, req: RequestInfo, replicas: Sequence[Replica]) -> list[float]:
        return min_max_inverted([r.engine_waiting or 0.0 for r in replicas])


def llmd_default(rng: random.Random, clock: Callable[[], float]) -> Policy:
    """llm-d / Gateway API Inference Extension default profile (peers.md §6, GIE chart):
    prefix-cache 3, queue 2, kv-cache-utilization 2, max-score picker with random tie-break.
    The prefix scorer reads kvrouter's index (speculative inserts, confirmed by KV events when the
    simulation has them: llm-d's precise mode; approximate mode otherwise)."""
    return Pipeline(
        "llmd_default",
        [(PrefixCacheScorer(), 3.0), (WaitingQueueScorer(), 2.0), (KVUsageScorer(), 2.0)],
        rng=rng,
    )


# --- session features (issue 19; pd-agentic-failures.md §2) ---------------------------------------
#
# The simulator calls ``set_session(trace_request.session_id)`` right before each ``select`` on a
# policy that has the method (traces/simulate.py ``run_policy``), which stands for the session key
# the peer would read from ``x-session-id`` / ``x-smg-routing-key`` / the echoed ``x-session-token``.


def _rendezvous(key: str, url: str) -> int:
    return xxhash.xxh3_64_intdigest(f"{key}:{url}".encode())


class StickyLeastLoaded:
    """vllm-router ``sticky_least_loaded`` (vllm-project/router src/policies/sticky_least_loaded.rs).

    Per request, with S(r) = number of *active sessions* assigned to replica r::

        session known and its replica healthy -> that replica (last access refreshed)
        otherwise (new session, or home gone)  -> a replica with the fewest active sessions,
                                                  ties by rendezvous hash of (session id, url),
                                                  and the session is recorded there
        no session id                          -> fewest active sessions, not recorded

    Sessions expire ``session_ttl_s`` after their last request (default 7200 s,
    ``VLLM_ROUTER_SLL_SESSION_EXPIRATION_IN_S``); the sweep runs at most every 60 s. No load term
    other than the session count: in-flight requests, queues and KV are never read, and a home is
    never left while it is healthy. ``finish_session`` exists upstream but no client in a trace
    calls it, so sessions end by expiry only. Limits: the tie-break hash is xxh3 instead of the
    router's ``fbi_hash`` (same rule, different placement); a stateless request's tie-break key is
    a hash of its block ids instead of its body text.
    """

    needs_match = False
    SWEEP_INTERVAL_S = 60.0

    def __init__(
        self,
        rng: random.Random,
        clock: Callable[[], float],
        *,
        name: str = "vllm_sticky_least_loaded",
        session_ttl_s: float = 7200.0,
    ) -> None:
        self.name = name
        self.clock = clock
        self.session_ttl_s = session_ttl_s
        self._session: str | None = None
        self.sessions: dict[str, tuple[str, float]] = {}  # session -> (replica url, last access)
        self.active: dict[str, int] = {}  # replica url -> active sessions
        self._last_sweep = clock()

    def set_session(self, session_id: str | None) -> None:
        self._session = session_id

    def _uncount(self, url: str) -> None:
        n = self.active.get(url, 0) - 1
        if n > 0:
            self.active[url] = n
        else:
            self.active.pop(url, None)

    def _sweep(self, now: float) -> None:
        if now - self._last_sweep < self.SWEEP_INTERVAL_S:
            return
        for key, (url, last) in list(self.sessions.items()):
            if now - last >= self.session_ttl_s:
                del self.sessions[key]
                self._uncount(url)
        self._last_sweep = now

    def _least_loaded(self, candidates: Sequence[Replica], key: str) -> Replica:
        low = min(self.active.get(r.url, 0) for r in candidates)
        return max(
            (r for r in candidates if self.active.get(r.url, 0) == low), key=lambda r: _rendezvous(key, r.url)
        )

    def select(
        self, req: RequestInfo, candidates: Sequence[Replica], explain: Explanation | None = None
    ) -> Replica:
        now = self.clock()
        self._sweep(now)
        key = self._session
        if key is None:
            choice = self._least_loaded(candidates, str(hash(tuple(req.block_hashes))))
        else:
            entry = self.sessions.get(key)
            home = None
            if entry is not None:
                home = next((r for r in candidates if r.url == entry[0]), None)
                if home is None:  # assigned replica gone: drop the mapping and re-place
                    del self.sessions[key]
                    self._uncount(entry[0])
            if home is not None:
                choice = home
            else:
                choice = self._least_loaded(candidates, key)
                self.active[choice.url] = self.active.get(choice.url, 0) + 1
            self.sessions[key] = (choice.url, now)
        if explain is not None:
            explain.chosen = choice.id
        return choice


class StickyRoutingKey:
    """SGLang Model Gateway sticky sessions (``--sticky-sessions`` = routing-key override; smg
    main.rs / RoutingKeyOverrideConfig, pd-agentic-failures.md §2).

    The routing key is the session (body ``rid`` with turn/retry suffixes stripped, else the
    ``x-smg-routing-key`` header; here the trace's ``session_id``). With the default assignment
    mode ``delegate``, a first-seen key is routed by the underlying policy (the gateway's default
    ``cache_aware``, emulated by ``ApproxTreeCacheAware``) and then pinned: every later request
    with that key goes to the pinned worker without consulting the policy, whatever its load, until
    the key has been idle ``max_idle_s`` (14,400 s; swept every ``eviction_interval_s``) or the
    worker leaves. Requests without a key go to the underlying policy. Limit: pinned requests do
    not update the underlying approximate tree (the override answers before the policy runs), which
    is our reading of the override path.
    """

    needs_match = False

    def __init__(
        self,
        rng: random.Random,
        clock: Callable[[], float],
        *,
        name: str = "sglang_sticky",
        inner: Policy | None = None,
        max_idle_s: float = 14_400.0,
        eviction_interval_s: float = 60.0,
    ) -> None:
        self.name = name
        self.clock = clock
        self.inner: Policy = inner if inner is not None else ApproxTreeCacheAware(rng, clock)
        self.needs_match = bool(self.inner.needs_match)
        self.max_idle_s = max_idle_s
        self.eviction_interval_s = eviction_interval_s
        self._session: str | None = None
        self.pins: dict[str, tuple[str, float]] = {}  # key -> (replica url, last seen)
        self._next_eviction = clock() + eviction_interval_s
        self.decisions = {"pinned": 0, "delegated": 0}

    def set_session(self, session_id: str | None) -> None:
        self._session = session_id

    def _evict(self, now: float) -> None:
        if now < self._next_eviction:
            return
        self._next_eviction = now + self.eviction_interval_s
        for key, (_url, last) in list(self.pins.items()):
            if now - last >= self.max_idle_s:
                del self.pins[key]

    def select(
        self, req: RequestInfo, candidates: Sequence[Replica], explain: Explanation | None = None
    ) -> Replica:
        now = self.clock()
        self._evict(now)
        key = self._session
        pin = self.pins.get(key) if key is not None else None
        choice = next((r for r in candidates if r.url == pin[0]), None) if pin is not None else None
        if choice is None:
            choice = self.inner.select(req, candidates, None)
            self.decisions["delegated"] += 1
        else:
            self.decisions["pinned"] += 1
        if key is not None:
            self.pins[key] = (choice.url, now)
        if explain is not None:
            explain.chosen = choice.id
        return choice


class SessionAffinityScorer:
    """llm-d ``session-affinity-scorer`` (scorer/sessionaffinity/session_affinity.go): the pod named
    by the request's ``x-session-token`` (which the previous response set to the pod that served
    it, and the client echoes) scores 1.0, every other pod 0. ``token`` is that echoed value, set
    by ``LlmdSessionAffinity`` per request."""

    type_name: ClassVar[str] = "llmd-session-affinity"

    def __init__(self) -> None:
        self.token: str | None = None

    def score(self, req: RequestInfo, replicas: Sequence[Replica]) -> list[float]:
        tok = self.token
        return [1.0 if r.url == tok else 0.0 for r in replicas]


class LlmdSessionAffinity:
    """llm-d's default scheduling profile (prefix-cache 3, queue 2, kv-cache-utilization 2; see
    ``llmd_default``) plus the ``session-affinity-scorer`` at ``affinity_weight``.

    The session token is the pod that answered the session's previous request, so a session follows
    its last placement; with a weight of 3 (equal to the prefix scorer; llm-d ships no default
    weight for it) the affinity outweighs neither a full prefix hit elsewhere plus an idle queue
    nor a saturated home. Limits: the token is kept here per session id instead of round-tripping
    through response headers (same effect for a client that echoes it); tokens never expire
    (llm-d's are stateless, so neither do theirs).
    """

    needs_match = True

    def __init__(
        self,
        rng: random.Random,
        clock: Callable[[], float],
        *,
        name: str = "llmd_session_affinity",
        affinity_weight: float = 3.0,
    ) -> None:
        self.name = name
        self.affinity = SessionAffinityScorer()
        self.pipeline = Pipeline(
            name,
            [
                (PrefixCacheScorer(), 3.0),
                (WaitingQueueScorer(), 2.0),
                (KVUsageScorer(), 2.0),
                (self.affinity, affinity_weight),
            ],
            rng=rng,
        )
        self._session: str | None = None
        self.tokens: dict[str, str] = {}  # session -> url of the pod that served its last request

    def set_session(self, session_id: str | None) -> None:
        self._session = session_id

    def select(
        self, req: RequestInfo, candidates: Sequence[Replica], explain: Explanation | None = None
    ) -> Replica:
        key = self._session
        self.affinity.token = self.tokens.get(key) if key is not None else None
        choice = self.pipeline.select(req, candidates, explain)
        if key is not None:
            self.tokens[key] = choice.url
        return choice


def _sglang(rng: random.Random, clock: Callable[[], float]) -> Policy:
    return ApproxTreeCacheAware(rng, clock)


def _vllm_cache_aware(rng: random.Random, clock: Callable[[], float]) -> Policy:
    # vllm-project/router is a fork of the SGLang gateway; its cache_aware is the same code
    # (peers.md §3), with the same CLI defaults.
    return ApproxTreeCacheAware(rng, clock, name="vllm_cache_aware")


def _vllm_consistent_hash(rng: random.Random, clock: Callable[[], float]) -> Policy:
    return ConsistentHash(rng, clock)


def _vllm_power_of_two(rng: random.Random, clock: Callable[[], float]) -> Policy:
    return PowerOfTwoInFlight(rng, clock)


PEER_POLICIES: dict[str, Callable[[random.Random, Callable[[], float]], Policy]] = {
    "sglang_cache_aware": _sglang,
    "vllm_cache_aware": _vllm_cache_aware,
    "vllm_consistent_hash": _vllm_consistent_hash,
    "vllm_power_of_two": _vllm_power_of_two,
    "llmd_default": llmd_default,
    "vllm_sticky_least_loaded": lambda rng, clock: StickyLeastLoaded(rng, clock),
    "sglang_sticky": lambda rng, clock: StickyRoutingKey(rng, clock),
    "llmd_session_affinity": lambda rng, clock: LlmdSessionAffinity(rng, clock),
}
