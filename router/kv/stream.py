"""One replica's KV-event stream: sequence rules, engine->router key map, uncertainty.


Mapping: engine hashes depend on vLLM's hash settings (sha256 with a per-process seed unless
PYTHONHASHSEED is fixed), so we ignore their values and re-hash each BlockStored's ``token_ids``
with the router's chain (hashing.py). ``ReplicaEvents`` keeps, per replica, engine hash ->
[router hash, copies on GPU, copies on CPU, epoch]; a parent's router hash seeds its children.
The map is an LRU of ``capacity`` entries; evicting an entry also removes its copies from the
index so the two never disagree about what is confirmed.

Sequence rules (one stream per replica; seq counts from 0 per publisher process):
* ``seq == last + 1``: apply.
* ``seq > last + 1``: a gap. With a replay endpoint, fetch ``last+1..`` and apply in order
  (dedupe by seq). Without one (or if replay cannot cover it) the replica is *uncertain*: batches
  we never saw may have removed blocks we still claim. Uncertainty clears when every entry that
  existed at the gap has left the map (removed by an event or LRU-evicted), on AllBlocksCleared,
  or on a restart: each of those leaves no entry that predates the gap.
* ``seq <= last``: a restart if ``seq < last - restart_window`` or the batch is stamped later than
  anything applied (a duplicate carries the same bytes, hence the same ts, as the copy we applied;
  a restarted engine numbers again from 0 but its clock moved on). A restart clears the
  replica's entries. Otherwise a stale duplicate (replay overlap): dropped and counted.
* On connecting, and again for a first batch with ``seq > 0`` (router joined late, or re-joined
  after a restart), a replica with a replay endpoint is backfilled from seq 0: the engine's buffer (10k batches) holds
  what is cached right now, which PUB/SUB alone never re-sends.
* A payload that does not decode is counted and dropped; its seq is consumed and the replica is
  uncertain (the lost batch may have held removals).

Everything here is synchronous and I/O-free (subscriber.py does the sockets); the index is
changed only through ``apply_batch`` (apply.py) and on restart/eviction.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from router.hashing import hash_token_blocks, model_seed
from router.kv.apply import BlockKeys, IndexSink, StoredEvent, apply_batch
from router.kv.decode import DecodedBatch, DecodeError, decode_batch
from router.kv.metrics import KVEventMetrics, default_metrics
from router.kv.wire import EngineHash
from router.types import BlockHash, ReplicaId, Tier

log = logging.getLogger(__name__)

DEFAULT_CAPACITY = 1 << 18  # engine->router entries per replica; pass the index's per-replica capacity
DEFAULT_RESTART_WINDOW = 10_000  # vLLM's default replay buffer_steps: no duplicate can be older


class ReplayRequest(NamedTuple):
    start: int  # first seq to ask the replay endpoint for
    seq: int  # the live batch that triggered it, applied after the replay
    batch: DecodedBatch | None


@dataclass(slots=True)
class KVEventStats:
    """Per-replica stream state, for /debug and the replica table."""

    last_seq: int | None = None
    batches: int = 0
    events: int = 0
    blocks_stored: int = 0
    blocks_removed: int = 0
    gaps: int = 0
    restarts: int = 0
    replays: int = 0
    stale: int = 0
    orphans: int = 0
    decode_errors: int = 0
    cpu_events: int = 0  # BlockStored events of an offload tier (LMCache lmcache_driven): events mode
    uncertain: bool = False
    last_event_time: float | None = None  # clock() when the last batch was applied
    endpoint: str | None = None  # actual endpoint (after bind, the resolved port)
    connected: bool = False
    errors: list[str] = field(default_factory=list)  # last few socket errors, newest last


# entry layout: [router hash, copies on GPU, copies on CPU, epoch]
_R, _GPU, _CPU, _EPOCH = 0, 1, 2, 3


class ReplicaEvents:
    """One replica's KV-event stream: sequence checks + engine->router mapping + index updates.

    Synchronous and I/O-free: the subscriber feeds it messages; the offline simulator and tests
    can feed it directly. Bound: ``capacity`` map entries, LRU; see the module docstring.
    """

    def __init__(
        self,
        replica: ReplicaId,
        index: IndexSink,
        *,
        model: str,
        block_size: int | None = None,
        capacity: int = DEFAULT_CAPACITY,
        replay: bool = False,
        restart_window: int = DEFAULT_RESTART_WINDOW,
        metrics: KVEventMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 (current value: {capacity})")
        self.replica = replica
        self.index = index
        self.model = model
        self.block_size = block_size
        self.capacity = capacity
        self.replay = replay
        self.restart_window = restart_window
        self.metrics = metrics if metrics is not None else default_metrics()
        self.clock = clock
        self.stats = KVEventStats()
        self._map: OrderedDict[EngineHash, list[int]] = OrderedDict()
        # An offload-tier chunk (LMCache: 256 tokens, one engine hash) re-hashed at the router's
        # block size covers several router blocks: engine hash -> all of them, head first. The
        # map entry's router hash is the last one (it seeds the chunk's children).
        self._spans: dict[EngineHash, list[BlockHash]] = {}
        self._last_ts = -math.inf
        self._arrays = False  # event shape that decoded last time
        self._epoch = 0  # entries with epoch < _suspect_epoch predate the last gap
        self._suspect_epoch = 0
        self._suspects = 0
        self._logged: set[str] = set()
        self._m_decode = self.metrics.decode_errors.labels(replica)
        self._m_gaps = self.metrics.gaps.labels(replica)
        self._m_restarts = self.metrics.restarts.labels(replica)
        self._m_uncertain = self.metrics.uncertain.labels(replica)
        self._m_uncertain.set(0)
        self._keys: BlockKeys = _LiveKeys(self)

    # -- public -----------------------------------------------------------------------------

    @property
    def uncertain(self) -> bool:
        return self.stats.uncertain

    def __len__(self) -> int:
        return len(self._map)

    def router_hash(self, engine_hash: EngineHash) -> BlockHash | None:
        ent = self._map.get(engine_hash)
        return None if ent is None else BlockHash(ent[_R])

    def handle_frames(self, frames: Sequence[bytes]) -> ReplayRequest | None:
        """One live ZMQ message ``[topic, seq8, payload]``. Never raises on bad input."""
        if len(frames) != 3 or len(frames[1]) != 8:
            self._decode_error("live message is not [topic, seq8, payload]")
            return None
        return self.on_message(int.from_bytes(frames[1], "big", signed=True), frames[2])

    def on_message(self, seq: int, payload: bytes) -> ReplayRequest | None:
        """Apply one batch, or return the replay to fetch first (the caller then calls
        ``finish_replay``). Mutates the index only in the first case."""
        if seq < 0:
            self._decode_error(f"negative seq {seq} on a live message")
            return None
        batch = self._decode(payload)
        last = self.stats.last_seq
        if last is not None and seq <= last:
            if not self._is_restart(seq, last, batch):
                self.stats.stale += 1
                self.metrics.stale.inc()
                return None
            self._restart(seq, last)
            last = None
        if last is None:
            if seq > 0 and self.replay:
                return ReplayRequest(0, seq, batch)  # backfill what the engine caches already
            self._accept(seq, batch)
            return None
        if seq == last + 1:
            self._accept(seq, batch)
            return None
        if self.replay:
            return ReplayRequest(last + 1, seq, batch)
        self._gap(last, seq)
        self._accept(seq, batch)
        return None

    def finish_replay(self, req: ReplayRequest, frames: Sequence[tuple[int, bytes]], complete: bool) -> None:
        """Apply replayed ``(seq, payload)`` in order, then the live batch that asked for them."""
        self.stats.replays += 1
        if not frames and not complete:
            self.metrics.replays.labels("failed").inc()
        else:
            self.metrics.replays.labels("ok" if complete else "partial").inc()
        for seq, payload in frames:
            self._advance(seq, self._decode(payload))
        self._advance(req.seq, req.batch)

    def bootstrap(self, frames: Sequence[tuple[int, bytes]], complete: bool) -> None:
        """Cold start: apply the engine's replay buffer (what it caches now) before any live
        batch. PUB/SUB never re-sends what was published before we subscribed, so without this a
        router that joins an idle fleet would know nothing until new traffic arrives."""
        if self.stats.last_seq is not None:
            return  # live batches already started this stream
        self.stats.replays += 1
        self.metrics.replays.labels("ok" if complete else ("partial" if frames else "failed")).inc()
        for seq, payload in sorted(frames, key=lambda f: f[0]):
            self._advance(seq, self._decode(payload))

    # -- sequence ---------------------------------------------------------------------------

    def _advance(self, seq: int, batch: DecodedBatch | None) -> None:
        last = self.stats.last_seq
        if last is not None and seq <= last:
            return  # already applied (replay overlap): not stale, we asked for it
        if last is not None and seq > last + 1:
            self._gap(last, seq)
        self._accept(seq, batch)

    def _is_restart(self, seq: int, last: int, batch: DecodedBatch | None) -> bool:
        if seq < last - self.restart_window:
            return True
        return batch is not None and batch.ts > self._last_ts

    def _restart(self, seq: int, last: int) -> None:
        self.stats.restarts += 1
        self._m_restarts.inc()
        self._log_once("restart", "KV events of %s restarted (seq %d after %d): clearing", seq, last)
        self._clear()
        self.stats.last_seq = None
        self._last_ts = -math.inf

    def _gap(self, last: int, seq: int) -> None:
        self.stats.gaps += 1
        self._m_gaps.inc()
        self._log_once("gap", "KV events of %s: gap, seq %d after %d (logged once)", seq, last)
        self.mark_uncertain()

    def _accept(self, seq: int, batch: DecodedBatch | None) -> None:
        self.stats.last_seq = seq
        if batch is None:
            self.mark_uncertain()  # the lost batch may have held removals
            return
        self._apply(batch)
        if batch.ts > self._last_ts:
            self._last_ts = batch.ts

    def _decode(self, payload: bytes) -> DecodedBatch | None:
        try:
            batch = decode_batch(payload, self._arrays)
        except DecodeError as exc:
            self._decode_error(str(exc))
            return None
        self._arrays = batch.arrays
        return batch

    def _decode_error(self, why: str) -> None:
        self.stats.decode_errors += 1
        self._m_decode.inc()
        self._log_once("decode", "KV events of %s: %s (logged once)", why)

    def _log_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.warning(msg, self.replica, *args)

    # -- uncertainty ------------------------------------------------------------------------

    def mark_uncertain(self) -> None:
        # Every entry held now may be stale; entries stored from here on are not.
        self._epoch += 1
        self._suspect_epoch = self._epoch
        self._suspects = len(self._map)
        self._set_uncertain(self._suspects > 0)

    def _set_uncertain(self, value: bool) -> None:
        if self.stats.uncertain != value:
            self.stats.uncertain = value
            self._m_uncertain.set(1 if value else 0)
            # PrefixIndex keeps its own flag (its metrics and /debug read it); optional in the
            # sink protocol so a bare store/remove/clear sink still works.
            setter = getattr(self.index, "set_uncertain", None)
            if setter is not None:
                with contextlib.suppress(KeyError):
                    setter(self.replica, value)

    def _forget_entry(self, ent: list[int]) -> None:
        if ent[_EPOCH] < self._suspect_epoch:
            self._suspects -= 1
            if self._suspects == 0:
                self._set_uncertain(False)

    def _clear(self) -> None:
        self.index.clear(self.replica)
        self._cleared()

    def reset(self) -> None:
        """The engine's prefix cache was reset through the router (fleet_admin.py)."""
        self._clear()

    def _cleared(self) -> None:
        self._map.clear()
        self._spans.clear()
        self._suspects = 0
        self._set_uncertain(False)

    # -- apply ------------------------------------------------------------------------------

    def _apply(self, batch: DecodedBatch) -> None:
        # Counters are summed per batch: per-event metric calls would dominate a busy stream.
        n = apply_batch(self.index, self.replica, batch.events, self._keys)
        st = self.stats
        m = self.metrics
        st.batches += 1
        st.events += len(batch.events) + batch.unknown
        st.last_event_time = self.clock()
        st.blocks_stored += n.blocks_stored
        st.blocks_removed += n.blocks_removed
        m.batches.inc()
        if n.stored_events:
            m.ev_stored.inc(n.stored_events)
        if n.removed_events:
            m.ev_removed.inc(n.removed_events)
        if n.cleared_events:
            m.ev_cleared.inc(n.cleared_events)
        if batch.unknown:
            m.ev_unknown.inc(batch.unknown)
        if n.blocks_stored:
            m.blocks_stored.inc(n.blocks_stored)
        if n.blocks_removed:
            m.blocks_removed.inc(n.blocks_removed)
        if n.unknown_removals:
            m.unknown_removals.inc(n.unknown_removals)

    # Over the complexity limit on purpose: each branch is one of vLLM's BlockStored shapes (parent
    # known or not, tokens or not, hashes as ints or bytes); together they read as the wire contract.
    def _stored_keys(self, ev: StoredEvent, tier: Tier) -> Sequence[BlockHash]:  # noqa: C901
        """Map a BlockStored's engine hashes to router keys (re-hashed from its tokens)."""
        engine_hashes = ev.block_hashes
        n = len(engine_hashes)
        bs = ev.block_size
        if tier is Tier.CPU:
            self.stats.cpu_events += 1
        if n == 0:
            return ()
        if bs == 0:  # native offload placeholder: names engine hashes, carries no tokens
            self.metrics.unmodeled.inc(n)
            return ()
        if len(ev.token_ids) != n * bs:
            if len(ev.token_ids) > n * bs and len(ev.token_ids) % bs == 0:
                # sliding-window / Mamba group with masked or null blocks: vLLM leaves them out of
                # block_hashes but not of token_ids, so which tokens each hash covers is unknown.
                # Not an error; the full-attention group's events of the same blocks confirm them.
                self.metrics.unmodeled.inc(n)
                return ()
            self._decode_error(f"BlockStored has {len(ev.token_ids)} tokens for {n} blocks of {bs}")
            return ()
        if tier is Tier.GPU and ev.parent_block_hash is None and self._reannounced(ev.block_hashes):
            # kv_cache_report_mode="full": vLLM re-announces the reused prefix (parent None, no
            # block state change, no matching BlockRemoved later). Counting it as another copy
            # would keep the block confirmed after its eviction (audit #41).
            return ()
        rbs = self.block_size
        if tier is Tier.CPU and rbs is not None and bs != rbs and bs % rbs == 0:
            return self._stored_chunks(ev, rbs)
        if self.block_size is not None and bs != self.block_size:
            self.metrics.block_size_mismatch.inc()
            self._log_once(
                "block_size", "KV events of %s use block_size %d, router expects %d", bs, self.block_size
            )
        model = ev.lora_name
        if model is None:
            if ev.lora_id is not None:  # legacy LoRA event without a name: cannot seed its chain
                self.metrics.unmodeled.inc(n)
                return ()
            model = self.model
        # How many leading blocks we can reproduce, and the salt of the first one (vLLM puts
        # cache_salt in block 0's extra keys only, and the LoRA name in every block's).
        usable = n
        salt: str | None = None
        keys = ev.extra_keys
        if keys is not None and keys.count(None) != len(keys):
            usable = 0
            for i in range(min(n, len(keys))):
                ok, s = _extra(keys[i], ev.lora_name, i == 0 and ev.parent_block_hash is None)
                if not ok:
                    break
                if i == 0:
                    salt = s
                usable += 1
            else:
                usable = n  # keys shorter than blocks: the rest carry none
            if usable < n:
                self.metrics.unmodeled.inc(n - usable)
                if usable == 0:
                    return ()
        parent = ev.parent_block_hash
        seed: int
        if parent is None:
            seed = model_seed(model, salt)
        else:
            pent = self._map.get(parent)
            if pent is None:
                st = self.stats
                st.orphans += usable
                self.metrics.orphans.inc(usable)
                return ()
            self._map.move_to_end(parent)
            seed = pent[_R]
        tokens = ev.token_ids if usable == n else ev.token_ids[: usable * bs]
        router = hash_token_blocks(tokens, bs, seed, max_blocks=usable)
        col = _GPU if tier is Tier.GPU else _CPU
        mp = self._map
        epoch = self._epoch
        prev: int | None = None  # the chain as stored, where it differs from ``router``
        for i, (eh, rh) in enumerate(zip(engine_hashes, router, strict=False)):
            ent = mp.get(eh)
            if ent is None:
                if prev is not None:  # continue the chain from the known block before it
                    rh = hash_token_blocks(tokens[i * bs : (i + 1) * bs], bs, prev)[0]
                    router[i] = rh
                    prev = rh
                ent = [rh, 0, 0, epoch]
                mp[eh] = ent
            else:
                mp.move_to_end(eh)
                if ent[_R] != rh:
                    # The engine hash is already known (a GPU copy): its key wins. vLLM's CPU
                    # copies of salted prompts come with extra_keys=None, and re-seeding them
                    # unsalted would give another tenant a hit vLLM never gives (audit #45).
                    router[i] = BlockHash(ent[_R])
                    prev = ent[_R]
            ent[col] += 1
        return router

    def _reannounced(self, engine_hashes: Sequence[EngineHash]) -> bool:
        """Every block already held on the GPU tier: a report-mode re-announcement, not a store."""
        mp = self._map
        for eh in engine_hashes:
            ent = mp.get(eh)
            if ent is None or ent[_GPU] == 0:
                return False
        for eh in engine_hashes:
            mp.move_to_end(eh)
        return True

    def _stored_chunks(self, ev: StoredEvent, rbs: int) -> Sequence[BlockHash]:
        """An offload tier's chunks (LMCache stores 256-token chunks, each one engine hash under
        LMCache's own blake3 chain): re-hash the tokens as the router's blocks, so the chunk
        confirms exactly the keys a request for the same prefix looks up. The parent is the
        previous chunk's engine hash; its entry holds the router hash of that chunk's last block."""
        engine_hashes = ev.block_hashes
        per = ev.block_size // rbs
        if ev.lora_id is not None or (
            ev.extra_keys is not None and ev.extra_keys.count(None) != len(ev.extra_keys)
        ):
            self.metrics.unmodeled.inc(len(engine_hashes) * per)  # LMCache MP keys carry neither
            return ()
        parent = ev.parent_block_hash
        seed: int
        if parent is None:
            seed = model_seed(ev.lora_name or self.model)
        else:
            pent = self._map.get(parent)
            if pent is None:
                self.stats.orphans += len(engine_hashes)
                self.metrics.orphans.inc(len(engine_hashes))
                return ()
            self._map.move_to_end(parent)
            seed = pent[_R]
        router = hash_token_blocks(ev.token_ids, rbs, seed, max_blocks=len(engine_hashes) * per)
        mp = self._map
        spans = self._spans
        epoch = self._epoch
        for i, eh in enumerate(engine_hashes):
            span = router[i * per : (i + 1) * per]
            ent = mp.get(eh)
            if ent is None:
                mp[eh] = [span[-1], 0, 1, epoch]
                spans[eh] = span
            else:
                mp.move_to_end(eh)
                ent[_CPU] += 1
        return router

    def _bound(self) -> None:
        if len(self._map) > self.capacity:
            self._evict(len(self._map) - self.capacity)

    def _evict(self, count: int) -> None:
        mp = self._map
        for _ in range(count):
            eh, ent = mp.popitem(last=False)
            span = self._spans.pop(eh, None) or [BlockHash(ent[_R])]
            if ent[_GPU]:
                self.index.remove(self.replica, span * ent[_GPU], Tier.GPU)
            if ent[_CPU]:
                self.index.remove(self.replica, span * ent[_CPU], Tier.CPU)
            self._forget_entry(ent)

    def _removed(self, engine_hashes: Sequence[EngineHash], tier: Tier, out: list[BlockHash]) -> int:
        """Drop one copy per hash from the map, append the router hashes to retract to ``out``;
        returns how many hashes we never saw stored (before we subscribed, or LRU-evicted)."""
        col = _GPU if tier is Tier.GPU else _CPU
        mp = self._map
        spans = self._spans
        unknown = 0
        for eh in engine_hashes:
            ent = mp.get(eh)
            if ent is None or ent[col] == 0:
                unknown += 1
                continue
            ent[col] -= 1
            span = spans.get(eh) if spans else None
            if span is None:
                out.append(BlockHash(ent[_R]))
            else:
                out.extend(span)
            if ent[_GPU] == 0 and ent[_CPU] == 0:
                del mp[eh]
                if span is not None:
                    del spans[eh]
                self._forget_entry(ent)
        return unknown


