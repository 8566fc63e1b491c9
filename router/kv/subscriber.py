"""vLLM KV-cache events -> the prefix index: decode, re-hash, sequence-check, subscribe.

Wire (docs/kv-events.md has byte examples): ZMQ multipart ``[topic, seq (8-byte BE), msgpack]``.
The payload is a batch ``[ts, [events...], dp_rank]`` (an array; a main-branch vLLM snapshot makes
it a map ``{"ts", "events", "data_parallel_rank"}``), each event a map tagged ``"type"`` (vLLM
0.32) or a positional array ``["BlockStored", f1, ...]`` (legacy, fewer fields). Hashes are u64
ints (which can exceed i64) or digest bytes. Unknown fields are ignored and unknown event types
are skipped and counted: vLLM adds fields and events in minor releases, and a router must keep
routing through an engine upgrade.

Decoding is typed: the first payload byte says array or map batch, then one msgspec decoder for
the whole batch with the event shape that last worked for this replica (map or array). Only when
that fails (mixed shapes, unknown event type, garbage) do we fall back to per-event ``Raw``
dispatch on each event's first byte. So the common case is one C-level decode per batch.

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

Threading: everything that touches the index runs synchronously on the event loop inside
``ReplicaEvents`` (no awaits, no locks); the subscriber task only awaits socket I/O and hands
whole messages (or a whole replay) to it.

Cost: one msgspec decode per batch, one xxh3 per stored block, O(1) dict work per block; see
tests/bench/bench_kv_events.py for the measured rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, NamedTuple, Protocol
from urllib.parse import urlsplit

import msgspec
import zmq
import zmq.asyncio
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

from router.hashing import hash_token_blocks, model_seed
from router.kv.wire import EngineHash, publisher_binds
from router.types import BlockHash, ReplicaId, Tier

log = logging.getLogger(__name__)


DEFAULT_CAPACITY = 1 << 18  # engine->router entries per replica; pass the index's per-replica capacity
DEFAULT_RESTART_WINDOW = 10_000  # vLLM's default replay buffer_steps: no duplicate can be older
DEFAULT_REPLAY_TIMEOUT_S = 2.0
DEFAULT_REPLAY_MAX_BATCHES = 100_000  # vLLM keeps 10k by default; 10x headroom bounds the loop
DEFAULT_RCVHWM = 100_000  # vLLM's publisher hwm
END_SEQ = -1  # replay end marker, signed 8-byte BE

_TokenId = Annotated[int, msgspec.Meta(ge=0, lt=1 << 32)]  # hashed as u32: reject what cannot be
_BlockSize = Annotated[int, msgspec.Meta(ge=1)]


# --------------------------------------------------------------------------------------------
# Views of the wire structs (router/kv_wire.py pins the full ones). Only fields we use, plus the
# positional placeholders the array shape needs; defaults let legacy short arrays decode.


class BlockStoredView(msgspec.Struct, tag="BlockStored", gc=False):
    block_hashes: list[EngineHash]
    parent_block_hash: EngineHash | None = None
    token_ids: list[_TokenId] = []
    block_size: _BlockSize = 1
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None


class BlockRemovedView(msgspec.Struct, tag="BlockRemoved", gc=False):
    block_hashes: list[EngineHash]
    medium: str | None = None


class AllBlocksClearedView(msgspec.Struct, tag="AllBlocksCleared", gc=False):
    pass


# Legacy positional shape: same fields in the same order, so the applier treats both alike.
class _BlockStoredArray(BlockStoredView, array_like=True, tag="BlockStored"):
    pass


class _BlockRemovedArray(BlockRemovedView, array_like=True, tag="BlockRemoved"):
    pass


class _AllBlocksClearedArray(AllBlocksClearedView, array_like=True, tag="AllBlocksCleared"):
    pass


EventView = BlockStoredView | BlockRemovedView | AllBlocksClearedView
_MapEvent = BlockStoredView | BlockRemovedView | AllBlocksClearedView
_ArrayEvent = _BlockStoredArray | _BlockRemovedArray | _AllBlocksClearedArray
_KNOWN_TYPES = frozenset({"BlockStored", "BlockRemoved", "AllBlocksCleared"})


class _ArrBatchMapEv(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[_MapEvent]
    data_parallel_rank: int | None = None


class _ArrBatchArrEv(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[_ArrayEvent]
    data_parallel_rank: int | None = None


class _ArrBatchRaw(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[msgspec.Raw]
    data_parallel_rank: int | None = None


class _MapBatchMapEv(msgspec.Struct, gc=False):
    ts: float
    events: list[_MapEvent]
    data_parallel_rank: int | None = None


class _MapBatchArrEv(msgspec.Struct, gc=False):
    ts: float
    events: list[_ArrayEvent]
    data_parallel_rank: int | None = None


class _MapBatchRaw(msgspec.Struct, gc=False):
    ts: float
    events: list[msgspec.Raw]
    data_parallel_rank: int | None = None


class _TypeTag(msgspec.Struct, gc=False):
    type: str


# typed[outer is array][events are arrays]
_TYPED: dict[tuple[bool, bool], msgspec.msgpack.Decoder[Any]] = {
    (True, False): msgspec.msgpack.Decoder(_ArrBatchMapEv),
    (True, True): msgspec.msgpack.Decoder(_ArrBatchArrEv),
    (False, False): msgspec.msgpack.Decoder(_MapBatchMapEv),
    (False, True): msgspec.msgpack.Decoder(_MapBatchArrEv),
}
_RAW: dict[bool, msgspec.msgpack.Decoder[Any]] = {
    True: msgspec.msgpack.Decoder(_ArrBatchRaw),
    False: msgspec.msgpack.Decoder(_MapBatchRaw),
}
_MAP_EVENT: msgspec.msgpack.Decoder[EventView] = msgspec.msgpack.Decoder(_MapEvent)
_ARRAY_EVENT: msgspec.msgpack.Decoder[EventView] = msgspec.msgpack.Decoder(_ArrayEvent)
_TAG_OF_MAP = msgspec.msgpack.Decoder(_TypeTag)
_ITEMS = msgspec.msgpack.Decoder(list[msgspec.Raw])
_STR = msgspec.msgpack.Decoder(str)


# msgspec raises its own errors, but invalid UTF-8 in a tag surfaces as UnicodeDecodeError and
# absurd nesting as RecursionError (both found by the fuzz test): all mean "not a batch".
_FAILED = (msgspec.MsgspecError, ValueError, RecursionError)


class DecodeError(ValueError):
    """A payload that is not a KV-event batch in any shape vLLM has shipped."""


@dataclass(slots=True)
class DecodedBatch:
    ts: float
    events: list[EventView]
    unknown: int  # events of a type we do not know, skipped
    arrays: bool  # the events came as positional arrays (legacy)


def _kind(first: int) -> bool | None:
    """True for a msgpack array, False for a map, None for anything else."""
    if 0x90 <= first <= 0x9F or first in (0xDC, 0xDD):
        return True
    if 0x80 <= first <= 0x8F or first in (0xDE, 0xDF):
        return False
    return None


def _decode_event(raw: msgspec.Raw) -> EventView | None:
    """One event of either shape; None for an unknown type. Raises DecodeError if malformed."""
    data = memoryview(raw)
    kind = _kind(data[0]) if len(data) else None
    try:
        if kind is False:
            try:
                return _MAP_EVENT.decode(data)
            except msgspec.ValidationError:
                if _TAG_OF_MAP.decode(data).type in _KNOWN_TYPES:
                    raise
                return None
        if kind is True:
            try:
                return _ARRAY_EVENT.decode(data)
            except msgspec.ValidationError:
                items = _ITEMS.decode(data)
                if not items or _STR.decode(items[0]) in _KNOWN_TYPES:
                    raise
                return None
    except _FAILED as exc:
        raise DecodeError(f"bad event: {exc}") from exc
    raise DecodeError("event is neither a map nor an array")


def decode_batch(payload: bytes, arrays_first: bool = False) -> DecodedBatch:
    """Decode one batch payload of any shipped shape. Raises DecodeError, never anything else.

    ``arrays_first`` picks which typed event shape to try first (the one that worked last time
    for this stream), so a legacy engine costs one decode per batch, like a current one.
    """
    if not payload:
        raise DecodeError("empty payload")
    outer = _kind(payload[0])
    if outer is None:
        raise DecodeError(f"batch is neither array nor map (first byte {payload[0]:#04x})")
    for arrays in (arrays_first, not arrays_first):
        try:
            b = _TYPED[(outer, arrays)].decode(payload)
        except _FAILED:
            continue
        return DecodedBatch(b.ts, list(b.events), 0, arrays)
    try:
        rb = _RAW[outer].decode(payload)
    except _FAILED as exc:
        raise DecodeError(f"bad batch: {exc}") from exc
    events: list[EventView] = []
    unknown = 0
    for raw in rb.events:
        ev = _decode_event(raw)
        if ev is None:
            unknown += 1
        else:
            events.append(ev)
    return DecodedBatch(rb.ts, events, unknown, arrays_first)


# --------------------------------------------------------------------------------------------
# Metrics


class KVEventMetrics:
    """``kvrouter_kv_events_*``: the KV-event ingestion metrics (listed in docs/metrics.md)."""

    def __init__(self, registry: CollectorRegistry | None = REGISTRY) -> None:
        p = "kvrouter_kv_events_"
        self.batches = Counter(p + "batches", "KV-event batches applied", registry=registry)
        self.events = Counter(p + "events", "KV events seen, by type", ["type"], registry=registry)
        self.blocks_stored = Counter(
            p + "blocks_stored", "Blocks confirmed by BlockStored", registry=registry
        )
        self.blocks_removed = Counter(
            p + "blocks_removed", "Blocks retracted by BlockRemoved", registry=registry
        )
        self.decode_errors = Counter(
            p + "decode_errors", "Payloads or events that did not decode", ["replica"], registry=registry
        )
        self.gaps = Counter(p + "gaps", "Sequence gaps detected", ["replica"], registry=registry)
        self.restarts = Counter(p + "restarts", "Publisher restarts detected", ["replica"], registry=registry)
        self.stale = Counter(p + "stale", "Duplicate/out-of-order batches dropped", registry=registry)
        self.orphans = Counter(
            p + "orphans", "Stored blocks skipped: parent block unknown", registry=registry
        )
        self.unmodeled = Counter(
            p + "unmodeled_blocks",
            "Stored blocks skipped: multimodal/embedding keys or LoRA id without name",
            registry=registry,
        )
        self.unknown_removals = Counter(
            p + "unknown_removals", "Removed blocks never seen stored", registry=registry
        )
        self.block_size_mismatch = Counter(
            p + "block_size_mismatch", "Events whose block_size differs from the router's", registry=registry
        )
        self.replays = Counter(p + "replays", "Replay requests, by result", ["result"], registry=registry)
        self.uncertain = Gauge(
            p + "uncertain",
            "1 while a replica's confirmed blocks may be stale",
            ["replica"],
            registry=registry,
        )
        # Labelled children resolved once: .labels() costs a lock and a dict lookup per call.
        self.ev_stored = self.events.labels("BlockStored")
        self.ev_removed = self.events.labels("BlockRemoved")
        self.ev_cleared = self.events.labels("AllBlocksCleared")
        self.ev_unknown = self.events.labels("unknown")

    def forget(self, replica: ReplicaId) -> None:
        """Drop a removed replica's labelled series so dashboards do not show a ghost."""
        for m in (self.decode_errors, self.gaps, self.restarts, self.uncertain):
            with contextlib.suppress(KeyError):
                m.remove(replica)


