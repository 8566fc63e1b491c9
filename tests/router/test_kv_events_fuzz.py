"""Fuzz the KV-event decoder and applier: nothing but DecodeError may escape decode_batch, and
nothing at all may escape the applier, whatever bytes arrive; the index stays consistent."""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from router.kv.decode import DecodeError, decode_batch
from router.kv.metrics import KVEventMetrics
from router.kv.stream import ReplicaEvents
from router.types import ReplicaId
from tests.support.kv_fixtures import FakeIndex, capture_frames, check_consistent, seq8

GOLDEN = [f[2] for f in capture_frames()]
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
    database=None,
)


def _decode_or_error(data: bytes) -> None:
    try:
        decode_batch(data)
    except DecodeError:
        pass


@FUZZ
@given(st.binary(max_size=256))
def test_random_bytes_only_raise_decode_error(data: bytes) -> None:
    _decode_or_error(data)
    _decode_or_error(b"\x93" + data)  # looks like an array batch
    _decode_or_error(b"\x83" + data)  # looks like a map batch


@st.composite
def mutated_golden(draw: st.DrawFn) -> bytes:
    base = bytearray(draw(st.sampled_from(GOLDEN)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        i = draw(st.integers(0, max(0, len(base) - 1)))
        if op == "flip" and base:
            base[i] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del base[i:]
        elif op == "insert":
            base[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif base:
            del base[i : i + draw(st.integers(1, 8))]
    return bytes(base)


@FUZZ
@given(
    st.lists(mutated_golden(), min_size=1, max_size=6), st.lists(st.integers(0, 30), min_size=6, max_size=6)
)
def test_mutated_golden_payloads_never_crash_the_applier(payloads: list[bytes], seqs: list[int]) -> None:
    for p in payloads:
        _decode_or_error(p)
    idx = FakeIndex()
    ev = ReplicaEvents(
        ReplicaId("f"), idx, model="m", capacity=64, metrics=KVEventMetrics(CollectorRegistry())
    )
    for p, s in zip(payloads, seqs, strict=False):
        ev.handle_frames([b"kv-events", seq8(s), p])
    check_consistent(ev, idx)


_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=12),
    st.binary(max_size=12),
    st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared", "GPU", "CPU", "type"]),
)
_value = st.recursive(
    _leaf,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(
            st.text(max_size=8)
            | st.sampled_from(
                [
                    "type",
                    "block_hashes",
                    "parent_block_hash",
                    "token_ids",
                    "block_size",
                    "medium",
                    "extra_keys",
                ]
            ),
            inner,
            max_size=5,
        )
    ),
    max_leaves=25,
)


@st.composite
def structured_batch(draw: st.DrawFn) -> Any:
    """Batches that are shaped right at the top and wrong anywhere below."""
    events = draw(
        st.lists(
            st.one_of(
                _value,
                st.fixed_dictionaries(
                    {
                        "type": st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared", "X"]),
                        "block_hashes": st.lists(
                            st.integers(0, 2**64 - 1) | st.binary(max_size=4), max_size=3
                        ),
                        "parent_block_hash": st.none() | st.integers(0, 8),
                        "token_ids": st.lists(st.integers(0, 5), max_size=12),
                        "block_size": st.integers(-1, 4),
                        "medium": st.none() | st.sampled_from(["GPU", "CPU"]),
                        "extra_keys": st.none() | st.lists(_value, max_size=3),
                    }
                ),
            ),
            max_size=4,
        )
    )
    ts = draw(st.floats(allow_nan=False) | st.integers(-5, 5))
    if draw(st.booleans()):
        return [ts, events, 0]
    return {"ts": ts, "events": events}


@FUZZ
@given(st.lists(structured_batch(), min_size=1, max_size=5))
def test_structured_garbage_is_applied_or_rejected_never_crashes(batches: list[Any]) -> None:
    idx = FakeIndex()
    ev = ReplicaEvents(
        ReplicaId("f"), idx, model="m", capacity=8, metrics=KVEventMetrics(CollectorRegistry())
    )
    for s, b in enumerate(batches):
        data = msgspec.msgpack.encode(b)
        _decode_or_error(data)
        ev.on_message(s, data)
    check_consistent(ev, idx)
