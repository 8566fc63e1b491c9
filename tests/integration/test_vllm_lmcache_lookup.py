"""vLLM CPU + LMCache in LMCache's default CPU transfer mode (engine_driven): hits, but no CPU-tier events.

    make lmcache-env tiny-model && KVROUTER_VLLM_VENV=.venv-vllm KVROUTER_LMCACHE_VENV=.venv-lmcache \
        .venv/bin/python -m pytest -m vllm tests/integration/test_vllm_lmcache_lookup.py

This is the deployment in which a router cannot listen for the CPU tier and must ask LMCache's MP
coordinator (POST /directory/lookup) what it holds. One replica on core 0, its own MP server, a coordinator.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.vllm_fixtures import FIRST_PLAIN_TOKEN, metric_sum, token_prompt
from tests.integration.vllm_pd_fixtures import (
    LMCACHE_CHUNK,
    LMCacheFleet,
    RawEventCollector,
    complete_slow,
    directory_lookup,
    flood_vllm_cache,
)
from tests.support.procs import wait_for

pytestmark = pytest.mark.vllm

PROMPT_TOKENS = 600


@pytest.fixture(scope="module")
def frames(lmcache_lookup_mode: LMCacheFleet) -> Iterator[RawEventCollector]:
    collector = RawEventCollector([r.replica for r in lmcache_lookup_mode.replicas])
    time.sleep(1.0)  # PUB/SUB slow joiner
    yield collector
    collector.close()
    assert not collector.snapshot().errors


def test_engine_driven_mode_hits_without_cpu_events_and_the_coordinator_still_knows(
    lmcache_lookup_mode: LMCacheFleet, frames: RawEventCollector
) -> None:
    r0 = lmcache_lookup_mode.replicas[0].replica
    assert lmcache_lookup_mode.replicas[0].transfer_mode == "engine_driven"
    external0 = metric_sum(r0.url, "vllm:external_prefix_cache_hits_total")
    prompt = token_prompt(1601, PROMPT_TOKENS)
    complete_slow(r0.url, prompt)
    flood_vllm_cache(r0.url, 1610)
    held = len(prompt) // LMCACHE_CHUNK * LMCACHE_CHUNK

    # The coordinator learns the chunks from the MP server's reports, events or not.
    def placed() -> dict[str, Any] | None:
        _, reply = directory_lookup(lmcache_lookup_mode, prompt)
        assert reply.status == 200, reply.body
        results = reply.body["results"]
        return reply.body if results and all(r["placements"] for r in results) else None

    body = wait_for(placed, 30, "coordinator placements in engine_driven mode", interval=0.5)
    assert body is not None
    assert body["chunks"] == held // LMCACHE_CHUNK

    again = complete_slow(r0.url, prompt)
    assert again.body["usage"]["prompt_tokens_details"]["cached_tokens"] == held
    assert metric_sum(r0.url, "vllm:external_prefix_cache_hits_total") - external0 == held

    # A few more engine steps for anything queued, then: GPU events only, not one medium-CPU event.
    for _ in range(3):
        complete_slow(r0.url, [FIRST_PLAIN_TOKEN] * 4)
    time.sleep(1.0)
    log = frames.snapshot()
    assert log.stored(r0.name, medium="GPU")
    assert not log.stored(r0.name, medium="CPU")