_default_metrics: KVEventMetrics | None = None


def default_metrics() -> KVEventMetrics:
    """The process-wide metrics on prometheus_client's REGISTRY (created once: names are unique)."""
    global _default_metrics
    if _default_metrics is None:
        _default_metrics = KVEventMetrics(REGISTRY)
    return _default_metrics


# --------------------------------------------------------------------------------------------
# Applier


class IndexSink(Protocol):
    """What the applier needs from router/index.py's PrefixIndex (which satisfies it)."""

    def store(
        self, replica: ReplicaId, hashes: Sequence[BlockHash], tier: Tier = ..., *, speculative: bool = ...
    ) -> None: ...

    def remove(self, replica: ReplicaId, hashes: Sequence[BlockHash], tier: Tier = ...) -> None: ...

    def clear(self, replica: ReplicaId, tier: Tier | None = ...) -> None: ...


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
    uncertain: bool = False
    last_event_time: float | None = None  # clock() when the last batch was applied
    endpoint: str | None = None  # actual endpoint (after bind, the resolved port)
    connected: bool = False
    errors: list[str] = field(default_factory=list)  # last few socket errors, newest last


# entry layout: [router hash, copies on GPU, copies on CPU, epoch]
_R, _GPU, _CPU, _EPOCH = 0, 1, 2, 3


