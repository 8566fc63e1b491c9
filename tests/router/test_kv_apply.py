"""router/kv/apply.py: the one KV-event applier, as the live stream and the offline simulator use it."""

from __future__ import annotations

from collections.abc import Sequence

from router.index import PrefixIndex
from router.kv.apply import IDENTITY_KEYS, apply_batch
from router.kv.wire import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from router.types import BlockHash, ReplicaId, Tier

R = ReplicaId("r0")


class Recorder:
    """An IndexSink that records the calls it gets, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[int], Tier | None]] = []

    def store(
        self,
        replica: ReplicaId,
        hashes: Sequence[BlockHash],
        tier: Tier = Tier.GPU,
        *,
        speculative: bool = False,
    ) -> None:
        self.calls.append(("store", list(hashes), tier))

    def remove(self, replica: ReplicaId, hashes: Sequence[BlockHash], tier: Tier = Tier.GPU) -> None:
        self.calls.append(("remove", list(hashes), tier))

    def clear(self, replica: ReplicaId, tier: Tier | None = None) -> None:
        self.calls.append(("clear", [], tier))


def stored(hashes: list[int], medium: str = "GPU") -> BlockStored:
    return BlockStored(list(hashes), None, [0] * 4 * len(hashes), 4, None, medium, None)


def test_runs_of_removals_on_one_tier_become_one_index_call() -> None:
    events: list[KVEvent] = [
        stored([1, 2, 3]),
        BlockRemoved([1], "GPU"),
        BlockRemoved([2], "GPU"),
        BlockRemoved([3], "CPU"),
        BlockRemoved([4], "CPU"),
        stored([5], "CPU"),
        BlockRemoved([5], "CPU"),
        AllBlocksCleared(),
    ]
    rec = Recorder()
    n = apply_batch(rec, R, events, IDENTITY_KEYS)
    assert rec.calls == [
        ("store", [1, 2, 3], Tier.GPU),
        ("remove", [1, 2], Tier.GPU),
        ("remove", [3, 4], Tier.CPU),
        ("store", [5], Tier.CPU),
        ("remove", [5], Tier.CPU),
        ("clear", [], None),
    ]
    assert (n.stored_events, n.removed_events, n.cleared_events) == (2, 5, 1)
    assert (n.blocks_stored, n.blocks_removed, n.unknown_removals) == (4, 5, 0)


def test_identity_keys_fill_a_real_index() -> None:
    index = PrefixIndex(100)
    index.add_replica(R)
    apply_batch(index, R, [stored([7, 8, 9]), BlockRemoved([9], "GPU")], IDENTITY_KEYS)
    assert [index.holds(R, BlockHash(h)) for h in (7, 8, 9)] == [True, True, False]
    assert index.replica_blocks(R) == 2
    index.check_invariants()
