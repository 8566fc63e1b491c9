"""Against real processes: kvrouter (cache_aware, KV events) in front of simulated vLLM
replicas that speak vLLM's HTTP API, /metrics and KV-event wire format."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest

from router.replicas.engine_metrics import parse_labels, samples
from tests.support.procs import RouterProc, SimFleet, http, wait_for

MODEL = "tiny"


def _replicas(r: RouterProc) -> dict[str, dict]:  # type: ignore[type-arg]
    body = json.loads(http("GET", r.url + "/debug/replicas")[2])
    return {row["id"]: row for row in body["replicas"]} | {"_block_size": body["block_size"]}


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for _name, raw, value in samples(text, names={name}):
        have = parse_labels(raw)
        if all(have.get(k) == v for k, v in labels.items()):
            total += value
    return total


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SimFleet, RouterProc]]:
    logs = tmp_path_factory.mktemp("cache-aware")
    # 3 replicas, block size 32 (the router starts at 16 and must learn 32), 200 blocks each
    fleet = SimFleet(logs, 3, "--block-size", "32", "--num-gpu-blocks", "200", "--max-model-len", "4096")
    router = RouterProc(logs, fleet.urls, "--enable-debug", "--policy", "cache_aware", "--block-size", "16")
    wait_for(
        lambda: (
            _replicas(router)["_block_size"] == 32
            and all(row["has_kv_events"] for k, row in _replicas(router).items() if k != "_block_size")
        ),
        10,
        "block size 32 and KV events",
    )
    yield fleet, router
    router.proc.stop()
    fleet.proc.stop()


def test_block_size_and_capacity_learned_from_cache_config_info(setup: tuple[SimFleet, RouterProc]) -> None:
    _, r = setup
    reps = _replicas(r)
    assert reps.pop("_block_size") == 32
    for row in reps.values():
        assert row["block_size"] == 32 and row["num_gpu_blocks"] == 200


def test_repeated_prompt_goes_where_it_is_cached_and_parity_agrees(
    setup: tuple[SimFleet, RouterProc],
) -> None:
    _, r = setup
    prompt = [100 + (i * 7) % 3000 for i in range(1000)]  # 1000 tokens = 31 full blocks of 32
    code, h1, _ = http("POST", r.url + "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 4})
    assert code == 200
    first = h1["x-kvrouter-replica"]
    # the engine's BlockStored events confirm the prefix in the router's index
    wait_for(lambda: _replicas(r)[first]["index_confirmed"][0] >= 31, 10, "31 confirmed blocks")
    explain = json.loads(http("POST", r.url + "/debug/route", {"model": MODEL, "prompt": prompt})[2])
    rows = {row["replica"]: row for row in explain["replicas"]}
    assert explain["chosen"] == first
    assert rows[first]["gpu_blocks"] == 31
    assert set(rows[first]["scores"]) >= {"estimated-ttft", "prefix-cache", "queue-depth"}
    assert all(rows[o]["gpu_blocks"] == 0 for o in rows if o != first)
    for _ in range(3):
        code, h, body = http(
            "POST", r.url + "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 4}
        )
        assert code == 200 and h["x-kvrouter-replica"] == first
        # vLLM reuses every full block except the one holding the last prompt token: 31 * 32
        assert json.loads(body)["usage"]["prompt_tokens_details"]["cached_tokens"] == 992
    text = http("GET", r.url + "/metrics")[2].decode()
    predicted = _metric(text, "kvrouter_predicted_cached_tokens_total", replica=first)
    actual = _metric(text, "kvrouter_actual_cached_tokens_total", replica=first, source="usage")
    assert predicted == actual == 3 * 992


def test_chat_requests_are_routed_by_prefix_too(setup: tuple[SimFleet, RouterProc]) -> None:
    _, r = setup
    system = {"role": "system", "content": "You are a careful assistant. " * 60}
    seen = set()
    for i in range(4):
        msgs = [system, {"role": "user", "content": f"question {i}"}]
        code, h, _ = http(
            "POST", r.url + "/v1/chat/completions", {"model": MODEL, "messages": msgs, "max_tokens": 2}
        )
        assert code == 200
        seen.add(h["x-kvrouter-replica"])
    assert len(seen) == 1  # same long system prompt -> same replica (byte mode keys)


def test_evictions_remove_index_entries(setup: tuple[SimFleet, RouterProc]) -> None:
    fleet, r = setup
    target = fleet.urls[0]
    # Fill replica 0's 200-block cache directly (bypassing the router): 8 x 1000-token prompts
    for i in range(8):
        prompt = [5 + i] + [1000 + i * 1000 + j for j in range(999)]
        assert (
            http("POST", target + "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 1})[0]
            == 200
        )
    text = http("GET", r.url + "/metrics")[2].decode()
    wait_for(
        lambda: (
            _metric(http("GET", r.url + "/metrics")[2].decode(), "kvrouter_kv_events_blocks_removed_total")
            > 0
        ),
        10,
        "BlockRemoved in the index",
    )
    row = _replicas(r)[target]
    assert row["index_confirmed"][0] <= 200  # never more than the engine can hold
    assert _metric(text, "kvrouter_kv_events_decode_errors_total") == 0
    assert re.search(r"kvrouter_index_blocks\{replica=\"[^\"]+\",tier=\"gpu\"\}", text)