def _tier(medium: str | None) -> Tier:
    if medium == "GPU" or medium is None:
        return Tier.GPU
    # vLLM reports "GPU" even on its CPU backend; anything else (LMCache "CPU", "DISK", ...) is
    # an offload tier that costs a load, which is what Tier.CPU means to scoring.
    return Tier.GPU if medium is None or medium.upper() == "GPU" else Tier.CPU


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
        self._map.clear()
        self._suspects = 0
        self._set_uncertain(False)

    # -- apply ------------------------------------------------------------------------------

    def _apply(self, batch: DecodedBatch) -> None:
        # vLLM sends one BlockRemoved event per evicted block, so per-event costs dominate a
        # busy stream: counters are summed per batch, and a run of removals on one tier becomes
        # one index call (no store or clear runs in between, so the order the index sees holds).
        st = self.stats
        m = self.metrics
        n_stored = n_removed = n_cleared = 0
        pending: list[BlockHash] = []
        pending_tier = Tier.GPU
        unknown_removals = 0
        for ev in batch.events:
            if isinstance(ev, BlockRemovedView):
                n_removed += 1
                tier = _tier(ev.medium)
                if pending and tier is not pending_tier:
                    self._flush_removals(pending, pending_tier)
                    pending = []
                pending_tier = tier
                unknown_removals += self._removed(ev.block_hashes, tier, pending)
                continue
            if pending:
                self._flush_removals(pending, pending_tier)
                pending = []
            if isinstance(ev, BlockStoredView):
                n_stored += 1
                self._stored(ev)
            else:
                n_cleared += 1
                self._clear()
        if pending:
            self._flush_removals(pending, pending_tier)
        st.batches += 1
        st.events += len(batch.events) + batch.unknown
        st.last_event_time = self.clock()
        m.batches.inc()
        if n_stored:
            m.ev_stored.inc(n_stored)
        if n_removed:
            m.ev_removed.inc(n_removed)
        if n_cleared:
            m.ev_cleared.inc(n_cleared)
        if batch.unknown:
            m.ev_unknown.inc(batch.unknown)
        if unknown_removals:
            m.unknown_removals.inc(unknown_removals)

    def _flush_removals(self, hashes: list[BlockHash], tier: Tier) -> None:
        self.index.remove(self.replica, hashes, tier)
        self.stats.blocks_removed += len(hashes)
        self.metrics.blocks_removed.inc(len(hashes))

    def _stored(self, ev: BlockStoredView) -> None:
        engine_hashes = ev.block_hashes
        n = len(engine_hashes)
        bs = ev.block_size
        if n == 0:
            return
        if len(ev.token_ids) != n * bs:
            self._decode_error(f"BlockStored has {len(ev.token_ids)} tokens for {n} blocks of {bs}")
            return
        if self.block_size is not None and bs != self.block_size:
            self.metrics.block_size_mismatch.inc()
            self._log_once(
                "block_size", "KV events of %s use block_size %d, router expects %d", bs, self.block_size
            )
        model = ev.lora_name
        if model is None:
            if ev.lora_id is not None:  # legacy LoRA event without a name: cannot seed its chain
                self.metrics.unmodeled.inc(n)
                return
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
                    return
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
                return
            self._map.move_to_end(parent)
            seed = pent[_R]
        tokens = ev.token_ids if usable == n else ev.token_ids[: usable * bs]
        router = hash_token_blocks(tokens, bs, seed, max_blocks=usable)
        tier = _tier(ev.medium)
        col = _GPU if tier is Tier.GPU else _CPU
        mp = self._map
        epoch = self._epoch
        for eh, rh in zip(engine_hashes, router, strict=False):
            ent = mp.get(eh)
            if ent is None:
                ent = [rh, 0, 0, epoch]
                mp[eh] = ent
            else:
                mp.move_to_end(eh)
            ent[col] += 1
        self.index.store(self.replica, router, tier)
        self.stats.blocks_stored += usable
        self.metrics.blocks_stored.inc(usable)
        if len(mp) > self.capacity:
            self._evict(len(mp) - self.capacity)

    def _evict(self, count: int) -> None:
        mp = self._map
        for _ in range(count):
            _, ent = mp.popitem(last=False)
            rh = BlockHash(ent[_R])
            if ent[_GPU]:
                self.index.remove(self.replica, [rh] * ent[_GPU], Tier.GPU)
            if ent[_CPU]:
                self.index.remove(self.replica, [rh] * ent[_CPU], Tier.CPU)
            self._forget_entry(ent)

    def _removed(self, engine_hashes: list[EngineHash], tier: Tier, out: list[BlockHash]) -> int:
        """Drop one copy per hash from the map, append the router hashes to retract to ``out``;
        returns how many hashes we never saw stored (before we subscribed, or LRU-evicted)."""
        col = _GPU if tier is Tier.GPU else _CPU
        mp = self._map
        unknown = 0
        for eh in engine_hashes:
            ent = mp.get(eh)
            if ent is None or ent[col] == 0:
                unknown += 1
                continue
            ent[col] -= 1
            out.append(BlockHash(ent[_R]))
            if ent[_GPU] == 0 and ent[_CPU] == 0:
                del mp[eh]
                self._forget_entry(ent)
        return unknown


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


