"""kvrouter over real vLLM CPU + LMCache 0.5.6 MP replicas: the CPU tier credited from its KV events.

    make lmcache-env tiny-model && KVROUTER_VLLM_VENV=.venv-vllm KVROUTER_LMCACHE_VENV=.venv-lmcache \
        .venv/bin/python -m pytest -m vllm tests/integration/test_vllm_lmcache_router.py

Three replicas of the tiny model in lmcache_driven mode (their streams carry the CPU tier's events):
r0 on its own LMCache MP server (mp0), r1 and r2 sharing one (mp1), with kvrouter in front told which
replicas share which server (``--lmcache-instance``). Prompts are sent *directly* to one replica and
then pushed out of its 96-block vLLM cache, so the only way the router can know where they still are
is the CPU tier's events.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.integration.vllm_fixtures import (
    FIRST_PLAIN_TOKEN,
    Reply,
    cached_tokens,
    http,
    metric_sum,
    token_prompt,
)
from tests.integration.vllm_pd_fixtures import (
    LMCACHE_CHUNK,
    REQUEST_TIMEOUT_S,
    LMCacheFleet,
    complete_slow,
    flood_vllm_cache,
)
from tests.support import procs
from tests.support.procs import wait_for

pytestmark = pytest.mark.vllm

PROMPT_TOKENS = 600  # two whole LMCache chunks (512 tokens) and a partial one LMCache never stores
HELD = PROMPT_TOKENS // LMCACHE_CHUNK * LMCACHE_CHUNK
HELD_BLOCKS = HELD // 32
EXTERNAL_HITS = "vllm:external_prefix_cache_hits_total"


@pytest.fixture(scope="module")
def fleet(lmcache_three: LMCacheFleet) -> LMCacheFleet:
    return lmcache_three


@pytest.fixture(scope="module")
def router(fleet: LMCacheFleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    instances: list[str] = []
    for lr in fleet.replicas:
        instances += ["--lmcache-instance", f"{lr.server.instance_id}={lr.replica.url}"]
    proc = procs.RouterProc(
        tmp_path_factory.mktemp("kvrouter"),
        fleet.urls,
        *("--policy", "cache_aware", "--kv-events", "auto", "--enable-debug", *instances),
        *("--canary-after", "0"),  # canary requests would enter the engines' hit counters
    )
    try:
        yield proc.url
    finally:
        proc.proc.stop(timeout=15)


def route_view(router: str, prompt: list[int]) -> dict[str, tuple[int, int]]:
    """replica URL -> (GPU blocks, usable blocks) the router's index matches for `prompt` (POST /debug/route)."""
    body = http("POST", router + "/debug/route", {"model": "tiny", "prompt": prompt, "max_tokens": 1}).body
    return {r["replica"]: (r["gpu_blocks"], r["cpu_blocks"]) for r in body["replicas"]}


def nudge(url: str) -> None:
    """One engine step: vLLM publishes the connector's queued CPU-tier events at the end of a step."""
    complete_slow(url, [FIRST_PLAIN_TOKEN] * 4)


def wait_view(
    router: str, prompt: list[int], want: dict[str, tuple[int, int]], nudge_urls: list[str]
) -> None:
    def ok() -> bool:
        view = route_view(router, prompt)
        if all(view.get(u) == w for u, w in want.items()):
            return True
        for u in nudge_urls:
            nudge(u)
        return False

    wait_for(ok, 60, f"the router's index to show {want} for a {len(prompt)}-token prompt", interval=0.5)


def via_router(router: str, prompt: list[int]) -> Reply:
    return http(
        "POST",
        router + "/v1/completions",
        {"model": "tiny", "prompt": prompt, "max_tokens": 1},
        timeout=REQUEST_TIMEOUT_S,
    )


def test_a_prompt_evicted_from_vllm_but_held_by_lmcache_routes_back_as_a_cpu_tier_hit(
    fleet: LMCacheFleet, router: str
) -> None:
    r0, r1, r2 = (lr.replica for lr in fleet.replicas)
    prompt = token_prompt(4201, PROMPT_TOKENS)
    assert cached_tokens(complete_slow(r0.url, prompt)) == 0
    flood_vllm_cache(r0.url, 4210)
    # Evicted from r0's GPU, held by mp0: the router credits r0 with the 16 blocks of LMCache's two
    # chunks (re-hashed from the chunk events' tokens) and nobody else with anything.
    wait_view(router, prompt, {r0.url: (0, HELD_BLOCKS), r1.url: (0, 0), r2.url: (0, 0)}, [r0.url])
    external0 = metric_sum(r0.url, EXTERNAL_HITS)
    reply = via_router(router, prompt)
    assert reply.status == 200, reply.body
    assert reply.headers.get("x-kvrouter-replica", "").rstrip("/") == r0.url
    assert cached_tokens(reply) == HELD
    assert metric_sum(r0.url, EXTERNAL_HITS) - external0 == HELD
    assert metric_sum(router, "kvrouter_cpu_tier_mode", replica=r0.url, mode="events") == 1.0


def test_a_shared_lmcache_tier_spreads_its_prompts_over_the_replicas_attached_to_it(
    fleet: LMCacheFleet, router: str
) -> None:
    r0, r1, r2 = (lr.replica for lr in fleet.replicas)
    prompts = [token_prompt(4301 + i, PROMPT_TOKENS) for i in range(4)]
    for p in prompts:  # computed by r1 only: into mp1, which r2 shares
        assert cached_tokens(complete_slow(r1.url, p)) == 0
    flood_vllm_cache(r1.url, 4320)
    for p in prompts:
        wait_view(
            router, p, {r1.url: (0, HELD_BLOCKS), r2.url: (0, HELD_BLOCKS), r0.url: (0, 0)}, [r1.url, r2.url]
        )
    external = {u: metric_sum(u, EXTERNAL_HITS) for u in (r1.url, r2.url)}
    t0 = time.monotonic()
    with ThreadPoolExecutor(len(prompts)) as pool:
        replies = list(pool.map(lambda p: via_router(router, p), prompts))
    assert time.monotonic() - t0 < REQUEST_TIMEOUT_S
    assert all(r.status == 200 for r in replies), [r.body for r in replies]
    served = [(r.headers.get("x-kvrouter-replica", "").rstrip("/"), cached_tokens(r)) for r in replies]
    # Both replicas on the tier get these prompts, each as an external hit of both chunks. Load balancing may
    # still send one of the concurrent burst to r0, which recomputes it (its own tier never saw it).
    on_tier = [(u, c) for u, c in served if u in (r1.url, r2.url)]
    assert {u for u, _ in on_tier} == {r1.url, r2.url}, served
    assert all(c == HELD for _, c in on_tier), served
    assert len(on_tier) >= len(prompts) - 1 and all(c == 0 for u, c in served if u == r0.url), served
    gained = {u: metric_sum(u, EXTERNAL_HITS) - external[u] for u in external}
    assert gained[r2.url] >= HELD and sum(gained.values()) == HELD * len(on_tier)
