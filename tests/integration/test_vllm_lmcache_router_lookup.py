"""kvrouter in lookup mode over a real vLLM CPU + LMCache replica that publishes no CPU-tier events.

    make lmcache-env tiny-model && KVROUTER_VLLM_VENV=.venv-vllm KVROUTER_LMCACHE_VENV=.venv-lmcache \
        .venv/bin/python -m pytest -m vllm tests/integration/test_vllm_lmcache_router_lookup.py

One engine_driven replica (LMCache's CPU default) on its own MP server, registered with the MP coordinator;
kvrouter asks the coordinator (``--lmcache-coordinator``) what the tier holds before routing a long prompt.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.vllm_fixtures import cached_tokens, http, metric_sum, token_prompt
from tests.integration.vllm_pd_fixtures import (
    LMCACHE_CHUNK,
    REQUEST_TIMEOUT_S,
    LMCacheFleet,
    complete_slow,
    flood_vllm_cache,
)
from tests.support import procs

pytestmark = pytest.mark.vllm

PROMPT_TOKENS = 600
HELD = PROMPT_TOKENS // LMCACHE_CHUNK * LMCACHE_CHUNK
EXTERNAL_HITS = "vllm:external_prefix_cache_hits_total"


@pytest.fixture(scope="module")
def router(lmcache_lookup_mode: LMCacheFleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    fleet = lmcache_lookup_mode
    lr = fleet.replicas[0]
    proc = procs.RouterProc(
        tmp_path_factory.mktemp("kvrouter"),
        fleet.urls,
        *("--policy", "cache_aware", "--kv-events", "auto", "--enable-debug", "--canary-after", "0"),
        *("--lmcache-coordinator", fleet.coordinator_url, "--lmcache-model", str(fleet.model)),
        *("--lmcache-instance", f"{lr.server.instance_id}={lr.replica.url}", "--lmcache-lookup-timeout", "2"),
    )
    try:
        yield proc.url
    finally:
        proc.proc.stop(timeout=15)


def test_lookup_mode_learns_the_cpu_tier_from_the_coordinator(
    lmcache_lookup_mode: LMCacheFleet, router: str
) -> None:
    r0 = lmcache_lookup_mode.replicas[0].replica
    prompt = token_prompt(4401, PROMPT_TOKENS)
    assert cached_tokens(complete_slow(r0.url, prompt)) == 0
    flood_vllm_cache(r0.url, 4410)
    assert metric_sum(router, "kvrouter_cpu_tier_mode", replica=r0.url, mode="lookup") == 1.0
    ok0 = metric_sum(router, "kvrouter_lmcache_lookups_total", outcome="ok")
    external0 = metric_sum(r0.url, EXTERNAL_HITS)
    reply = http(
        "POST",
        router + "/v1/completions",
        {"model": "tiny", "prompt": prompt, "max_tokens": 1},
        timeout=REQUEST_TIMEOUT_S,
    )
    assert reply.status == 200, reply.body
    assert cached_tokens(reply) == HELD and metric_sum(r0.url, EXTERNAL_HITS) - external0 == HELD
    # The router asked the coordinator and now credits r0's CPU tier with the prompt's two chunks.
    assert metric_sum(router, "kvrouter_lmcache_lookups_total", outcome="ok") == ok0 + 1
    view = http("POST", router + "/debug/route", {"model": "tiny", "prompt": prompt, "max_tokens": 1}).body
    row = next(r for r in view["replicas"] if r["replica"] == r0.url)
    assert row["cpu_blocks"] >= HELD // 32
    assert metric_sum(router, "kvrouter_cpu_tier_mode", replica=r0.url, mode="lookup") == 1.0