# --------------------------------------------------------------------------------------------
# Discovery helper


class EventSource(NamedTuple):
    endpoint: str  # what the router's SUB socket connects to (or binds, when ``bind``)
    replay_endpoint: str | None
    topic: str
    bind: bool  # engine connects (concrete host in its config): the router must bind


def _is_wildcard(host: str) -> bool:
    return host in ("*", "0.0.0.0", "::", "[::]", "")


def _swap_host(endpoint: str, host: str) -> str:
    """``tcp://*:5557`` -> ``tcp://<host>:5557``; other transports and concrete hosts unchanged."""
    if not endpoint.startswith("tcp://"):
        return endpoint
    rest = endpoint[len("tcp://") :]
    addr, sep, port = rest.rpartition(":")
    if not sep or not _is_wildcard(addr):
        return endpoint
    return f"tcp://{host}:{port}"


def _rank(value: object, default: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return default


def resolve_event_source(replica_url: str, kv_event_sources_json: str | bytes | object) -> list[EventSource]:
    """Endpoints to subscribe to, from a replica's ``GET /kv_event_sources`` body.

    Accepts vLLM 0.32's ``{"0": {"endpoint", "replay_endpoint", "topic", ...}}`` (one entry per
    DP rank, already port-offset), the bare list ``[{"data_parallel_rank": 0, "endpoint": ...}]``
    of newer vLLM, or one such object, as JSON text or already parsed. vLLM binds its PUB when
    the endpoint contains ``*`` or ``::`` or is ipc/inproc (``kv_wire.publisher_binds``): we
    connect, to the replica's host in place of a wildcard. Otherwise (a concrete host, and also
    ``0.0.0.0``) vLLM connects to that address: we bind it. The replay ROUTER always binds on the
    engine, so we connect to it (wildcards, ``0.0.0.0`` included, become the replica's host).
    Ordered by DP rank; inproc skipped.
    """
    data: object = kv_event_sources_json
    if isinstance(data, str | bytes):
        try:
            data = msgspec.json.decode(data)
        except _FAILED as exc:
            raise ValueError(f"kv_event_sources is not JSON: {exc}") from exc
    entries: list[tuple[int, dict[str, Any]]] = []
    if isinstance(data, dict) and "endpoint" in data:
        entries.append((_rank(data.get("data_parallel_rank"), 0), data))
    elif isinstance(data, dict):
        for k, v in data.items():
            if isinstance(v, dict):
                entries.append((_rank(k, _rank(v.get("data_parallel_rank"), 0)), v))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            if isinstance(v, dict):
                entries.append((_rank(v.get("data_parallel_rank"), i), v))
    else:
        raise ValueError(f"kv_event_sources: expected an object or a list, got {type(data).__name__}")
    host = urlsplit(replica_url).hostname
    if not host:
        raise ValueError(f"replica_url has no host (current value: {replica_url!r})")
    if ":" in host:
        host = f"[{host}]"
    out: list[EventSource] = []
    for _, e in sorted(entries, key=lambda x: x[0]):
        ep = e.get("endpoint")
        if not isinstance(ep, str) or not ep or ep.startswith("inproc://"):
            continue
        replay = e.get("replay_endpoint")
        replay_ep = _swap_host(replay, host) if isinstance(replay, str) and replay else None
        topic = e.get("topic")
        topic = topic if isinstance(topic, str) else ""
        if publisher_binds(ep):  # the engine binds: connect to it on the replica's host
            out.append(EventSource(_swap_host(ep, host), replay_ep, topic, False))
        else:  # the engine connects to this address: bind it as given
            out.append(EventSource(ep, replay_ep, topic, True))
    return out


# --------------------------------------------------------------------------------------------
# Replay and subscriber


async def fetch_replay(
    ctx: zmq.asyncio.Context,
    endpoint: str,
    start: int,
    *,
    timeout: float = DEFAULT_REPLAY_TIMEOUT_S,
    max_batches: int = DEFAULT_REPLAY_MAX_BATCHES,
) -> tuple[list[tuple[int, bytes]], bool]:
    """Ask a vLLM replay ROUTER for every buffered batch with seq >= start.

    We send ``[b"", start8]`` from a DEALER (vLLM ignores requests that do not arrive as
    ``[identity, b"", start8]``). Replies are ``[b"", topic, seq8, payload]`` (vLLM 0.32) or
    ``[b"", seq8, payload]`` (older vLLM, SGLang, LMCache), ended by seq -1. Returns the batches
    and whether the end marker arrived; a fresh socket per replay keeps a late answer to an
    abandoned request from being read as the next one's.
    """
    out: list[tuple[int, bytes]] = []
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        sock.connect(endpoint)
        await sock.send_multipart([b"", start.to_bytes(8, "big", signed=True)])
        while len(out) < max_batches:
            left = deadline - loop.time()
            if left <= 0:
                return out, False
            try:
                frames = await asyncio.wait_for(sock.recv_multipart(), left)
            except TimeoutError:
                return out, False
            if frames and frames[0] == b"":
                frames = frames[1:]
            if len(frames) == 3:
                seq_b, payload = frames[1], frames[2]
            elif len(frames) == 2:
                seq_b, payload = frames[0], frames[1]
            else:
                continue
            if len(seq_b) != 8:
                continue
            seq = int.from_bytes(seq_b, "big", signed=True)
            if seq == END_SEQ:
                return out, True
            if seq >= 0:
                out.append((seq, payload))
        return out, False
    finally:
        sock.close(linger=0)


@dataclass(slots=True)
class _Sub:
    events: ReplicaEvents
    endpoint: str
    replay_endpoint: str | None
    topic: str
    bind: bool
    task: asyncio.Task[None] | None = None


class KVEventManager:
    """Subscribes to every replica's KV events and keeps the index in step with them.

    One task per replica: a SUB socket (connect, or bind for engines that connect), reconnect
    with exponential backoff on socket errors, replay on gaps. ``close()`` cancels and awaits
    every task and closes the ZMQ context.
    """

    def __init__(
        self,
        index: IndexSink,
        *,
        capacity: int = DEFAULT_CAPACITY,
        restart_window: int = DEFAULT_RESTART_WINDOW,
        replay_timeout: float = DEFAULT_REPLAY_TIMEOUT_S,
        backoff: tuple[float, float] = (0.1, 5.0),
        rcvhwm: int = DEFAULT_RCVHWM,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.index = index
        self.capacity = capacity
        self.restart_window = restart_window
        self.replay_timeout = replay_timeout
        self.backoff = backoff
        self.rcvhwm = rcvhwm
        self.metrics = default_metrics() if registry is None else KVEventMetrics(registry)
        self.clock = clock
        self._ctx = zmq.asyncio.Context()
        self._subs: dict[ReplicaId, _Sub] = {}
        self._closed = False

    def add(
        self,
        replica_id: ReplicaId,
        endpoint: str,
        replay_endpoint: str | None = None,
        topic: str = "",
        bind: bool = False,
        model: str = "",
        block_size: int | None = None,
    ) -> None:
        """Start following one replica. Idempotent; changed settings restart the subscription
        (with fresh state: a new endpoint is a new stream). Needs a running event loop."""
        if self._closed:
            raise RuntimeError("KVEventManager is closed")
        old = self._subs.get(replica_id)
        if old is not None:
            ev = old.events
            same = (old.endpoint, old.replay_endpoint, old.topic, old.bind, ev.model, ev.block_size)
            if same == (endpoint, replay_endpoint, topic, bind, model, block_size):
                return
            self.remove(replica_id)
        events = ReplicaEvents(
            replica_id,
            self.index,
            model=model,
            block_size=block_size,
            capacity=self.capacity,
            replay=replay_endpoint is not None,
            restart_window=self.restart_window,
            metrics=self.metrics,
            clock=self.clock,
        )
        sub = _Sub(events, endpoint, replay_endpoint, topic, bind)
        sub.task = asyncio.get_running_loop().create_task(self._run(sub), name=f"kv-events:{replica_id}")
        self._subs[replica_id] = sub

    def remove(self, replica_id: ReplicaId) -> None:
        """Stop following a replica. Its confirmed entries stay in the index: the replica
        registry decides whether the replica is gone (``index.remove_replica``)."""
        sub = self._subs.pop(replica_id, None)
        if sub is None:
            return
        if sub.task is not None:
            sub.task.cancel()
        self.metrics.forget(replica_id)
        # A later add() starts a fresh stream whose flag starts False and only pushes changes:
        # clear the index's flag now, or the replica's prefix credit stays halved for good.
        set_uncertain = getattr(self.index, "set_uncertain", None)
        if set_uncertain is not None:
            set_uncertain(replica_id, False)

    async def close(self) -> None:
        self._closed = True
        tasks = [s.task for s in self._subs.values() if s.task is not None]
        for rid in list(self._subs):
            self.remove(rid)
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._ctx.destroy(linger=0)

    def stats(self, replica_id: ReplicaId) -> KVEventStats | None:
        sub = self._subs.get(replica_id)
        return None if sub is None else sub.events.stats

    def is_uncertain(self, replica_id: ReplicaId) -> bool:
        sub = self._subs.get(replica_id)
        return sub is not None and sub.events.uncertain

    def replicas(self) -> list[ReplicaId]:
        return list(self._subs)

    def events_of(self, replica_id: ReplicaId) -> ReplicaEvents | None:
        sub = self._subs.get(replica_id)
        return None if sub is None else sub.events

    async def _run(self, sub: _Sub) -> None:
        delay = self.backoff[0]
        st = sub.events.stats
        while True:
            sock = self._ctx.socket(zmq.SUB)
            try:
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.RCVHWM, self.rcvhwm)
                sock.setsockopt(zmq.SUBSCRIBE, sub.topic.encode())
                if sub.bind:
                    sock.bind(sub.endpoint)
                    st.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
                else:
                    sock.connect(sub.endpoint)
                    st.endpoint = sub.endpoint
                st.connected = True
                if sub.replay_endpoint is not None and st.last_seq is None:
                    # Live batches queue on the SUB socket meanwhile; any overlap is dropped
                    # as stale, any hole is a gap that the replay path fills.
                    got, complete = await fetch_replay(
                        self._ctx, sub.replay_endpoint, 0, timeout=self.replay_timeout
                    )
                    if self._subs.get(sub.events.replica) is sub:
                        sub.events.bootstrap(got, complete)
                while True:
                    frames = await sock.recv_multipart()
                    delay = self.backoff[0]
                    await self._handle(sub, frames)
            except asyncio.CancelledError:
                raise
            except (zmq.ZMQError, OSError) as exc:
                st.errors = [*st.errors[-4:], f"{type(exc).__name__}: {exc}"]
                log.warning(
                    "KV events of %s (%s): %s; retrying in %.1fs",
                    sub.events.replica,
                    sub.endpoint,
                    exc,
                    delay,
                )
            finally:
                st.connected = False
                sock.close(linger=0)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff[1])

    async def _handle(self, sub: _Sub, frames: list[bytes]) -> None:
        ev = sub.events
        try:
            req = ev.handle_frames(frames)
        except Exception:  # a bug here must not kill the stream; keep applying later batches
            log.exception("KV events of %s: applying a batch failed", ev.replica)
            ev.mark_uncertain()
            return
        if req is None or sub.replay_endpoint is None:
            return
        got, complete = await fetch_replay(
            self._ctx, sub.replay_endpoint, req.start, timeout=self.replay_timeout
        )
        if self._subs.get(ev.replica) is not sub:
            return  # removed while we waited: its state no longer feeds the index
        try:
            ev.finish_replay(req, got, complete)
        except Exception:
            log.exception("KV events of %s: applying a replay failed", ev.replica)
            ev.mark_uncertain()
