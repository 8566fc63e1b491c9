"""Block pool in vLLM semantics: exact free-queue and eviction order (as vLLM's
tests/v1/core/test_prefix_caching.py asserts them), ref-count sharing, duplicates, reset."""

from __future__ import annotations

import pytest

from engines.sim.block_pool import BlockPool
from router.kv_wire import AllBlocksCleared, BlockRemoved, BlockStored


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
