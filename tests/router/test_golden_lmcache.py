"""The LMCache golden captures (tests/integration/test_vllm_lmcache.py wrote them from real engines) decode
with the router's wire types and say what the router-side LMCache work relies on."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import msgspec

from router.kv.wire import BlockRemoved, BlockStored, KVEventBatch

GOLDEN = Path(__file__).parent / "golden"
EVENTS = GOLDEN / "vllm-0.32-lmcache-0.5.6-kv-events.json"
LOOKUP = GOLDEN / "lmcache-0.5.6-directory-lookup.json"
CHUNK = 256


def batches() -> list[KVEventBatch]:
    data = json.loads(EVENTS.read_text())
    decoder = msgspec.msgpack.Decoder(KVEventBatch)
    return [decoder.decode(base64.b64decode(f[2])) for f in data["frames"]]


def test_cpu_tier_events_are_one_block_stored_per_full_chunk_chained() -> None:
    data = json.loads(EVENTS.read_text())
    prompt = data["prompt_a"]
    cpu = [ev for b in batches() for ev in b.events if isinstance(ev, BlockStored) and ev.medium == "CPU"]
    assert cpu and all(ev.block_size == CHUNK and len(ev.block_hashes) == 1 for ev in cpu)
    assert all(len(ev.token_ids) == CHUNK for ev in cpu)
    first, second = cpu[0], cpu[1]  # prompt A's two full chunks come first; its partial third is never stored
    assert (first.token_ids, second.token_ids) == (prompt[:CHUNK], prompt[CHUNK : 2 * CHUNK])
    assert first.parent_block_hash is None and second.parent_block_hash == first.block_hashes[0]
    # vLLM's own tier still speaks GPU blocks of 32 beside it, and evicts them.
    gpu = [ev for b in batches() for ev in b.events if isinstance(ev, BlockStored) and ev.medium == "GPU"]
    assert gpu and all(ev.block_size == data["vllm_block_size"] for ev in gpu)
    assert any(isinstance(ev, BlockRemoved) and ev.medium == "GPU" for b in batches() for ev in b.events)
    # The capture ends with A served from LMCache: both full chunks, as an external hit.
    assert data["requests"][-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 2 * CHUNK


def test_directory_lookup_keys_are_the_event_hashes() -> None:
    data = json.loads(LOOKUP.read_text())
    hit = data["hit"]
    assert hit["request"]["model_name"] == hit["response"]["results"][0]["key"]["model_name"]
    results = hit["response"]["results"]
    assert hit["response"]["chunks"] == len(results) == len(hit["request"]["token_ids"]) // CHUNK
    for i, r in enumerate(results):
        assert r["token_ids"] == hit["request"]["token_ids"][i * CHUNK : (i + 1) * CHUNK]
        assert [(p["instance_id"], p["tier"]) for p in r["placements"]] == [("mp0", "l1")]
    low64 = [int(r["key"]["chunk_hash_hex"][-16:], 16) for r in results]
    assert low64 == data["hit_cpu_block_hashes"]
    assert not any(r["placements"] for r in data["miss"]["response"]["results"])


def test_lmcache_evictions_arrive_as_cpu_block_removed() -> None:
    data = json.loads((GOLDEN / "vllm-0.32-lmcache-0.5.6-cpu-evictions.json").read_text())
    decoder = msgspec.msgpack.Decoder(KVEventBatch)
    events = [ev for f in data["frames"] for ev in decoder.decode(base64.b64decode(f[2])).events]
    prompt, mine = data["prompt"], set(data["prompt_cpu_block_hashes"])
    stored = {
        ev.block_hashes[0]: ev.token_ids
        for ev in events
        if isinstance(ev, BlockStored) and ev.medium == "CPU"
    }
    assert {h: stored[h] for h in mine} and sorted(stored[h] for h in mine) == sorted(
        [prompt[:CHUNK], prompt[CHUNK : 2 * CHUNK]]
    )
    removed = [ev for ev in events if isinstance(ev, BlockRemoved) and ev.medium == "CPU"]
    assert removed and mine <= {h for ev in removed for h in ev.block_hashes}
