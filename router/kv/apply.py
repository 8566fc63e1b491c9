"""Apply one KV-event batch to the prefix index: the only applier, live and offline.

The live subscriber (``ReplicaEvents`` in stream.py) and the offline simulator
(traces/simulate.py) both call ``apply_batch``; they differ only in the ``BlockKeys`` they pass.
Live, engine hashes are re-hashed into router keys through a per-replica map (stream.py);
offline, the simulated engines already publish router keys, so ``IdentityKeys`` passes them
through. Either way the same code decides tiers, event order and which index calls happen.

Events are the decoded views (decode.py) or the full wire structs (wire.py): they share field
names, and the applier reads only ``block_hashes``, ``medium`` and what ``BlockKeys`` reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

from router.kv.decode import AllBlocksClearedView, BlockRemovedView, BlockStoredView
from router.kv.wire import AllBlocksCleared, BlockRemoved, BlockStored, EngineHash
from router.types import BlockHash, ReplicaId, Tier

StoredEvent = BlockStoredView | BlockStored
RemovedEvent = BlockRemovedView | BlockRemoved
AnyEvent = StoredEvent | RemovedEvent | AllBlocksClearedView | AllBlocksCleared

_REMOVED = (BlockRemovedView, BlockRemoved)
_STORED = (BlockStoredView, BlockStored)


class IndexSink(Protocol):
    """What the applier needs from router/index.py's PrefixIndex (which satisfies it)."""

    def store(
        self, replica: ReplicaId, hashes: Sequence[BlockHash], tier: Tier = ..., *, speculative: bool = ...
    ) -> None: ...

    def remove(self, replica: ReplicaId, hashes: Sequence[BlockHash], tier: Tier = ...) -> None: ...

    def clear(self, replica: ReplicaId, tier: Tier | None = ...) -> None: ...


class BlockKeys(Protocol):
    """Turns a replica's engine block hashes into index keys, remembering what it handed out."""

    def stored(self, ev: StoredEvent, tier: Tier) -> Sequence[BlockHash]:
        """Keys to store for this event (empty: nothing reproducible)."""
        ...

    def removed(self, engine_hashes: Sequence[EngineHash], tier: Tier, out: list[BlockHash]) -> int:
        """Append the keys to retract to ``out``; return how many hashes were never stored."""
        ...

    def cleared(self) -> None:
        """The replica dropped everything (the index is already cleared)."""
        ...

    def bound(self) -> None:
        """Called after each store reached the index: evict over-capacity entries, if any."""
        ...


class IdentityKeys:
    """Engine hashes are already index keys (the offline simulator's engines hash like the router)."""

    def stored(self, ev: StoredEvent, tier: Tier) -> Sequence[BlockHash]:
        return cast(list[BlockHash], ev.block_hashes)

    def removed(self, engine_hashes: Sequence[EngineHash], tier: Tier, out: list[BlockHash]) -> int:
        out.extend(cast(Sequence[BlockHash], engine_hashes))
        return 0

    def cleared(self) -> None:
        pass

    def bound(self) -> None:
        pass


IDENTITY_KEYS = IdentityKeys()


@dataclass(slots=True)
class BatchCounts:
    """What one batch did, for the caller's stats and metrics."""

    stored_events: int = 0
    removed_events: int = 0
    cleared_events: int = 0
    blocks_stored: int = 0
    blocks_removed: int = 0
    unknown_removals: int = 0


def event_tier(medium: str | None) -> Tier:
    # vLLM reports "GPU" even on its CPU backend; anything else (LMCache "CPU", "DISK", ...) is
    # an offload tier that costs a load, which is what Tier.CPU means to scoring.
    return Tier.GPU if medium is None or medium.upper() == "GPU" else Tier.CPU


def apply_batch(
    index: IndexSink, replica: ReplicaId, events: Iterable[AnyEvent], keys: BlockKeys
) -> BatchCounts:
    """Apply ``events`` in order. vLLM sends one BlockRemoved event per evicted block, so
    per-event costs dominate a busy stream: a run of removals on one tier becomes one index
    call (no store or clear runs in between, so the order the index sees holds), and counts
    stay in locals until the end."""
    n_stored = n_removed = n_cleared = blocks_stored = blocks_removed = unknown = 0
    pending: list[BlockHash] = []
    pending_tier = Tier.GPU
    removed = keys.removed
    for ev in events:
        if isinstance(ev, _REMOVED):
            n_removed += 1
            tier = event_tier(ev.medium)
            if pending and tier is not pending_tier:
                index.remove(replica, pending, pending_tier)
                blocks_removed += len(pending)
                pending = []
            pending_tier = tier
            unknown += removed(ev.block_hashes, tier, pending)
            continue
        if pending:
            index.remove(replica, pending, pending_tier)
            blocks_removed += len(pending)
            pending = []
        if isinstance(ev, _STORED):
            n_stored += 1
            tier = event_tier(ev.medium)
            stored = keys.stored(ev, tier)
            if stored:
                index.store(replica, stored, tier)
                blocks_stored += len(stored)
                keys.bound()
        else:
            n_cleared += 1
            index.clear(replica)
            keys.cleared()
    if pending:
        index.remove(replica, pending, pending_tier)
        blocks_removed += len(pending)
    return BatchCounts(n_stored, n_removed, n_cleared, blocks_stored, blocks_removed, unknown)
