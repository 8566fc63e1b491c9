"""vLLM KV-cache event wire structs (vllm/distributed/kv_events.py), pinned to what vLLM ships.

Two shapes exist in the wild (see docs/kv-events.md):

* **current** (vLLM PR #42892, 2026-06; observed on vLLM 0.32): the batch is a msgpack *array*
  ``[ts, [events...], dp_rank]`` and each event is a msgpack *map* tagged ``"type": ClassName``,
  with fields that equal their default left out (``omit_defaults``);
* **legacy** (<= 0.23 and most 2025 releases): events are positional arrays
  ``["BlockStored", f1, f2, ...]`` inside the same array batch.

A main-branch snapshot also defines the batch without ``array_like`` (a map), so the decoder in
router/kv/decode.py accepts a batch as array or map and each event as array or map.

These Structs *encode* the exact bytes vLLM sends (tests/router/test_kv_wire.py re-encodes the
golden capture byte for byte); the simulated engine publishes with them. Decoding tolerant of
both shapes and of unknown extra fields lives in decode.py.

A block hash is an unsigned 64-bit int (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``, the default)
or the raw digest bytes (``=0``).
"""

from __future__ import annotations

from typing import Any

import msgspec

EngineHash = int | bytes


class BlockStored(msgspec.Struct, tag=True, omit_defaults=True, gc=False):
    block_hashes: list[EngineHash]
    parent_block_hash: EngineHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None


class BlockRemoved(msgspec.Struct, tag=True, omit_defaults=True, gc=False):
    block_hashes: list[EngineHash]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(msgspec.Struct, tag=True, omit_defaults=True, gc=False):
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[KVEvent]
    data_parallel_rank: int | None = None


# Legacy shape: the same fields, positional, tag first.
class LegacyBlockStored(msgspec.Struct, tag="BlockStored", array_like=True, omit_defaults=True, gc=False):
    block_hashes: list[EngineHash]
    parent_block_hash: EngineHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None = None


class LegacyBlockRemoved(msgspec.Struct, tag="BlockRemoved", array_like=True, omit_defaults=True, gc=False):
    block_hashes: list[EngineHash]
    medium: str | None = None


class LegacyAllBlocksCleared(
    msgspec.Struct, tag="AllBlocksCleared", array_like=True, omit_defaults=True, gc=False
):
    pass


LegacyKVEvent = LegacyBlockStored | LegacyBlockRemoved | LegacyAllBlocksCleared


class LegacyKVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[LegacyKVEvent]
    data_parallel_rank: int | None = None


_encoder = msgspec.msgpack.Encoder()


def encode_batch(ts: float, events: list[KVEvent], dp_rank: int | None = 0, *, legacy: bool = False) -> bytes:
    """Payload bytes of one ZMQ message, in vLLM 0.32's shape or the legacy array shape."""
    if not legacy:
        return _encoder.encode(KVEventBatch(ts, events, dp_rank))
    legacy_events: list[LegacyKVEvent] = []
    for ev in events:
        if isinstance(ev, BlockStored):
            legacy_events.append(
                LegacyBlockStored(
                    ev.block_hashes, ev.parent_block_hash, ev.token_ids, ev.block_size, ev.lora_id, ev.medium
                )
            )
        elif isinstance(ev, BlockRemoved):
            legacy_events.append(LegacyBlockRemoved(ev.block_hashes, ev.medium))
        else:
            legacy_events.append(LegacyAllBlocksCleared())
    return _encoder.encode(LegacyKVEventBatch(ts, legacy_events, dp_rank))


def seq_bytes(seq: int) -> bytes:
    """The second ZMQ frame: sequence number as 8-byte big-endian (signed: -1 ends a replay)."""
    return seq.to_bytes(8, "big", signed=True)


def publisher_binds(endpoint: str) -> bool:
    """Whether a vLLM KV-event PUB socket configured with ``endpoint`` binds (True) or connects.

    vLLM's rule (``ZmqEventPublisher._socket_setup`` in vllm/distributed/kv_events.py): bind when
    the endpoint contains ``*`` or ``::`` or is ``ipc://``/``inproc://``, connect otherwise. So
    ``tcp://0.0.0.0:5557`` *connects* (to 0.0.0.0, i.e. this host), and so does any concrete
    host: the subscriber must bind. The one copy of the rule: the simulated engine
    (engines/sim/replica/publisher.py) and the router's discovery (router/kv/sources.py) both use it.
    """
    return (
        "*" in endpoint
        or "::" in endpoint
        or endpoint.startswith("ipc://")
        or endpoint.startswith("inproc://")
    )
