"""LMCache tiers shared by several replicas: one CPU tier, credited to every replica attached to it.

An LMCache MP server (``python -m lmcache.v1.multiprocess.http_server``) owns a CPU (L1) tier that
one or several vLLM replicas attach to (``LMCacheMPConnector``). When several share one server, a
chunk that one replica computed is an external hit on all of them (tests/integration/
test_vllm_lmcache.py, ``test_shared_lmcache_tier_…``). Every attached replica also republishes the
tier's CPU events on its own KV-event stream, stores and LMCache's evictions alike
(docs/real-engines.md §10), so the router sees each chunk once per replica.

``SharedTierSink`` sits between the KV-event streams and the index. GPU-tier calls pass through.
CPU-tier calls of a replica in a group count, per router block, how many member streams announce
it; the block enters every member's CPU tier when the first stream announces it and leaves all of
them when the last one withdraws it. So the tier is counted once per server whatever the number of
streams that carry it, a member whose stream is down still gets the credit, and one stream's
restart (``clear``) withdraws only what that stream alone announced.

The groups come from ``lmcache.instances`` (``ID=REPLICA``, repeatable): replicas named under one
LMCache instance id share its tier; the same map tells lookup mode (lmcache_lookup.py) which
replicas a coordinator placement stands for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from router.index import PrefixIndex
from router.kv.apply import IndexSink
from router.kv.lmcache_lookup import AiohttpTransport, CoordinatorLookup
from router.types import BlockHash, ReplicaId, Tier

if TYPE_CHECKING:
    from router.config import LMCacheSettings
    from router.kv.subscriber import KVEventManager


def parse_instances(pairs: Iterable[str]) -> dict[str, list[ReplicaId]]:
    """``["mp0=http://r0:8000", "mp0=http://r1:8000"]`` -> ``{"mp0": [r0, r1]}`` (ids as given,
    trailing slash dropped, like replica URLs). Raises ValueError on a pair without ``=``."""
    out: dict[str, list[ReplicaId]] = {}
    for pair in pairs:
        iid, sep, replica = pair.partition("=")
        if not sep or not iid.strip() or not replica.strip():
            raise ValueError(f"{pair!r}: expected INSTANCE_ID=REPLICA")
        members = out.setdefault(iid.strip(), [])
        rid = ReplicaId(replica.strip().rstrip("/"))
        if rid not in members:
            members.append(rid)
    return out


class SharedTierSink:
    """An ``IndexSink`` (router/kv/apply.py) that credits a shared LMCache tier to all its replicas.

    Bound: one counter per router block held by a shared tier, plus one per (member stream, block)
    that stream announced; both shrink with the tier's evictions and a stream's clear.
    """

    def __init__(self, index: PrefixIndex, instances: dict[str, list[ReplicaId]]) -> None:
        self.index = index
        self._group_of: dict[ReplicaId, int] = {}
        self._members: list[list[ReplicaId]] = []
        for members in instances.values():
            if len(members) < 2:
                continue  # a private tier: the replica's own events are already exact
            gi = len(self._members)
            self._members.append(list(members))
            for rid in members:
                self._group_of[rid] = gi
        # per group: router block -> member streams announcing it; per member: block -> copies
        self._holders: list[dict[BlockHash, int]] = [{} for _ in self._members]
        self._own: dict[ReplicaId, dict[BlockHash, int]] = {rid: {} for rid in self._group_of}

    def group(self, replica: ReplicaId) -> list[ReplicaId] | None:
        gi = self._group_of.get(replica)
        return None if gi is None else self._members[gi]

    def store(
        self,
        replica: ReplicaId,
        hashes: Sequence[BlockHash],
        tier: Tier = Tier.GPU,
        *,
        speculative: bool = False,
    ) -> None:
        gi = self._group_of.get(replica)
        if gi is None or tier is Tier.GPU or speculative:
            self.index.store(replica, hashes, tier, speculative=speculative)
            return
        own = self._own[replica]
        holders = self._holders[gi]
        fresh: list[BlockHash] = []
        for h in hashes:
            n = own.get(h, 0)
            own[h] = n + 1
            if n == 0:
                k = holders.get(h, 0)
                holders[h] = k + 1
                if k == 0:
                    fresh.append(h)
        if fresh:
            for member in self._members[gi]:
                self.index.store(member, fresh, Tier.CPU)

    def remove(self, replica: ReplicaId, hashes: Sequence[BlockHash], tier: Tier = Tier.GPU) -> None:
        gi = self._group_of.get(replica)
        if gi is None or tier is Tier.GPU:
            self.index.remove(replica, hashes, tier)
            return
        own = self._own[replica]
        gone: list[BlockHash] = []
        for h in hashes:
            n = own.get(h)
            if n is None:
                continue
            if n > 1:
                own[h] = n - 1
            else:
                del own[h]
                self._release(gi, h, gone)
        self._withdraw(gi, gone)

    def clear(self, replica: ReplicaId, tier: Tier | None = None) -> None:
        gi = self._group_of.get(replica)
        if gi is None:
            self.index.clear(replica, tier)
            return
        if tier is None or tier is Tier.GPU:
            self.index.clear(replica, Tier.GPU)
        if tier is None or tier is Tier.CPU:
            own = self._own[replica]
            gone: list[BlockHash] = []
            for h in own:
                self._release(gi, h, gone)
            own.clear()
            self._withdraw(gi, gone)

    def attach(self, replica: ReplicaId) -> None:
        """A member (re)joined the index: give it what its shared tier holds now."""
        gi = self._group_of.get(replica)
        if gi is None:
            return
        missing = [h for h in self._holders[gi] if not self.index.holds(replica, h, Tier.CPU)]
        if missing:  # only what it lacks: each member holds one reference per shared block
            self.index.store(replica, missing, Tier.CPU)

    def detach(self, replica: ReplicaId) -> None:
        """The router stopped following this member's stream: what it alone announced can no
        longer be withdrawn by it, so it stops counting (the other members' streams still do)."""
        if replica in self._group_of:
            self.clear(replica, Tier.CPU)

    def set_uncertain(self, replica: ReplicaId, uncertain: bool) -> None:
        self.index.set_uncertain(replica, uncertain)

    def _release(self, gi: int, h: BlockHash, gone: list[BlockHash]) -> None:
        holders = self._holders[gi]
        k = holders.get(h, 0)
        if k <= 1:
            holders.pop(h, None)
            gone.append(h)
        else:
            holders[h] = k - 1

    def _withdraw(self, gi: int, gone: list[BlockHash]) -> None:
        if gone:
            for member in self._members[gi]:
                self.index.remove(member, gone, Tier.CPU)


# ---- wiring (router/http/app.py) ----------------------------------------------------------------


class GpuOnlySink:
    """``lmcache.credit_cpu_tier: false``: the streams' CPU-tier events are dropped, so the router
    routes on the GPU tier alone (the baseline of an A/B run; docs/lmcache.md)."""

    def __init__(self, index: PrefixIndex) -> None:
        self.index = index

    def store(
        self,
        replica: ReplicaId,
        hashes: Sequence[BlockHash],
        tier: Tier = Tier.GPU,
        *,
        speculative: bool = False,
    ) -> None:
        if tier is Tier.GPU:
            self.index.store(replica, hashes, tier, speculative=speculative)

    def remove(self, replica: ReplicaId, hashes: Sequence[BlockHash], tier: Tier = Tier.GPU) -> None:
        if tier is Tier.GPU:
            self.index.remove(replica, hashes, tier)

    def clear(self, replica: ReplicaId, tier: Tier | None = None) -> None:
        self.index.clear(replica, tier)

    def set_uncertain(self, replica: ReplicaId, uncertain: bool) -> None:
        self.index.set_uncertain(replica, uncertain)


def event_sink(index: PrefixIndex, settings: LMCacheSettings) -> IndexSink:
    """What the KV-event streams write to: the index, a SharedTierSink over it when some LMCache
    instance has several replicas, or a GpuOnlySink when the CPU tier must not be credited."""
    if not settings.credit_cpu_tier:
        return GpuOnlySink(index)
    instances = parse_instances(settings.instances)
    if any(len(m) > 1 for m in instances.values()):
        return SharedTierSink(index, instances)
    return index


def build_lookup(
    settings: LMCacheSettings,
    index: PrefixIndex,
    session: object,
    kv_events: KVEventManager | None,
    registry: CollectorRegistry | None,
) -> CoordinatorLookup | None:
    """Lookup mode, when a coordinator is configured; replicas whose stream already carries CPU
    events (lmcache_driven) are left to their events."""
    if settings.coordinator_url is None or not settings.credit_cpu_tier:
        return None
    instances = parse_instances(settings.instances)
    if not instances:
        raise ValueError(
            "lmcache.coordinator_url needs lmcache.instances (INSTANCE_ID=REPLICA) to map placements"
        )

    def events_mode(rid: ReplicaId) -> bool:
        st = kv_events.stats(rid) if kv_events is not None else None
        return st is not None and st.cpu_events > 0

    return CoordinatorLookup(
        index,
        AiohttpTransport(session),
        settings.coordinator_url,
        settings.model_name or "",
        instances,
        chunk_tokens=settings.chunk_tokens,
        min_tokens=settings.lookup_min_tokens,
        timeout_s=settings.lookup_timeout_s,
        cache_s=settings.lookup_cache_s,
        breaker_failures=settings.breaker_failures,
        breaker_open_s=settings.breaker_open_s,
        registry=registry,
        events_mode=events_mode,
    )


class CpuTierModeCollector(Collector):
    """``kvrouter_cpu_tier_mode{replica,mode}`` = 1 for the way the router learns each replica's
    CPU tier: ``events`` (CPU BlockStored seen on its stream: LMCache lmcache_driven),
    ``lookup`` (coordinator lookups; the breaker is closed), ``lookup_down`` (lookups configured
    but the breaker is open: GPU-only credit), ``none`` (the router credits no CPU tier)."""

    MODES = ("events", "lookup", "lookup_down", "none")

    def __init__(
        self,
        replicas: Callable[[], Iterable[ReplicaId]],
        kv_events: KVEventManager | None,
        lookup: CoordinatorLookup | None,
        credited: bool = True,
    ) -> None:
        self.credited = credited
        self.replicas = replicas
        self.kv_events = kv_events
        self.lookup = lookup

    def mode(self, rid: ReplicaId) -> str:
        if not self.credited:
            return "none"
        st = self.kv_events.stats(rid) if self.kv_events is not None else None
        if st is not None and st.cpu_events > 0:
            return "events"
        if self.lookup is not None and rid in self.lookup.replicas:
            return "lookup_down" if self.lookup.breaker_open else "lookup"
        return "none"

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily(
            "kvrouter_cpu_tier_mode",
            "1 for how the router learns the replica's CPU (LMCache) tier: events, lookup, lookup_down, none",
            labels=["replica", "mode"],
        )
        for rid in self.replicas():
            current = self.mode(rid)
            for m in self.MODES:
                g.add_metric([rid, m], 1.0 if m == current else 0.0)
        yield g