class _LiveKeys:
    """``BlockKeys`` for the live stream: one ``ReplicaEvents``' map, as bound methods (one call
    per event on the hot path, not two)."""

    __slots__ = ("bound", "cleared", "removed", "stored")

    def __init__(self, ev: ReplicaEvents) -> None:
        self.stored: Callable[[StoredEvent, Tier], Sequence[BlockHash]] = ev._stored_keys
        self.removed: Callable[[Sequence[EngineHash], Tier, list[BlockHash]], int] = ev._removed
        self.cleared: Callable[[], None] = ev._cleared
        self.bound: Callable[[], None] = ev._bound


def _extra(keys: Any, lora_name: str | None, first: bool) -> tuple[bool, str | None]:
    """Read one block's vLLM extra keys: ``lora_name? + mm keys + cache_salt? + embeds``.

    Returns (reproducible, cache_salt). The router's chain models the LoRA name (as the model)
    and cache_salt (in the seed) only; multimodal ``(identifier, offset)`` keys and prompt-embed
    digests make tokens ambiguous, so such blocks are never confirmed (never guess).
    """
    if keys is None:
        return True, None
    if not isinstance(keys, list | tuple):
        return False, None
    items = list(keys)
    if lora_name is not None and items and items[0] == lora_name:
        items = items[1:]
    if not items:
        return True, None
    if first and len(items) == 1 and isinstance(items[0], str):
        return True, items[0]
    return False, None
