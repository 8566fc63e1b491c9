"""The LMCache CPU tier in the index, from real captures (tests/router/golden, written by
tests/integration/test_vllm_lmcache.py against vLLM 0.32 + LMCache 0.5.6 MP): 256-token chunks
re-hashed as the router's 32-token blocks, credited the way vLLM loads them, withdrawn on
LMCache's evictions."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from prometheus_client import CollectorRegistry

from router.hashing import hash_token_blocks, model_seed
from router.index import PrefixIndex
from router.kv import wire as kv_wire
from router.kv.metrics import KVEventMetrics
from router.kv.stream import ReplicaEvents
from router.types import BlockHash, ReplicaId, Tier

GOLDEN = Path(__file__).parent / "golden"
MODEL = "tiny"
BS = 32
R0 = ReplicaId("r0")


def _frames(name: str) -> tuple[dict[str, object], list[tuple[int, bytes]]]:
    data = json.loads((GOLDEN / name).read_text())
    frames = [
        (int.from_bytes(base64.b64decode(f[1]), "big", signed=True), base64.b64decode(f[2]))
        for f in data["frames"]
    ]
    return data, frames


def _stream(index: PrefixIndex, replica: ReplicaId = R0) -> ReplicaEvents:
    index.add_replica(replica)
    return ReplicaEvents(
        replica, index, model=MODEL, block_size=BS, metrics=KVEventMetrics(CollectorRegistry())
    )


def _keys(tokens: list[int]) -> list[BlockHash]:
    return hash_token_blocks(tokens, BS, model_seed(MODEL))


def test_golden_cpu_chunks_confirm_the_router_keys_of_their_tokens() -> None:
    data, frames = _frames("vllm-0.32-lmcache-0.5.6-kv-events.json")
    prompt = data["prompt_a"]
    assert isinstance(prompt, list)
    index = PrefixIndex()
    ev = _stream(index)
    for seq, payload in frames:
        ev.on_message(seq, payload)
    keys = _keys(prompt)
    assert len(keys) == 600 // BS
    # Both full chunks of A (16 blocks of 32) are on the CPU tier under the keys a request for A
    # looks up; the partial third chunk never was (LMCache 0.5.6 stores whole chunks only).
    assert [index.holds(R0, h, Tier.CPU) for h in keys] == [True] * 16 + [False] * (len(keys) - 16)
    gpu, usable = index.match(keys)
    slot = index.add_replica(R0)
    # The capture ends after A came back from LMCache as an external hit of 512 tokens.
    assert usable[slot] * BS >= 512 == data["requests"][-1]["usage"]["prompt_tokens_details"]["cached_tokens"]  # type: ignore[index]
    assert usable[slot] >= gpu[slot]
    assert ev.stats.orphans == 0 and ev.stats.decode_errors == 0
    index.check_invariants()


def test_golden_lmcache_evictions_withdraw_every_block_of_the_chunk() -> None:
    data, frames = _frames("vllm-0.32-lmcache-0.5.6-cpu-evictions.json")
    prompt = data["prompt"]
    assert isinstance(prompt, list)
    index = PrefixIndex()
    ev = _stream(index)
    keys = _keys(prompt)[:16]
    seen_on_cpu = False
    for seq, payload in frames:
        ev.on_message(seq, payload)
        seen_on_cpu = seen_on_cpu or all(index.holds(R0, h, Tier.CPU) for h in keys)
    assert seen_on_cpu  # stored as two chunks of eight router blocks ...
    assert not any(index.holds(R0, h, Tier.CPU) for h in keys)  # ... and withdrawn, all 16
    assert index.replica_blocks(R0, Tier.CPU) % (256 // BS) == 0  # only whole chunks remain
    index.check_invariants()


def _cpu_chunk(tokens: list[int], engine_hash: int, parent: int | None) -> kv_wire.BlockStored:
    return kv_wire.BlockStored(
        block_hashes=[engine_hash],
        parent_block_hash=parent,
        token_ids=tokens,
        block_size=256,
        lora_id=None,
        medium="CPU",
        lora_name=None,
    )


def _batch(events: list[kv_wire.KVEvent]) -> bytes:
    return kv_wire.encode_batch(1.0, events)


def test_any_chunk_size_is_rehashed_at_the_router_block_size() -> None:
    tokens = list(range(1000, 1000 + 1024))
    for chunk in (64, 128, 256, 512):
        index = PrefixIndex()
        ev = _stream(index)
        events: list[kv_wire.KVEvent] = []
        parent: int | None = None
        for i in range(len(tokens) // chunk):
            h = 7_000 + i
            events.append(
                kv_wire.BlockStored(
                    block_hashes=[h],
                    parent_block_hash=parent,
                    token_ids=tokens[i * chunk : (i + 1) * chunk],
                    block_size=chunk,
                    lora_id=None,
                    medium="CPU",
                    lora_name=None,
                )
            )
            parent = h
        ev.on_message(0, _batch(events))
        assert all(index.holds(R0, h, Tier.CPU) for h in _keys(tokens)), chunk
        # Removing the second chunk withdraws exactly its blocks; the first stays.
        ev.on_message(1, _batch([kv_wire.BlockRemoved(block_hashes=[7_001], medium="CPU")]))
        per = chunk // BS
        held = [index.holds(R0, h, Tier.CPU) for h in _keys(tokens)]
        assert held[:per] == [True] * per and held[per : 2 * per] == [False] * per
        _gpu, usable = index.match(_keys(tokens))
        assert usable[0] == per  # the CPU prefix stops at the evicted chunk
        index.check_invariants()


def test_gpu_prefix_then_whole_chunks_the_way_vllm_loads() -> None:
    tokens = list(range(5, 5 + 768))
    index = PrefixIndex()
    ev = _stream(index)
    gpu_ev = kv_wire.BlockStored(
        block_hashes=list(range(1, 11)),
        parent_block_hash=None,
        token_ids=tokens[: 10 * BS],
        block_size=BS,
        lora_id=None,
        medium="GPU",
        lora_name=None,
    )
    chunks = [_cpu_chunk(tokens[:256], 900, None), _cpu_chunk(tokens[256:512], 901, 900)]
    ev.on_message(0, _batch([gpu_ev, *chunks]))
    gpu, usable = index.match(_keys(tokens))
    assert (gpu[0], usable[0]) == (10, 16)  # 10 GPU blocks, then LMCache loads up to 512 tokens
    # LMCache evicts its first chunk: its lookup from token 0 misses, so nothing is loaded from it.
    ev.on_message(1, _batch([kv_wire.BlockRemoved(block_hashes=[900], medium="CPU")]))
    gpu, usable = index.match(_keys(tokens))
    assert (gpu[0], usable[0]) == (10, 10)
    index.check_invariants()
