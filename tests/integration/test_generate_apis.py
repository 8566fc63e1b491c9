"""Every generate API vLLM 0.32 serves, through a real router process in front of two fake
engines: Responses affinity (engine-local store), Anthropic Messages keys, request forms the
engine accepts, vLLM paths passed through, and the fleet-wide prefix-cache reset."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import Backend, RouterProc, http

ADMIN = {"Authorization": "Bearer admin-secret"}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Backend, Backend, RouterProc]]:
    logs: Path = tmp_path_factory.mktemp("generate-apis")
    a = Backend(logs, "a")
    b = Backend(logs, "b")
    r = RouterProc(
        logs,
        [a.url, b.url],
        "--policy",
        "cache_aware",
        "--kv-events",
        "off",
        "--scrape-metrics",
        "false",
        "--enable-debug",
        "--admin-token",
        "admin-secret",
        "--drain-grace",
        "0",
    )
    yield a, b, r
    for p in (r.proc, a.proc, b.proc):
        p.stop()


def _route(r: RouterProc, body: dict[str, object]) -> dict[str, object]:
    code, _, raw = http("POST", r.url + "/debug/route", body, headers=ADMIN)
    assert code == 200, raw
    return json.loads(raw)  # type: ignore[no-any-return]


@pytest.mark.parametrize("stream", [False, True])
def test_previous_response_id_goes_to_the_replica_that_stored_it(
    fleet: tuple[Backend, Backend, RouterProc], stream: bool
) -> None:
    _, _, r = fleet
    code, h, raw = http(
        "POST", r.url + "/v1/responses", {"model": "fake-model", "input": "hello", "stream": stream}
    )
    assert code == 200, raw
    owner = h["x-kvrouter-replica"]
    rid = (
        json.loads(raw)["id"]
        if not stream
        else json.loads(raw.split(b"data: ")[1].split(b"\n")[0])["response"]["id"]
    )
    for turn in range(6):  # each turn continues the last: every one must reach the owner (else 404)
        body = {"model": "fake-model", "input": f"turn {turn}", "previous_response_id": rid, "stream": stream}
        code, h, raw = http("POST", r.url + "/v1/responses", body)
        assert code == 200, raw
        assert h["x-kvrouter-replica"] == owner
        rid = json.loads(raw)["id"] if not stream else rid
    code, h, raw = http("GET", r.url + f"/v1/responses/{rid}")
    assert code == 200 and h["x-kvrouter-replica"] == owner


def test_responses_and_messages_are_keyed_like_chat(fleet: tuple[Backend, Backend, RouterProc]) -> None:
    _, _, r = fleet
    system = "You are a careful assistant. " * 20
    anthropic = {
        "model": "fake-model",
        "max_tokens": 8,
        "system": system,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "list the files"}]}],
    }
    code, h1, _ = http("POST", r.url + "/v1/messages", anthropic)
    assert code == 200
    for _ in range(3):  # the same conversation stays where its prefix is (speculatively) cached
        code, h, _ = http("POST", r.url + "/v1/messages", anthropic)
        assert code == 200 and h["x-kvrouter-replica"] == h1["x-kvrouter-replica"]
    responses = {
        "model": "fake-model",
        "instructions": system,
        "input": [{"role": "user", "content": "list"}],
    }
    code, h2, _ = http("POST", r.url + "/v1/responses", responses)
    assert code == 200
    code, h3, _ = http("POST", r.url + "/v1/responses", responses)
    assert h3["x-kvrouter-replica"] == h2["x-kvrouter-replica"]


def test_requests_vllm_serves_are_not_refused(fleet: tuple[Backend, Backend, RouterProc]) -> None:
    _, _, r = fleet
    assert http("POST", r.url + "/v1/completions", {"prompt": "no model field", "max_tokens": 2})[0] == 200
    assert (
        http("POST", r.url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})[0]
        == 200
    )
    assert http("POST", r.url + "/v1/completions", {"model": "fake-model", "prompt_embeds": "AAAA"})[0] == 200
    code, _, raw = http("POST", r.url + "/v1/completions", {"model": "fake-model"})
    assert code == 400 and json.loads(raw)["error"]["param"] == "prompt"
    tokens = {"model": "fake-model", "token_ids": list(range(1, 100)), "sampling_params": {"max_tokens": 2}}
    assert http("POST", r.url + "/inference/v1/generate", tokens)[0] == 200
    for path in ("/v2/embed",):
        code, _, raw = http("POST", r.url + path, {"model": "fake-model", "texts": ["x"]})
        assert code == 200 and json.loads(raw)["path"] == path


def test_batch_prompts_are_counted_prompt_by_prompt(fleet: tuple[Backend, Backend, RouterProc]) -> None:
    _, _, r = fleet
    one = _route(r, {"model": "fake-model", "prompt": "a" * 400})
    batch = _route(r, {"model": "fake-model", "prompt": ["a" * 400, "b" * 4000]})
    assert one["prompt_tokens"] == 100
    assert batch["prompt_tokens"] == 1100


def test_reset_prefix_cache_resets_every_replica_and_the_index(
    fleet: tuple[Backend, Backend, RouterProc],
) -> None:
    a, b, r = fleet
    http("POST", r.url + "/v1/completions", {"model": "fake-model", "prompt": "x" * 2000, "max_tokens": 2})
    rows = json.loads(http("GET", r.url + "/debug/replicas", headers=ADMIN)[2])["replicas"]
    assert sum(row["index_blocks"] for row in rows) > 0
    assert http("POST", r.url + "/reset_prefix_cache")[0] == 403  # admin-protected
    code, _, raw = http("POST", r.url + "/reset_prefix_cache", headers=ADMIN)
    assert code == 200, raw
    assert json.loads(raw)["reset"] is True
    assert a.stats()["resets"] == 1 and b.stats()["resets"] == 1
    rows = json.loads(http("GET", r.url + "/debug/replicas", headers=ADMIN)[2])["replicas"]
    assert sum(row["index_blocks"] for row in rows) == 0
