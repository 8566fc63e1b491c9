"""PrefixIndex: which replica holds which KV blocks, per tier. Synchronous, bounded, lock-free.

Identifiers (after Dynamo's indexer README):

* **BlockHash**: the router's chained hash of a block (hashing.py). Chained, so one hash stands for
  the whole prefix up to and including its block.
* **slot**: a small int per replica (0..63 typically), its bit in the replica masks.

Structures:

* ``_masks[tier][h & _SHARD_MASK]: dict[BlockHash, int]``: hash -> bitmask of the slots holding the
  block on that tier, split over ``_SHARDS`` dicts by the hash's low bits. ``match()`` is then one
  pass over the request's hashes with two dict lookups and a few integer ops per block, stopping at
  the first block that no replica holds. Why split: CPython rebuilds a dict whose keys churn each
  time its append-only entry table fills, all at once; one dict of 16 replicas x 26k blocks was a
  30-38 ms stall of the router's event loop (every request in flight waits) about every million
  block stores; 256 dicts rebuild a few hundred microseconds at a time.
* ``_lru[slot][tier]: OrderedDict[BlockHash, int]``: per replica and tier, in LRU order (oldest
  first), the *state* of each block it holds:

    - ``n > 0``: confirmed by ``n`` BlockStored events (vLLM does not de-duplicate identical blocks
      computed concurrently; each copy is removed by its own BlockRemoved, so we refcount);
    - ``n < 0``: speculative only (inserted by a routing decision), expires at ``-n`` ms on the
      index clock unless a KV event confirms it first.

  The per-replica bound (``capacity``) evicts the least recently stored block, so memory stays
  bounded whatever the engines say or fail to say.

Speculative expiry is lazy: each speculative ``store`` pushes one ``(deadline, hashes)`` record on
a heap, and every mutating call or ``match()`` first drops the records whose deadline has passed
(amortised O(1) per stored block). A record only removes blocks that are *still* speculative
with that deadline or older, so a later confirmation or re-speculation wins.

Complexity: ``match`` O(prefix length + replicas), ``store``/``remove`` O(blocks), ``clear``
O(blocks of that replica). All methods are synchronous and never await: only the event loop
thread touches the index (DESIGN.md "The request path").

Insertion order follows vLLM's eviction order: a sequence's blocks are stored tail first, so its
head is the most recent and the tail is evicted first.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from mypy_extensions import mypyc_attr

from .types import BlockHash, ReplicaId, Tier

_TIERS = (Tier.GPU, Tier.CPU)
_SHARDS = 256  # see the module docstring: _masks is split by the hash's low 8 bits
_SHARD_MASK = _SHARDS - 1
# Blocks left to match above which one replica's prefix is counted in C (itertools) rather than by
# the mask loop: below it the setup costs more than the loop (~10 blocks break even).
_C_WALK_MIN = 12


@dataclass(slots=True)
class _ReplicaEntry:
    slot: int
    bit: int
    lru: tuple[OrderedDict[int, int], OrderedDict[int, int]]  # per tier, see module docstring
    capacity: int  # GPU tier (the engine's num_gpu_blocks once known)
    cpu_capacity: int  # offload tier: LMCache's L1 is far larger than the GPU cache
    uncertain: bool = False

    def bound(self, tier: int) -> int:
        return self.capacity if tier == Tier.GPU else self.cpu_capacity


@mypyc_attr(native_class=False)  # a built-in base: a plain class when compiled (setup.py)
class IndexInvariantError(AssertionError):
    pass


class PrefixIndex:
    """Bounded block index. ``capacity_per_replica`` blocks per replica and tier, LRU eviction."""

    def __init__(
        self,
        capacity_per_replica: int = 1 << 20,
        speculative_ttl_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        max_replicas: int = 4096,
    ) -> None:
        if capacity_per_replica <= 0:
            raise ValueError(f"capacity_per_replica={capacity_per_replica}: must be positive")
        self.capacity_per_replica = capacity_per_replica
        self.speculative_ttl_s = speculative_ttl_s
        self.max_replicas = max_replicas
        self._clock = clock
        self._masks: tuple[list[dict[int, int]], list[dict[int, int]]] = (
            [{} for _ in range(_SHARDS)],
            [{} for _ in range(_SHARDS)],
        )
        # Per tier, each shard's bound ``get`` (match() calls one per block), and whether the
        # tier ever held a block (match() skips the CPU lookups of a fleet without that tier).
        self._gets = tuple([d.get for d in shards] for shards in self._masks)
        self._tier_used = [False, False]
        self._replicas: dict[ReplicaId, _ReplicaEntry] = {}
        self._by_slot: dict[int, ReplicaId] = {}
        self._free_slots: list[int] = []
        self._next_slot = 0
        # Min-heap of (deadline_ms, seq, slot, tier, hashes): one record per speculative store.
        self._spec_heap: list[tuple[int, int, int, int, Sequence[int]]] = []
        self._spec_seq = itertools.count()
        self.uncertain_slots: set[int] = set()  # replicas whose view missed KV events
        self.evictions = 0  # blocks dropped by the capacity bound
        self.expirations = 0  # speculative blocks that were never confirmed
        self.expired_by_replica: dict[ReplicaId, int] = {}  # the same, per replica (metrics)
        # Hashes referenced by expiry records. Records of blocks the capacity bound already
        # evicted are garbage until their deadline: without compaction the heap grows with
        # request rate x TTL, not with the capacity (F4). Compacted at 2x the live bound.
        self._spec_held = 0
        self._spec_limit = 0  # compaction check when _spec_held passes it (0: recompute)
        self.spec_compacted = 0  # hashes dropped from expiry records (their block was evicted)

    # ---- replicas -------------------------------------------------------------------------

    def add_replica(self, replica: ReplicaId, capacity: int | None = None) -> int:
        entry = self._replicas.get(replica)
        if entry is not None:
            if capacity is not None:
                self.set_capacity(replica, capacity)
            return entry.slot
        if self._free_slots:
            slot = self._free_slots.pop()
        else:
            if self._next_slot >= self.max_replicas:
                raise ValueError(f"max_replicas={self.max_replicas}: index is full")
            slot = self._next_slot
            self._next_slot += 1
        self._replicas[replica] = _ReplicaEntry(
            slot,
            1 << slot,
            (OrderedDict(), OrderedDict()),
            capacity or self.capacity_per_replica,
            self.capacity_per_replica,
        )
        self._by_slot[slot] = replica
        return slot

    def remove_replica(self, replica: ReplicaId) -> None:
        entry = self._replicas.get(replica)
        if entry is None:
            return
        self.clear(replica)
        self.expired_by_replica.pop(replica, None)
        self.uncertain_slots.discard(entry.slot)
        del self._replicas[replica]
        del self._by_slot[entry.slot]
        self._free_slots.append(entry.slot)

    def replicas(self) -> Iterator[ReplicaId]:
        return iter(self._replicas)

    def set_capacity(self, replica: ReplicaId, capacity: int, tier: Tier = Tier.GPU) -> None:
        """Resize one replica's bound on one tier (GPU: the engine's num_gpu_blocks once it is
        known; CPU: the LMCache tier's size in router blocks). The tiers are bounded apart: a
        GPU-sized bound on the CPU tier would forget most of what LMCache holds."""
        if capacity <= 0:
            raise ValueError(f"capacity={capacity}: must be positive")
        entry = self._replicas[replica]
        if tier is Tier.GPU:
            entry.capacity = capacity
        else:
            entry.cpu_capacity = capacity
        self._spec_limit = 0
        self._enforce_capacity(entry, tier)

    def set_uncertain(self, replica: ReplicaId, uncertain: bool) -> None:
        entry = self._replicas.get(replica)
        if entry is None:
            return
        entry.uncertain = uncertain
        if uncertain:
            self.uncertain_slots.add(entry.slot)
        else:
            self.uncertain_slots.discard(entry.slot)

    def is_uncertain(self, replica: ReplicaId) -> bool:
        entry = self._replicas.get(replica)
        return entry is not None and entry.uncertain

    def replica_blocks(self, replica: ReplicaId, tier: Tier = Tier.GPU) -> int:
        entry = self._replicas.get(replica)
        return 0 if entry is None else len(entry.lru[tier])

    def __len__(self) -> int:
        """Number of distinct (hash, tier) keys indexed."""
        return sum(map(len, self._masks[0])) + sum(map(len, self._masks[1]))

    # ---- updates --------------------------------------------------------------------------

    def store(
        self,
        replica: ReplicaId,
        hashes: Sequence[BlockHash],
        tier: Tier = Tier.GPU,
        *,
        speculative: bool = False,
        ttl_s: float | None = None,
    ) -> None:
        """Record that ``replica`` holds ``hashes`` (a chain, head first) on ``tier``.

        Confirmed stores (KV events) add one reference per block. Speculative stores (routing
        decisions) mark blocks the replica does not hold yet as expiring after ``ttl_s``;
        blocks it already holds confirmed are only touched.
        """
        entry = self._replicas.get(replica)
        if entry is None or not hashes:
            return
        now_ms = self._now_ms()
        self._expire(now_ms)
        lru = entry.lru[tier]
        shards = self._masks[tier]
        m = _SHARD_MASK
        self._tier_used[tier] = True
        bit = entry.bit
        if speculative:
            deadline = now_ms + int(1000 * (self.speculative_ttl_s if ttl_s is None else ttl_s))
            neg = -deadline
            fresh: list[int] = []
            # A block already held moves to the recent end in place (move_to_end, not pop and
            # insert: 4x cheaper; a long conversation re-sends a thousand held blocks per turn).
            get = lru.get
            touch = lru.move_to_end
            for h in reversed(hashes):  # tail first: the head ends up most recent
                state = get(h)
                if state is None:
                    lru[h] = neg
                    mask = shards[h & m]
                    mask[h] = mask.get(h, 0) | bit
                    fresh.append(h)
                else:
                    if neg < state < 0:
                        lru[h] = neg  # keep the later deadline
                    touch(h)
            # Only blocks that just became speculative get an expiry entry. A block already
            # speculative keeps its entry, which re-schedules itself when it fires early
            # (_expire): one entry per speculative block at most, not one per request, so a
            # hot prefix re-sent thousands of times a second costs no memory per request.
            if fresh:
                keep = hashes if len(fresh) == len(hashes) else fresh  # the caller's list when all new
                heapq.heappush(self._spec_heap, (deadline, next(self._spec_seq), entry.slot, int(tier), keep))
                self._spec_held += len(keep)
                if self._spec_held > self._spec_limit:
                    self._maybe_compact()
        else:
            get = lru.get
            touch = lru.move_to_end
            for h in reversed(hashes):
                state = get(h)
                if state is None:
                    lru[h] = 1
                    mask = shards[h & m]
                    mask[h] = mask.get(h, 0) | bit
                else:
                    lru[h] = state + 1 if state > 0 else 1
                    touch(h)
        if len(lru) > entry.bound(tier):
            self._enforce_capacity(entry, tier)

    @property
    def spec_held(self) -> int:
        return self._spec_held

    def _spec_bound(self) -> int:
        """Live speculative blocks cannot outnumber the capacity of every replica and tier."""
        return max(4096, sum(e.capacity + e.cpu_capacity for e in self._replicas.values()))

    def _maybe_compact(self) -> None:
        bound = self._spec_bound()
        if self._spec_held > 2 * bound:
            self._compact_spec()
        self._spec_limit = max(2 * bound, self._spec_held + bound)  # amortised: O(1) per hash

    def _compact_spec(self) -> None:
        """Rebuild the expiry heap with only the blocks that are still speculative: each
        speculative block keeps exactly its one record, and what was evicted (least recently
        used first, by the capacity bound) leaves its record too. O(heap) once per doubling."""
        heap: list[tuple[int, int, int, int, Sequence[int]]] = []
        held = 0
        for deadline, seq, slot, tier, hashes in self._spec_heap:
            rid = self._by_slot.get(slot)
            if rid is None:
                continue
            lru = self._replicas[rid].lru[tier]
            live = [h for h in hashes if (st := lru.get(h)) is not None and st < 0]
            if live:
                heap.append((deadline, seq, slot, tier, live))
                held += len(live)
        heapq.heapify(heap)
        self.spec_compacted += self._spec_held - held
        self._spec_heap = heap
        self._spec_held = held

    def remove(self, replica: ReplicaId, hashes: Sequence[BlockHash], tier: Tier = Tier.GPU) -> None:
        """One BlockRemoved per stored copy: drop a reference; the block leaves at zero."""
        entry = self._replicas.get(replica)
        if entry is None:
            return
        lru = entry.lru[tier]
        for h in hashes:
            state = lru.get(h)
            if state is None:
                continue
            if state > 1:
                lru[h] = state - 1
            else:
                del lru[h]
                self._unset(h, tier, entry.bit)

    def clear(self, replica: ReplicaId, tier: Tier | None = None) -> None:
        entry = self._replicas.get(replica)
        if entry is None:
            return
        for t in _TIERS if tier is None else (tier,):
            lru = entry.lru[t]
            for h in lru:
                self._unset(h, t, entry.bit)
            lru.clear()

    def expire(self) -> None:
        """Drop speculative blocks whose TTL has passed (also done lazily by every call)."""
        self._expire(self._now_ms())

    # ---- query ----------------------------------------------------------------------------

    def match(self, hashes: Sequence[BlockHash]) -> tuple[list[int], list[int]]:
        """Per slot, the longest cached prefix of ``hashes`` in blocks: (GPU, usable).

        ``usable`` is what vLLM + an offload tier (LMCache) would actually reuse: vLLM takes its
        GPU prefix first, then asks the connector, which looks its chunks up *from position 0*
        and stops at the first miss; the external hit is what that lookup found beyond the GPU
        prefix. So usable = max(GPU prefix, CPU prefix), never a patchwork of the two tiers (a
        CPU chunk after a GPU prefix whose own first chunk LMCache evicted is not loaded).
        CPU blocks are stored whole chunks at a time (router/kv/stream.py), so the CPU prefix
        ends on a chunk boundary. Always >= the first list. Slots with no replica read 0.
        One pass; stops at the first block no replica holds on any tier.
        """
        n_slots = self._next_slot
        gpu_len = [0] * n_slots
        any_len = [0] * n_slots
        if not hashes or not self._replicas:
            return gpu_len, any_len
        self._expire(self._now_ms())
        ggets, cgets_all = self._gets
        m = _SHARD_MASK
        below = _bits_below(n_slots)
        if not self._tier_used[Tier.CPU]:
            _prefix_one_tier(hashes, ggets, gpu_len, below, self._gpu_blocks_of)
            any_len[:] = gpu_len
            return gpu_len, any_len
        cpu_len = [0] * n_slots
        g_alive = c_alive = -1  # slots whose prefix on that tier is still unbroken (all bits)
        g_prev = c_prev = -2  # masks of the previous block (-2: none yet)
        i = 0
        for i, h in enumerate(hashes):
            g = ggets[h & m](h, 0)
            c = cgets_all[h & m](h, 0)
            if g == g_prev and c == c_prev:
                continue  # same holders as the block before: nothing ends here (common case)
            g_prev, c_prev = g, c
            g_new = g_alive & g
            c_new = c_alive & c
            ended = g_alive & ~g_new
            if ended and i:
                _record(gpu_len, ended & below, i)
            ended = c_alive & ~c_new
            if ended and i:
                _record(cpu_len, ended & below, i)
            g_alive, c_alive = g_new, c_new
            if not (g_alive | c_alive):
                break
        else:
            n = i + 1
            _record(gpu_len, g_alive & below, n)
            _record(cpu_len, c_alive & below, n)
        for s, (g_n, c_n) in enumerate(zip(gpu_len, cpu_len, strict=True)):
            any_len[s] = c_n if c_n > g_n else g_n
        return gpu_len, any_len

    def confirmed_digest(self, replica: ReplicaId, tier: Tier = Tier.GPU) -> tuple[int, int]:
        """(count, order-independent digest) of the blocks KV events confirmed on a replica.

        Speculative entries are left out: they come from this router's own decisions. Two routers
        following the same engine events must report the same pair (docs/scale-out.md). O(n).
        """
        entry = self._replicas.get(replica)
        if entry is None:
            return 0, 0
        n = 0
        acc = 0
        for h, state in entry.lru[tier].items():
            if state > 0:
                n += 1
                acc = (acc + h * 0x9E3779B97F4A7C15 + state) & 0xFFFFFFFFFFFFFFFF
        return n, acc

    def confirmed_blocks(self, replica: ReplicaId, hashes: Sequence[BlockHash], n: int) -> int:
        """How many of the first ``n`` blocks of ``hashes`` KV events confirmed on ``replica``
        (the rest of a match is the router's own speculation). O(n), for the chosen replica."""
        entry = self._replicas.get(replica)
        if entry is None or n <= 0:
            return 0
        get = entry.lru[Tier.GPU].get
        return sum(1 for h in hashes[:n] if get(h, 0) > 0)

    def holds(self, replica: ReplicaId, h: BlockHash, tier: Tier = Tier.GPU) -> bool:
        entry = self._replicas.get(replica)
        return entry is not None and h in entry.lru[tier]

    # ---- checks ---------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Recount the masks from the per-replica LRUs; raise IndexInvariantError on mismatch."""
        for tier in _TIERS:
            expected: dict[int, int] = {}
            for rid, entry in self._replicas.items():
                lru = entry.lru[tier]
                if len(lru) > entry.bound(tier):
                    raise IndexInvariantError(f"{rid}: {len(lru)} blocks > capacity {entry.bound(tier)}")
                for h, state in lru.items():
                    if state == 0:
                        raise IndexInvariantError(f"{rid}: block {h} with state 0")
                    expected[h] = expected.get(h, 0) | entry.bit
            masks: dict[int, int] = {}
            for shard_no, shard in enumerate(self._masks[tier]):
                if any(h & _SHARD_MASK != shard_no for h in shard):
                    raise IndexInvariantError(f"tier {tier.name}: a hash in the wrong shard")
                masks.update(shard)
            if expected != masks:
                extra = set(masks) ^ set(expected)
                raise IndexInvariantError(f"tier {tier.name}: mask mismatch on {len(extra)} keys")
        slots = {e.slot for e in self._replicas.values()}
        if len(slots) != len(self._replicas) or slots & set(self._free_slots):
            raise IndexInvariantError("slot table corrupt")

    # ---- internals ------------------------------------------------------------------------

    def _gpu_blocks_of(self, slot: int) -> OrderedDict[int, int]:
        return self._replicas[self._by_slot[slot]].lru[Tier.GPU]

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _unset(self, h: int, tier: int, bit: int) -> None:
        mask = self._masks[tier][h & _SHARD_MASK]
        m = mask.get(h, 0) & ~bit
        if m:
            mask[h] = m
        else:
            mask.pop(h, None)

    def _enforce_capacity(self, entry: _ReplicaEntry, tier: int) -> None:
        lru = entry.lru[tier]
        excess = len(lru) - entry.bound(tier)
        if excess <= 0:
            return
        self.evictions += excess
        for _ in range(excess):
            h, _state = lru.popitem(last=False)
            self._unset(h, tier, entry.bit)

    def _expire(self, now_ms: int) -> None:
        heap = self._spec_heap
        while heap and heap[0][0] <= now_ms:
            _deadline, _seq, slot, tier, hashes = heapq.heappop(heap)
            self._spec_held -= len(hashes)
            rid = self._by_slot.get(slot)
            if rid is None:
                continue
            entry = self._replicas[rid]
            lru = entry.lru[tier]
            later: dict[int, list[int]] | None = None
            for h in hashes:
                state = lru.get(h)
                if state is None or state > 0:
                    continue  # gone, or confirmed by the engine: nothing to expire
                if -state <= now_ms:
                    # Still speculative at its deadline: never confirmed by the engine, forget it.
                    del lru[h]
                    self._unset(h, tier, entry.bit)
                    self.expirations += 1
                    self.expired_by_replica[rid] = self.expired_by_replica.get(rid, 0) + 1
                else:  # re-speculated since: follow it to its later deadline
                    if later is None:
                        later = {}
                    later.setdefault(-state, []).append(h)
            if later:
                for when, hs in later.items():
                    heapq.heappush(heap, (when, next(self._spec_seq), slot, tier, hs))
                    self._spec_held += len(hs)


def _bits_below(n: int) -> int:
    return (1 << n) - 1


def _prefix_one_tier(
    hashes: Sequence[BlockHash],
    gets: Sequence[Callable[..., int]],
    out: list[int],
    below: int,
    blocks_of: Callable[[int], OrderedDict[int, int]],
) -> None:
    """GPU-only match (no replica ever had a CPU tier): the common, cheaper loop.

    Once a single replica is left holding the prefix (past a system prompt several replicas
    share, the one holding the conversation), the rest of its prefix is counted in C on that
    replica's own block dict, which holds exactly the blocks its bit marks in the masks."""
    m = _SHARD_MASK
    n = len(hashes)
    alive = -1
    prev = -2
    i = 0
    for i, h in enumerate(hashes):
        g = gets[h & m](h, 0)
        if g == prev:
            continue
        prev = g
        new = alive & g
        ended = alive & ~new
        if ended and i:
            _record(out, ended & below, i)
        alive = new
        if not alive:
            return
        if not alive & (alive - 1) and n - i > _C_WALK_MIN:  # one replica left, a long way to go
            slot = alive.bit_length() - 1
            held = blocks_of(slot).__contains__
            out[slot] = i + 1 + len(list(itertools.takewhile(held, itertools.islice(hashes, i + 1, None))))
            return
    _record(out, alive & below, i + 1)


def _record(out: list[int], bits: int, value: int) -> None:
    while bits:
        low = bits & -bits
        out[low.bit_length() - 1] = value
        bits ^= low
