"""Decode vLLM KV-event batches into views that keep only the fields the router uses.

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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import msgspec

from router.kv.wire import EngineHash

_TokenId = Annotated[int, msgspec.Meta(ge=0, lt=1 << 32)]  # hashed as u32: reject what cannot be
# 0 is vLLM's native CPU-offload placeholder (OffloadingConnector without self-describing events:
# token_ids=[], block_size=0), sent in the same batch as the GPU pool's events: it must decode,
# and the applier skips it, or the whole batch (GPU removals included) is lost (audit #44).
_BlockSize = Annotated[int, msgspec.Meta(ge=0)]

# --------------------------------------------------------------------------------------------
# Views of the wire structs (router/kv/wire.py pins the full ones). Only fields we use, plus the
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
DECODE_FAILURES = (msgspec.MsgspecError, ValueError, RecursionError)


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
    except DECODE_FAILURES as exc:
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
        except DECODE_FAILURES:
            continue
        return DecodedBatch(b.ts, list(b.events), 0, arrays)
    try:
        rb = _RAW[outer].decode(payload)
    except DECODE_FAILURES as exc:
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
