"""The block hashes a replica's KV events carry: vLLM's sha256 chain, or the engine's own xxh3.

The engine identifies blocks by its cheap xxh3 chain (``model.block_hash``); a KV event is where
a client sees block hashes, so that is where they are translated (``VllmEventHashes``) or passed
through (``EngineEventHashes``), one step's batch at a time.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Sequence
from typing import cast

import msgspec

from ..wire import BlockRemoved, BlockStored, EngineHash, KVEvent

# -- vLLM's block hash (``--prefix-caching-hash-algo sha256``, the default) ---------------------
# h_i = sha256(pickle((h_{i-1} digest, tuple(block tokens), extra_keys), protocol 5)); the first
# parent is NONE_HASH = sha256(pickle("vllm-none-hash")) when PYTHONHASHSEED is unset. Chaining uses
# the full 32-byte digest; events carry its low 64 bits as an int
# (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1, the default) or the raw digest. About 2.5 us per block.


def sha256_hash(obj: object) -> bytes:
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()


NONE_HASH: bytes = sha256_hash("vllm-none-hash")


def block_hash(parent: bytes | None, tokens: tuple[int, ...], extra_keys: object = None) -> bytes:
    return sha256_hash((NONE_HASH if parent is None else parent, tokens, extra_keys))


def block_hash_chain(
    tokens: list[int] | tuple[int, ...], block_size: int, parent: bytes | None = None
) -> list[bytes]:
    """Digests of the full blocks of ``tokens``, chained from ``parent`` (None: prompt start)."""
    out: list[bytes] = []
    h = parent
    for i in range(len(tokens) // block_size):
        h = block_hash(h, tuple(tokens[i * block_size : (i + 1) * block_size]))
        out.append(h)
    return out


def external_hash(digest: bytes, use_int: bool = True) -> EngineHash:
    """The form a hash takes in KV events: low 64 bits big-endian as int, or the raw digest."""
    return int.from_bytes(digest, "big") & 0xFFFF_FFFF_FFFF_FFFF if use_int else digest


class EngineEventHashes:
    """KV events with the engine's own block identity (``--kv-event-hashes engine``): its xxh3
    chain values as u64 ints, or as their 8 big-endian bytes when the replica publishes digests.
    Consistent per block and chained like vLLM's, so "the same sequence of hashes modulo the hash
    function" holds, and a subscriber that re-hashes each ``BlockStored``'s ``token_ids`` (kvrouter
    does) sees no difference. What it saves is ``VllmEventHashes``' pickle + sha256 per stored
    block: about a sixth of a loaded 16-replica sim's CPU (71 -> 59-61 us per token in
    tests/bench/bench_sim_live.py)."""

    algo = "kvrouter-xxh3"  # vllm:cache_config_info's prefix_caching_hash_algo: none of vLLM's

    def __init__(self, *, as_bytes: bool = False) -> None:
        self.as_bytes = as_bytes

    def clear(self) -> None:
        """Stateless: nothing to forget on a restart."""

    def translate(self, events: list[KVEvent]) -> list[KVEvent]:
        """The same list, its hashes as 8 big-endian bytes when ``as_bytes``. In place: a step's
        events are its own and published once, and a prefill step's 512 ``BlockRemoved`` (one
        per evicted block, as vLLM sends them) copied with ``msgspec.structs.replace`` cost
        ~0.3 ms a step, 2.7x setting the one field (measured on a 513-event batch)."""
        if not self.as_bytes:
            return events
        for ev in events:
            if type(ev) is BlockRemoved:
                hs = cast("list[int]", ev.block_hashes)
                ev.block_hashes = [hs[0].to_bytes(8, "big")] if len(hs) == 1 else _u64_bytes(hs)
            elif type(ev) is BlockStored:
                ev.block_hashes = _u64_bytes(cast("list[int]", ev.block_hashes))
                parent = cast("int | None", ev.parent_block_hash)
                if parent is not None:
                    ev.parent_block_hash = parent.to_bytes(8, "big")
        return events


def _u64_bytes(hashes: list[int]) -> list[EngineHash]:
    return [h.to_bytes(8, "big") for h in hashes]


class VllmEventHashes:
    """Engine block hashes -> vLLM's in KV events, so a subscriber sees exactly the hashes a real
    vLLM 0.32 (``--prefix-caching-hash-algo sha256``) publishes for the same tokens.

    Why the engine does not simply hash with sha256: its prefix cache only needs *a* chained
    identity per block, and the engine's xxh3 chain (``model.block_hash.XxhBlockHasher``) costs ~0.3 us a
    block against ~2 us for pickle + sha256. Every prompt block is hashed when its request arrives
    (a Mooncake burst is ~100k tokens), but only *stored* blocks reach an event, and they are
    hashed here, when the step that stored them publishes.

    How it stays exact: a ``BlockStored`` carries its blocks' tokens, and its parent is a block
    this replica caches (the request holds it) or one stored in the same event, so every digest
    is ``sha256((parent digest, block tokens, None))`` from digests already known. State: digest
    and a count of cached copies per engine hash, for exactly the blocks some tier of this replica
    caches: +1 per ``BlockStored`` (GPU copies in the low 32 bits, CPU-tier copies above), -1 per
    ``BlockRemoved``, GPU copies dropped on ``AllBlocksCleared``, everything on ``clear`` (a
    restart). So it is bounded by what the engine caches, and it
    never forgets a block that a later event can name. Both dicts hold only ints and bytes: the
    cyclic GC never walks them. A hash it does not know (none in practice; counted in
    ``misses``) is published as the sha256 of its int's bytes: deterministic, not vLLM's value.
    """

    _CPU = 1 << 32
    algo = "sha256"  # vllm:cache_config_info's prefix_caching_hash_algo, as vLLM reports it

    def __init__(self, *, as_bytes: bool = False) -> None:
        self.as_bytes = as_bytes
        self._digest: dict[int, bytes] = {}
        self._copies: dict[int, int] = {}
        self.misses = 0

    def __len__(self) -> int:
        return len(self._digest)

    def digest(self, h: int) -> bytes | None:
        return self._digest.get(h)

    def clear(self) -> None:
        """A process restart: nothing is cached."""
        self._digest.clear()
        self._copies.clear()

    def _drop_gpu_copies(self) -> None:
        copies, digest = self._copies, self._digest
        for h, c in list(copies.items()):
            c &= ~(self._CPU - 1)
            if c:
                copies[h] = c
            else:
                del copies[h]
                digest.pop(h, None)

    def _external(self, d: bytes) -> EngineHash:
        return d if self.as_bytes else int.from_bytes(d[24:], "big")

    def _known(self, h: int) -> bytes:
        d = self._digest.get(h)
        if d is None:
            self.misses += 1
            d = hashlib.sha256(h.to_bytes(8, "big")).digest()
        return d

    def translate(self, events: Sequence[KVEvent]) -> list[KVEvent]:
        """The same events, in order, with vLLM's hashes; updates the cached-copies count."""
        out: list[KVEvent] = []
        digest, copies = self._digest, self._copies
        ext = self._external
        for ev in events:
            if isinstance(ev, BlockStored):
                inc = self._CPU if ev.medium == "CPU" else 1
                # The engine's events carry its int hashes (EngineHash only widens the wire type)
                parent = cast("int | None", ev.parent_block_hash)
                pd = NONE_HASH if parent is None else self._known(parent)
                ext_parent = None if parent is None else ext(pd)
                toks = ev.token_ids
                bs = ev.block_size
                hashes: list[EngineHash] = []
                for i, h in enumerate(cast("list[int]", ev.block_hashes)):
                    d = digest.get(h)
                    if d is None:
                        if len(toks) >= (i + 1) * bs:
                            d = sha256_hash((pd, tuple(toks[i * bs : (i + 1) * bs]), None))
                        else:  # no tokens (a CPU-tier store) and never seen on the GPU
                            d = self._known(h)
                        digest[h] = d
                    copies[h] = copies.get(h, 0) + inc
                    hashes.append(ext(d))
                    pd = d
                out.append(
                    msgspec.structs.replace(
                        ev,
                        block_hashes=hashes,
                        parent_block_hash=ext_parent,
                    )
                )
            elif isinstance(ev, BlockRemoved):
                dec = self._CPU if ev.medium == "CPU" else 1
                hashes = []
                for h in cast("list[int]", ev.block_hashes):
                    hashes.append(ext(self._known(h)))
                    c = copies.get(h, 0) - dec
                    if c > 0:
                        copies[h] = c
                    else:
                        copies.pop(h, None)
                        digest.pop(h, None)
                out.append(msgspec.structs.replace(ev, block_hashes=hashes))
            else:  # AllBlocksCleared: the GPU prefix cache was reset
                self._drop_gpu_copies()
                out.append(ev)
        return out
