"""Block pool in vLLM semantics: exact free-queue and eviction order (as vLLM's
tests/v1/core/test_prefix_caching.py asserts them), ref-count sharing, duplicates, reset."""

from __future__ import annotations

import pytest

from engines.sim.model.block_pool import BlockPool
from router.kv.wire import AllBlocksCleared, BlockRemoved, BlockStored


def make_pool(n: int = 10, events: bool = True) -> BlockPool:
    return BlockPool(n, 4, enable_caching=True, emit_events=events)


def test_null_block_is_reserved_and_queue_starts_in_id_order() -> None:
    pool = make_pool(6)
    assert pool.free_queue() == [1, 2, 3, 4, 5]
    assert pool.num_free == 5 and pool.usage == 0.0
    pool.check_invariants()


def test_alloc_pops_head_and_free_appends_tail_first() -> None:
    pool = make_pool(10)
    a = pool.get_new_blocks(3)
    assert a == [1, 2, 3]
    pool.cache_full_blocks(a, [101, 102, 103], 0, 3)
    pool.free_blocks(reversed(a))
    # The sequence's tail (block 3) is evicted before its head (block 1).
    assert pool.free_queue() == [4, 5, 6, 7, 8, 9, 3, 2, 1]
    assert pool.usage == 0.0  # cached-but-free blocks do not count
    pool.check_invariants()


def test_exact_lru_eviction_order_and_removed_events() -> None:
    pool = make_pool(6)
    a = pool.get_new_blocks(2)  # [1, 2]
    pool.cache_full_blocks(a, [11, 12], 0, 2)
    b = pool.get_new_blocks(2)  # [3, 4]
    pool.cache_full_blocks(b, [21, 22], 0, 2)
    pool.take_events()
    pool.free_blocks(reversed(a))  # queue: 5, 2, 1
    pool.free_blocks(reversed(b))  # queue: 5, 2, 1, 4, 3
    assert pool.free_queue() == [5, 2, 1, 4, 3]
    got = pool.get_new_blocks(4)
    assert got == [5, 2, 1, 4]
    assert [e.block_hashes for e in pool.take_events() if isinstance(e, BlockRemoved)] == [[12], [11], [22]]
    assert pool.get_cached_block(21) == 3 and pool.get_cached_block(11) is None
    pool.check_invariants()


def test_hit_touch_removes_from_queue_and_shares_ref_counts() -> None:
    pool = make_pool(8)
    a = pool.get_new_blocks(2)
    pool.cache_full_blocks(a, [1, 2], 0, 2)
    pool.free_blocks(reversed(a))
    hit = pool.find_longest_cache_hit([1, 2, 3], max_blocks=3)
    assert hit == [1, 2]
    assert pool.num_evictable(hit) == 2
    pool.touch(hit)  # request B
    pool.touch(hit[:1])  # request C shares the first block
    assert pool.ref_cnt[1] == 2 and pool.ref_cnt[2] == 1
    assert 1 not in pool.free_queue() and 2 not in pool.free_queue()
    pool.free_blocks(reversed(hit))  # B done: block 2 is free again, block 1 still held by C
    assert pool.free_queue()[-1] == 2 and 1 not in pool.free_queue()
    pool.free_blocks([1])
    assert pool.free_queue()[-2:] == [2, 1]
    pool.check_invariants()


def test_longest_hit_stops_at_first_miss_and_respects_cap() -> None:
    pool = make_pool(8)
    a = pool.get_new_blocks(3)
    pool.cache_full_blocks(a, [1, 2, 3], 0, 3)
    assert pool.find_longest_cache_hit([1, 9, 3], 3) == [1]
    assert pool.find_longest_cache_hit([1, 2, 3], 2) == [1, 2]


def test_stored_event_carries_parent_and_tokens_of_new_blocks_only() -> None:
    pool = make_pool(8)
    blocks = pool.get_new_blocks(3)
    tokens = list(range(12))
    pool.cache_full_blocks(blocks, [7, 8, 9], 0, 1, tokens)
    pool.cache_full_blocks(blocks, [7, 8, 9], 1, 3, tokens)
    ev = pool.take_events()
    assert all(isinstance(e, BlockStored) for e in ev)
    assert isinstance(ev[0], BlockStored) and isinstance(ev[1], BlockStored)
    assert (ev[0].block_hashes, ev[0].parent_block_hash, ev[0].token_ids) == ([7], None, [0, 1, 2, 3])
    assert (ev[1].block_hashes, ev[1].parent_block_hash, ev[1].token_ids) == ([8, 9], 7, list(range(4, 12)))
    assert ev[1].block_size == 4 and ev[1].medium == "GPU"


