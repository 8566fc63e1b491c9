"""router/kv/wire.py pins vLLM 0.32's KV-event bytes: re-encoding the golden capture must be byte-exact."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import msgspec

from router.kv.wire import BlockStored, KVEventBatch, LegacyKVEventBatch, encode_batch, seq_bytes

GOLDEN = Path(__file__).parent / "golden" / "vllm-0.32-kv-events.json"


def frames() -> list[tuple[bytes, bytes, bytes]]:
    data = json.loads(GOLDEN.read_text())
    return [tuple(base64.b64decode(x) for x in f) for f in data["frames"]]  # type: ignore[misc]


def test_golden_capture_re_encodes_byte_for_byte() -> None:
    dec = msgspec.msgpack.Decoder(KVEventBatch)
    caught = frames()
    assert len(caught) == 25
    for topic, seq, payload in caught:
        batch = dec.decode(payload)
        assert encode_batch(batch.ts, batch.events, batch.data_parallel_rank) == payload
        assert topic == b"kv-events"
        assert seq_bytes(int.from_bytes(seq, "big")) == seq


def test_legacy_shape_is_positional_arrays_with_the_tag_first() -> None:
    ev = BlockStored([1, 2**64 - 1], None, list(range(32)), 16, None, "GPU", None)
    raw = encode_batch(1.5, [ev], 0, legacy=True)
    generic = msgspec.msgpack.decode(raw)
    assert generic[0] == 1.5 and generic[2] == 0
    assert generic[1][0][:3] == ["BlockStored", [1, 2**64 - 1], None]
    assert msgspec.msgpack.Decoder(LegacyKVEventBatch).decode(raw).events[0].block_hashes == [1, 2**64 - 1]
    assert seq_bytes(-1) == b"\xff" * 8
