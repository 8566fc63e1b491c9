"""GPU KV block pool with prefix caching, in vLLM v1 semantics (vllm/v1/core/block_pool.py,
kv_cache_utils.py ``FreeKVCacheBlockQueue`` / ``BlockHashToBlockMap``).

Invariants (``check_invariants`` recounts them):
- Block 0 is vLLM's *null block*: taken out of the free queue at start, never allocated or
  freed, so ``num_blocks - 1`` blocks are usable and usage is ``1 - free / (num_blocks - 1)``.
- A block is in the free queue iff its ref count is 0. A free block may still carry a hash: it
  is a cached block that can be hit (``touch`` takes it out of the queue, ref += 1) until it is
  handed out again by ``get_new_blocks``, which pops the queue head (least recently freed) and
  evicts its hash (one ``BlockRemoved`` per evicted block, like vLLM).
- Callers free a request's blocks *tail first* (``free_blocks(reversed(blocks))``, as vLLM's
  single-type manager does) so that a sequence's tail is evicted before its head.
- Only full blocks are cached. The same hash may be cached by two blocks (two requests computed
  the same block concurrently): vLLM keeps both under one key, a hit returns the first one
  cached, and evicting either emits ``BlockRemoved`` for that hash even though a copy remains.

The free queue is an intrusive doubly linked list over two int arrays with sentinel head/tail
(vLLM uses fake head/tail blocks "to reduce branching"): O(1) pop, append and removal from the
middle, no per-operation allocation. Ids, not objects, keep the hot path to list indexing.

Events are ``router.kv.wire`` structs, accumulated until ``take_events()`` (vLLM publishes one
batch per engine step).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from typing import Any

from ..wire import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

NULL_BLOCK = 0
_LOOKUP_CHUNK = 256  # hashes looked up per list comprehension in find_longest_cache_hit
# The hash -> block map is split into this many dicts by the hash's low bits. Why: a dict whose
# keys churn (every eviction deletes one, every cached block inserts one) is rebuilt whole by
# CPython every time its append-only entry table fills up; for one dict of a replica's 26k cached
# blocks that rebuild was a single 2 ms (hot) to 8 ms (live fleet, cold caches) pause inside
# one engine step, seven times in 30 s of a 16-replica fleet, and every replica sharing the
# event loop was late by it. 64 dicts of ~400 entries rebuild in ~0.1 ms each, as often in total.
_SHARDS = 64
_SHARD_MASK = _SHARDS - 1


class BlockPool:
    __slots__ = (
        "_cached",
        "_dups",
        "_events",
        "_head",
        "_next",
        "_pin_seq",
        "_pins",
        "_prev",
        "_tail",
        "block_hash",
        "block_size",
        "emit_events",
        "enable_caching",
        "medium",
        "num_blocks",
        "num_free",
        "num_pinned",
        "pins_released_early",
        "ref_cnt",
    )

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        enable_caching: bool = True,
        emit_events: bool = False,
        medium: str = "GPU",
    ) -> None:
        """Bound: ``num_blocks`` blocks (one reserved as the null block). Eviction: LRU over the
        free queue, only when a block is handed out again."""
        if num_blocks < 2:
            raise ValueError(f"invalid num_blocks: {num_blocks} (need at least 2: one is the null block)")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.emit_events = emit_events
        self.medium = medium
        self.ref_cnt: list[int] = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        # hash -> the first block cached under it; ``_dups``: hash -> the later ones, when the
        # same block was computed twice (rare). Two dicts, not one with int-or-list values: a
        # dict holding only ints is invisible to the cyclic GC, while a single list value makes
        # CPython track the whole dict (26k entries per replica), and every collection then
        # walked all of it (16 replicas: 10-25 ms pauses, i.e. step lag for every replica).
        self._cached: list[dict[int, int]] = [{} for _ in range(_SHARDS)]  # [h & _SHARD_MASK][h]
        self._dups: dict[int, list[int]] = {}
        self._events: list[KVEvent] = []
        self._head = num_blocks
        self._tail = num_blocks + 1
        self._prev: list[int] = [-1] * (num_blocks + 2)
        self._next: list[int] = [-1] * (num_blocks + 2)
        self._link_all()
        self.num_free = num_blocks
        # Retention pins (``pin``): (until, seq, blocks in eviction order), earliest first.
        self._pins: list[tuple[float, int, list[int]]] = []
        self._pin_seq = 0
        self.num_pinned = 0  # blocks held by pins
        self.pins_released_early = 0  # pins given up before their TTL to make room
        self._remove(NULL_BLOCK)
        self.ref_cnt[NULL_BLOCK] = 1  # never freed, never counted as free

    def _link_all(self) -> None:
        n = self.num_blocks
        prev, nxt = self._prev, self._next
        order = [self._head, *range(n), self._tail]
        for i in range(len(order) - 1):
            nxt[order[i]] = order[i + 1]
            prev[order[i + 1]] = order[i]
        prev[self._head] = -1
        nxt[self._tail] = -1

    # -- free queue (O(1) each) -------------------------------------------------------------
    def _remove(self, b: int) -> None:
        p, n = self._prev[b], self._next[b]
        self._next[p] = n
        self._prev[n] = p
        self._prev[b] = self._next[b] = -1
        self.num_free -= 1

    def _append(self, b: int) -> None:
        last = self._prev[self._tail]
        self._next[last] = b
        self._prev[b] = last
        self._next[b] = self._tail
        self._prev[self._tail] = b
        self.num_free += 1

    def free_queue(self) -> list[int]:
        """Free block ids in eviction order (head first). O(n); for tests and debugging."""
        out: list[int] = []
        b = self._next[self._head]
        while b != self._tail:
            out.append(b)
            b = self._next[b]
        return out

    # -- prefix cache ---------------------------------------------------------------------
    def get_cached_block(self, block_hash: int) -> int | None:
        return self._cached[block_hash & _SHARD_MASK].get(block_hash)

    def find_longest_cache_hit(self, block_hashes: Sequence[int], max_blocks: int) -> list[int]:
        """Block ids of the longest cached prefix of ``block_hashes``, at most ``max_blocks``.
        Does not touch: the caller touches only if it admits the request (vLLM). Looked up 256
        hashes at a time, so a miss is found with one ``list.index`` per chunk."""
        if not self.enable_caching:
            return []
        shards, m = self._cached, _SHARD_MASK
        n = min(max_blocks, len(block_hashes))
        hit: list[int] = []
        for s in range(0, n, _LOOKUP_CHUNK):
            vals: list[Any] = [shards[h & m].get(h) for h in block_hashes[s : min(s + _LOOKUP_CHUNK, n)]]
            try:
                miss = vals.index(None)
            except ValueError:
                miss = -1
            else:
                del vals[miss:]
            hit += vals
            if miss >= 0:
                break
        return hit

    def num_evictable(self, block_ids: Iterable[int]) -> int:
        """How many of these (hit) blocks sit in the free queue and would leave it on touch."""
        return list(map(self.ref_cnt.__getitem__, block_ids)).count(0)

    def touch(self, block_ids: Iterable[int]) -> None:
        """A request reuses these cached blocks: take free ones out of the queue, ref += 1.
        (``_remove`` inlined: a 5k-block hit is one loop, not 5k calls.)"""
        rc, prev, nxt = self.ref_cnt, self._prev, self._next
        removed = 0
        for b in block_ids:
            if rc[b] == 0:
                p, n = prev[b], nxt[b]
                nxt[p] = n
                prev[n] = p
                prev[b] = nxt[b] = -1
                removed += 1
            rc[b] += 1
        self.num_free -= removed

    def get_new_blocks(self, n: int) -> list[int]:
        """Pop ``n`` blocks from the queue head, evicting any hash they still carry."""
        if n > self.num_free:
            raise ValueError(f"cannot get {n} free blocks from the pool (free: {self.num_free})")
        out: list[int] = []
        prev, nxt, rc, hashes = self._prev, self._next, self.ref_cnt, self.block_hash
        head = self._head
        for _ in range(n):
            b = nxt[head]
            after = nxt[b]
            nxt[head] = after
            prev[after] = head
            prev[b] = nxt[b] = -1
            if hashes[b] is not None:
                self._evict(b)
            rc[b] = 1
            out.append(b)
        self.num_free -= n
        return out

    def _evict(self, b: int) -> None:
        h = self.block_hash[b]
        assert h is not None
        self.block_hash[b] = None
        shard = self._cached[h & _SHARD_MASK]
        v = shard.get(h)
        if v is None:
            return
        dups = self._dups.get(h)
        if v == b:  # the first copy goes: the next one (if any) is what a hit returns now
            if dups is None:
                del shard[h]
            else:
                shard[h] = dups.pop(0)
                if not dups:
                    del self._dups[h]
        else:
            if dups is None or b not in dups:
                return
            dups.remove(b)
            if not dups:
                del self._dups[h]
        if self.emit_events:
            self._events.append(BlockRemoved(block_hashes=[h], medium=self.medium, group_idx=0))

    def cache_full_blocks(
        self,
        block_ids: Sequence[int],
        block_hashes: Sequence[int],
        num_cached: int,
        num_full: int,
        token_ids: Sequence[int] | None = None,
    ) -> None:
        """Mark ``block_ids[num_cached:num_full]`` as cached under ``block_hashes[same]`` and emit
        one ``BlockStored`` for them, parented on the hash of block ``num_cached - 1``.
        ``token_ids`` are the request's tokens (all of them); the event carries those of the
        newly stored blocks, or none when the caller does not track tokens."""
        if num_full <= num_cached or not self.enable_caching:
            return
        shards, m, hashes = self._cached, _SHARD_MASK, self.block_hash
        new_hashes = block_hashes[num_cached:num_full]
        for b, h in zip(block_ids[num_cached:num_full], new_hashes, strict=True):
            assert hashes[b] is None, "block cached twice"
            hashes[b] = h
            if shards[h & m].setdefault(h, b) != b:
                self._dups.setdefault(h, []).append(b)
        if self.emit_events:
            bs = self.block_size
            n = num_full - num_cached
            toks = list(token_ids[num_cached * bs : num_full * bs]) if token_ids is not None else []
            self._events.append(
                BlockStored(
                    block_hashes=list(new_hashes),
                    parent_block_hash=block_hashes[num_cached - 1] if num_cached > 0 else None,
                    token_ids=toks,
                    block_size=bs,
                    lora_id=None,
                    medium=self.medium,
                    lora_name=None,
                    extra_keys=[None] * n,
                    group_idx=0,
                    kv_cache_spec_kind="full_attention",
                )
            )

    def free_blocks(self, ordered_block_ids: Iterable[int]) -> None:
        """ref -= 1 each, in eviction-priority order (callers pass a request's blocks reversed so
        its tail is evicted first). As in vLLM 0.32 ``BlockPool.free_blocks``: blocks reaching 0
        that hold no hash (a partial last block, or caching off) are *prepended*, in order, so
        they are reused first and a cached block is only evicted when no uncached one is left;
        cached blocks are appended (LRU). Verified against a real vLLM 0.32 replica by
        tests/integration/test_vllm_real.py::test_simulator_matches_real_vllm_prefix_cache."""
        rc, bh, prev, nxt = self.ref_cnt, self.block_hash, self._prev, self._next
        caching = self.enable_caching
        tail = self._tail
        first: list[int] = []
        appended = 0
        for b in ordered_block_ids:
            c = rc[b] = rc[b] - 1
            if c == 0:
                if bh[b] is None or not caching:
                    first.append(b)
                else:  # _append(b), inlined
                    last = prev[tail]
                    nxt[last] = b
                    prev[b] = last
                    nxt[b] = tail
                    prev[tail] = b
                    appended += 1
        self.num_free += appended
        if first:
            self._prepend_n(first)

    def pin(self, ordered_block_ids: list[int], until: float) -> None:
        """Retention: keep a finished request's blocks referenced until ``until`` (a TTL), in
        place of ``free_blocks``. A model of a router-requested retention (LMCache pin, Dynamo
        ``cache_control``, vLLM's proposed retention directives) for a paused agent session.
        Soft: ``release_pins`` gives pins up, earliest expiry first, when an allocation needs
        their room, so retention never preempts a running request; a hit on a pinned block
        reuses it directly (ref > 0)."""
        heapq.heappush(self._pins, (until, self._pin_seq, ordered_block_ids))
        self._pin_seq += 1
        self.num_pinned += len(ordered_block_ids)

    def release_pins(self, now: float, need: int = 0) -> None:
        """Free expired pins, then earlier-expiring ones until ``need`` blocks are free."""
        pins = self._pins
        while pins and (pins[0][0] <= now or self.num_free < need):
            until, _, blocks = heapq.heappop(pins)
            if until > now:
                self.pins_released_early += 1
            self.num_pinned -= len(blocks)
            self.free_blocks(blocks)

    def _prepend_n(self, blocks: list[int]) -> None:
        """Put ``blocks`` at the front of the free queue, keeping their order."""
        nxt, prev = self._next, self._prev
        after = nxt[self._head]
        p = self._head
        for b in blocks:
            prev[b] = p
            nxt[p] = b
            p = b
        nxt[p] = after
        prev[after] = p
        self.num_free += len(blocks)

    def reset_prefix_cache(self) -> bool:
        """Drop every cached hash. Like vLLM, refuses (returns False) while any block is in use,
        because running requests' blocks would otherwise lose their hashes mid-flight."""
        if self.num_free != self.num_blocks - 1:
            return False
        for shard in self._cached:
            shard.clear()
        self._dups.clear()
        # In place: the list keeps its place in the GC's frozen generation (docs/notes/2026-11-sim-live-capacity.md)
        self.block_hash[:] = [None] * self.num_blocks
        if self.emit_events:
            self._events.append(AllBlocksCleared())
        return True

    # -- accounting -----------------------------------------------------------------------
    @property
    def usage(self) -> float:
        """vLLM ``kv_cache_usage_perc``: blocks in use / usable blocks (cached-but-free excluded)."""
        return 1.0 - self.num_free / (self.num_blocks - 1)

    @property
    def num_cached_blocks(self) -> int:
        return sum(map(len, self._cached)) + sum(map(len, self._dups.values()))

    def take_events(self) -> list[KVEvent]:
        ev = self._events
        self._events = []
        return ev

    def check_invariants(self) -> None:
        """Recount everything maintained incrementally; raises AssertionError on a mismatch."""
        q = self.free_queue()
        assert len(q) == self.num_free == len(set(q)), "free queue length"
        assert NULL_BLOCK not in q
        in_q = set(q)
        for b in range(1, self.num_blocks):
            assert (self.ref_cnt[b] == 0) == (b in in_q), f"block {b}: ref {self.ref_cnt[b]}"
            assert self.ref_cnt[b] >= 0
        n_hashed = 0
        for b, h in enumerate(self.block_hash):
            if h is None:
                continue
            n_hashed += 1
            assert self.get_cached_block(h) == b or b in self._dups.get(h, ()), f"block {b} map"
        assert n_hashed == self.num_cached_blocks