def test_same_hash_cached_twice_behaves_like_vllm() -> None:
    # Two requests computed the same block concurrently: both blocks stay cached under one key,
    # the first one is the hit, and evicting it emits BlockRemoved although a copy remains.
    pool = make_pool(6)
    a = pool.get_new_blocks(1)
    b = pool.get_new_blocks(1)
    pool.cache_full_blocks(a, [42], 0, 1)
    pool.cache_full_blocks(b, [42], 0, 1)
    assert pool.get_cached_block(42) == a[0]
    assert pool.num_cached_blocks == 2
    pool.free_blocks(a)
    pool.free_blocks(b)
    pool.take_events()
    pool.get_new_blocks(3)  # 3, 4, 5: untouched blocks first
    assert pool.get_new_blocks(1) == a
    assert pool.take_events() == [BlockRemoved(block_hashes=[42], medium="GPU", group_idx=0)]
    assert pool.get_cached_block(42) == b[0]
    pool.check_invariants()


def test_reset_refuses_while_blocks_are_used_then_clears() -> None:
    pool = make_pool(6)
    a = pool.get_new_blocks(2)
    pool.cache_full_blocks(a, [1, 2], 0, 2)
    assert pool.reset_prefix_cache() is False
    pool.free_blocks(reversed(a))
    pool.take_events()
    assert pool.reset_prefix_cache() is True
    assert pool.take_events() == [AllBlocksCleared()]
    assert pool.find_longest_cache_hit([1, 2], 2) == []
    pool.check_invariants()


def test_over_allocation_is_a_caller_bug() -> None:
    pool = make_pool(4)
    with pytest.raises(ValueError, match="free blocks"):
        pool.get_new_blocks(4)


def test_no_events_when_disabled() -> None:
    pool = make_pool(4, events=False)
    a = pool.get_new_blocks(1)
    pool.cache_full_blocks(a, [5], 0, 1)
    assert pool.take_events() == []


class _NaivePool:
    """The pool's rules written the slow, obvious way (a Python list as the free queue), to
    check the inlined loops and the chunked lookup of BlockPool against."""

    def __init__(self, n: int) -> None:
        self.queue = list(range(1, n))
        self.rc = [1] + [0] * (n - 1)
        self.hash: list[int | None] = [None] * n
        self.cached: dict[int, list[int]] = {}

    def hit(self, hashes: list[int], max_blocks: int) -> list[int]:
        out: list[int] = []
        for h in hashes[:max_blocks]:
            if h not in self.cached:
                break
            out.append(self.cached[h][0])
        return out

    def touch(self, ids: list[int]) -> None:
        for b in ids:
            if self.rc[b] == 0:
                self.queue.remove(b)
            self.rc[b] += 1

    def new(self, n: int) -> list[int]:
        out = self.queue[:n]
        del self.queue[:n]
        for b in out:
            h = self.hash[b]
            if h is not None:
                self.hash[b] = None
                self.cached[h].remove(b)
                if not self.cached[h]:
                    del self.cached[h]
            self.rc[b] = 1
        return out

    def store(self, ids: list[int], hashes: list[int]) -> None:
        for b, h in zip(ids, hashes, strict=True):
            self.hash[b] = h
            self.cached.setdefault(h, []).append(b)

    def free(self, ids: list[int]) -> None:
        first = []
        for b in ids:
            self.rc[b] -= 1
            if self.rc[b] == 0:
                if self.hash[b] is None:
                    first.append(b)
                else:
                    self.queue.append(b)
        self.queue[:0] = first


@pytest.mark.parametrize("seed", range(6))
def test_pool_matches_a_naive_model_under_random_requests(seed: int) -> None:
    """Random requests over a small hash space (hits, duplicates, evictions, partial blocks):
    the same hits, the same free-queue order, the same evictable counts, step after step."""
    import random

    rng = random.Random(seed)
    n = 64
    pool, ref = BlockPool(n, 4, enable_caching=True, emit_events=False), _NaivePool(n)
    live: list[tuple[list[int], list[int]]] = []
    for _ in range(400):
        if live and (rng.random() < 0.45 or pool.num_free < 12):
            blocks, _ = live.pop(rng.randrange(len(live)))
            pool.free_blocks(reversed(blocks))
            ref.free(list(reversed(blocks)))
        else:
            # a chain over few distinct prefixes, so hits and concurrent duplicates happen
            root = rng.randrange(4)
            hashes = [root * 1000 + j for j in range(rng.randrange(1, 10))]
            max_blocks = rng.randrange(0, 12)
            hit = pool.find_longest_cache_hit(hashes, max_blocks)
            assert hit == ref.hit(hashes, max_blocks)
            assert pool.num_evictable(hit) == sum(1 for b in hit if ref.rc[b] == 0)
            if rng.random() < 0.3:
                hit = []  # computed again although cached: a duplicate
            need = len(hashes) - len(hit) + rng.randrange(2)  # maybe a partial last block
            if need + pool.num_evictable(hit) > pool.num_free:
                continue
            pool.touch(hit)
            ref.touch(hit)
            new = pool.get_new_blocks(need)
            assert new == ref.new(need)
            blocks = hit + new
            pool.cache_full_blocks(blocks, hashes, len(hit), len(hashes))
            ref.store(blocks[len(hit) : len(hashes)], hashes[len(hit) :])
            live.append((blocks, hashes))
        assert pool.free_queue() == ref.queue
        assert pool.num_free == len(ref.queue)
        assert pool.ref_cnt == ref.rc
    pool.check_invariants()


