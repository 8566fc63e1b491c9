"""Optional CPU KV tier, modelled on LMCache's local CPU backend (LRU, fixed-size chunks).

What is modelled and why:
- **Store on compute, not on eviction.** LMCache (and vLLM's OffloadingConnector) save a
  request's prompt KV as prefill computes it, so the CPU tier holds prompt chunks whether or not
  the GPU later evicts them. Decode tokens are not saved (LMCache ``save_decode_cache=False``).
- **Chunks of ``chunk_tokens`` (LMCache default 256), prefix-chained.** A chunk's key is the
  engine hash of its last block: block hashes are chained, so that one hash names the whole
  prefix up to the chunk end, exactly like LMCache's prefix-hashed chunk keys. A chunk is a
  whole number of blocks; with blocks at least as large as a chunk (the simulator's 512-token
  blocks) a chunk is one block.
- **Last partial chunk**, only with ``save_unfull_chunk=True`` (LMCache 0.5.6 defaults to false,
  and its MP server stores whole chunks only; so does this tier by default): the full blocks after the last chunk
  boundary are stored as one shorter chunk, keyed by its last block's hash. Like LMCache's
  partial-chunk key it only matches a request with the same prefix *and* the same number of
  full blocks (a longer request probes a full chunk there, whose key differs). Partial *blocks*
  are never stored: vLLM could not use them (it loads whole blocks and recomputes the rest).
- **Lookup** walks chunk keys from the start and stops at the first miss (prefix rule);
  hits refresh LRU order. **Store** is insert-if-absent and does not refresh (LMCache skips
  keys it already holds). Eviction is LRU by whole chunks until the new chunk fits.

Capacity is in tokens. Events (optional) use medium "CPU", one ``BlockStored`` per stored chunk
(its block hashes, parented on the block before the chunk) and one ``BlockRemoved`` per evicted
chunk, as vLLM's OffloadingConnector publishes them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from ..wire import BlockRemoved, BlockStored, EngineHash, KVEvent


class CpuTier:
    __slots__ = (
        "_chunks",
        "_events",
        "block_size",
        "capacity_tokens",
        "chunk_blocks",
        "emit_events",
        "save_unfull_chunk",
        "used_tokens",
    )

    def __init__(
        self,
        capacity_tokens: int,
        chunk_tokens: int,
        block_size: int,
        *,
        emit_events: bool = False,
        save_unfull_chunk: bool = False,
    ):
        """Bound: ``capacity_tokens``. Eviction: LRU over whole chunks."""
        if capacity_tokens <= 0:
            raise ValueError(f"invalid cpu_tier_tokens: {capacity_tokens} (must be > 0 to enable the tier)")
        if chunk_tokens <= 0:
            raise ValueError(f"invalid cpu_chunk_tokens: {chunk_tokens} (must be > 0)")
        self.capacity_tokens = capacity_tokens
        self.block_size = block_size
        self.chunk_blocks = max(1, chunk_tokens // block_size)
        self.emit_events = emit_events
        self.save_unfull_chunk = save_unfull_chunk
        self.used_tokens = 0
        # key (hash of the chunk's last block) -> (number of blocks, block hashes, parent hash); the
        # hashes are kept only for the chunk's events, so they are typed as the events' lists.
        self._chunks: OrderedDict[int, tuple[int, list[EngineHash], int | None]] = OrderedDict()
        self._events: list[KVEvent] = []

    def __len__(self) -> int:
        return len(self._chunks)

    def __contains__(self, key: int) -> bool:
        return key in self._chunks

    def lookup(self, block_hashes: Sequence[int]) -> int:
        """Number of leading blocks of ``block_hashes`` held by the tier (chunk granularity)."""
        chunks = self._chunks
        cb = self.chunk_blocks
        n = len(block_hashes)
        hit = 0
        while hit + cb <= n:
            key = block_hashes[hit + cb - 1]
            if key not in chunks:
                return hit
            chunks.move_to_end(key)
            hit += cb
        if hit < n and block_hashes[n - 1] in chunks:  # the final partial chunk
            chunks.move_to_end(block_hashes[n - 1])
            hit = n
        return hit

    def store(self, block_hashes: Sequence[int], start_block: int, end_block: int, final: bool) -> int:
        """Store the chunks of blocks ``[start_block, end_block)`` (``start_block`` on a chunk
        boundary); with ``final`` the trailing partial chunk too. Returns the block index up to
        which chunks are now stored, for the caller to resume from."""
        cb = self.chunk_blocks
        b = start_block
        while b + cb <= end_block:
            self._put(block_hashes, b, cb)
            b += cb
        if final and self.save_unfull_chunk and b < end_block:
            self._put(block_hashes, b, end_block - b)
            b = end_block
        return b

    def _put(self, block_hashes: Sequence[int], start: int, nblocks: int) -> None:
        key = block_hashes[start + nblocks - 1]
        if key in self._chunks:
            return
        size = nblocks * self.block_size
        if size > self.capacity_tokens:
            return
        while self.used_tokens + size > self.capacity_tokens:
            _, (nb, hashes, _) = self._chunks.popitem(last=False)
            self.used_tokens -= nb * self.block_size
            if self.emit_events:
                self._events.append(BlockRemoved(block_hashes=hashes, medium="CPU", group_idx=0))
        parent = block_hashes[start - 1] if start > 0 else None
        hashes = list(block_hashes[start : start + nblocks]) if self.emit_events else []
        self._chunks[key] = (nblocks, hashes, parent)
        self.used_tokens += size
        if self.emit_events:
            self._events.append(
                BlockStored(
                    block_hashes=hashes,
                    parent_block_hash=parent,
                    token_ids=[],
                    block_size=self.block_size,
                    lora_id=None,
                    medium="CPU",
                    lora_name=None,
                )
            )

    def clear(self) -> None:
        self._chunks.clear()
        self.used_tokens = 0

    @property
    def usage(self) -> float:
        return self.used_tokens / self.capacity_tokens

    def take_events(self) -> list[KVEvent]:
        ev = self._events
        self._events = []
        return ev

    def check_invariants(self) -> None:
        assert self.used_tokens == sum(nb for nb, _, _ in self._chunks.values()) * self.block_size
        assert self.used_tokens <= self.capacity_tokens