def test_long_lookup_crosses_chunks_and_stops_at_the_first_miss() -> None:
    pool = BlockPool(2000, 4, enable_caching=True)
    blocks = pool.get_new_blocks(1000)
    hashes = list(range(10_000, 11_000))
    pool.cache_full_blocks(blocks, hashes, 0, 1000)
    assert pool.find_longest_cache_hit(hashes, 1000) == blocks
    assert pool.find_longest_cache_hit(hashes, 700) == blocks[:700]
    assert pool.find_longest_cache_hit([*hashes[:600], 1, *hashes[601:]], 1000) == blocks[:600]
    assert pool.find_longest_cache_hit([*hashes[:256], 5], 1000) == blocks[:256]
    assert pool.find_longest_cache_hit([], 10) == [] and pool.find_longest_cache_hit(hashes, 0) == []


def test_any_int_hash_is_cached_found_and_evicted() -> None:
    # The map is split by the hash's low bits: hashes that share them, negative ones and full
    # 64-bit ones must all behave as in one dict.
    hashes = [0, 64, -64, -1, 63, 2**64 - 1, 2**63, 128]
    pool = BlockPool(len(hashes) + 1, 4, enable_caching=True, emit_events=True)
    blocks = pool.get_new_blocks(len(hashes))
    pool.cache_full_blocks(blocks, hashes, 0, len(hashes))
    assert pool.find_longest_cache_hit(hashes, len(hashes)) == blocks
    assert [pool.get_cached_block(h) for h in hashes] == blocks
    assert pool.num_cached_blocks == len(hashes)
    pool.free_blocks(reversed(blocks))
    pool.take_events()
    pool.get_new_blocks(len(hashes))  # evicts them all, tail first
    removed = [e.block_hashes[0] for e in pool.take_events() if isinstance(e, BlockRemoved)]
    assert removed == hashes[::-1]
    assert pool.num_cached_blocks == 0 and pool.find_longest_cache_hit(hashes, 8) == []
    pool.check_invariants()


# ---- retention pins (a model of router-requested retention across agent tool pauses) ------------


def _cached_request(pool: BlockPool, hashes: list[int]) -> list[int]:
    blocks = pool.get_new_blocks(len(hashes))
    pool.cache_full_blocks(blocks, hashes, 0, len(hashes))
    return blocks


def test_pinned_blocks_survive_pressure_until_their_ttl() -> None:
    pool = BlockPool(11, 16)  # 10 usable
    held = _cached_request(pool, [1, 2, 3, 4])
    pool.pin(list(reversed(held)), until=100.0)
    assert pool.num_pinned == 4 and pool.num_free == 6
    other = _cached_request(pool, [10, 11, 12, 13, 14, 15])  # fills the free queue
    pool.free_blocks(reversed(other))
    pool.release_pins(now=50.0, need=6)  # enough free without touching the pin
    assert pool.num_pinned == 4
    assert pool.find_longest_cache_hit([1, 2, 3, 4], 4) == held  # still cached
    pool.release_pins(now=100.0)  # TTL over: back to the free queue, still cached (LRU)
    assert pool.num_pinned == 0 and pool.num_free == 10
    assert pool.find_longest_cache_hit([1, 2, 3, 4], 4) == held
    pool.check_invariants()


def test_pins_are_soft_an_allocation_takes_their_room() -> None:
    pool = BlockPool(11, 16)
    a = _cached_request(pool, [1, 2, 3, 4, 5])
    pool.pin(list(reversed(a)), until=100.0)
    b = _cached_request(pool, [6, 7, 8, 9, 10])
    pool.pin(list(reversed(b)), until=200.0)
    assert pool.num_free == 0
    pool.release_pins(now=1.0, need=3)  # the earliest-expiring pin goes first
    assert pool.num_pinned == 5 and pool.num_free == 5 and pool.pins_released_early == 1
    assert pool.find_longest_cache_hit([6, 7, 8, 9, 10], 5) == b
    pool.check_invariants()
