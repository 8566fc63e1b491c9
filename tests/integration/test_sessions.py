"""Agent sessions end to end: hints reach the engine as it expects them (or not at all), and two
router processes agree on a session's replica from the engines' KV events alone."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.support.procs import Backend, RouterProc, SimFleet, http, quiet_router, stopping, wait_for


def test_priority_reaches_only_priority_replicas_and_nvext_never_does(tmp_path: Path) -> None:
    a = Backend(tmp_path, "a")
    b = Backend(tmp_path, "b")
    router = quiet_router(
        tmp_path, [a.url, b.url], "--policy", "round_robin", "--priority-replica", a.url, name="router"
    )
    with stopping(a.proc, b.proc, router.proc):
        seen: dict[str, dict[str, object]] = {}
        for i in range(4):
            body = {
                "model": "fake-model",
                "prompt": f"turn {i}",
                "max_tokens": 4,
                "nvext": {
                    "session_control": {"session_id": f"agent-{i}"},
                    "agent_hints": {"priority": 7, "osl": 64, "speculative_prefill": False},
                },
            }
            code, headers, _ = http("POST", router.url + "/v1/completions", body)
            assert code == 200
            assert headers.get("x-session-token") == f"agent-{i}"
            for be in (a, b):
                last = be.stats().get("last_body")
                if last:
                    seen[be.url] = json.loads(str(last))
        assert set(seen) == {a.url, b.url}
        assert all("nvext" not in body for body in seen.values())
        assert seen[a.url]["priority"] == -7  # Dynamo's higher-first 7 is vLLM's smaller-first -7
        assert "priority" not in seen[b.url]  # b does not schedule by priority: it would answer 400


def test_plain_priority_is_stripped_for_replicas_without_priority_scheduling(tmp_path: Path) -> None:
    a = Backend(tmp_path, "a")
    router = quiet_router(tmp_path, [a.url], name="router")
    with stopping(a.proc, router.proc):
        body = {"model": "fake-model", "prompt": "x", "max_tokens": 2, "priority": 3}
        code, _, _ = http("POST", router.url + "/v1/completions", body, headers={"x-session-id": "s1"})
        assert code == 200
        assert "priority" not in json.loads(str(a.stats()["last_body"]))


def test_two_routers_agree_on_a_session_home(tmp_path: Path) -> None:
    fleet = SimFleet(tmp_path, 4)
    common = ("--kv-events", "auto", "--policy", "cache_aware")
    ra = RouterProc(tmp_path, fleet.urls, *common, name="router-a")
    rb = RouterProc(tmp_path, fleet.urls, *common, name="router-b")
    with stopping(ra.proc, rb.proc, fleet.proc), ThreadPoolExecutor(2) as pool:

        def send(router: RouterProc, key: str, prompt: list[int]) -> str:
            code, headers, _ = http(
                "POST",
                router.url + "/v1/completions",
                {"model": "tiny", "prompt": prompt, "max_tokens": 4},
                headers={"x-session-id": key},
            )
            assert code == 200
            return headers["x-kvrouter-replica"]

        system = [5] * 96  # a system prompt every session shares
        homes: dict[str, set[str]] = {}
        for s in range(6):
            key = f"agent-{s}"
            prompt = system + [100 + s] * 32
            # A new session's first turn reaches both routers at once (a retry, or sub-agents
            # fanned out through the Service): no KV event can have told either about the other.
            both = pool.map(lambda r: send(r, key, prompt), (ra, rb))  # noqa: B023 (consumed here)
            homes[key] = set(both)
            for t in range(4):
                time.sleep(0.3)  # the tool pause: the engine's KV events reach both routers
                prompt = prompt + [200 + s * 10 + t] * 24  # answer + tool result
                homes[key].add(send((ra, rb)[t % 2], key, prompt))  # turns alternate routers
        assert all(len(h) == 1 for h in homes.values()), homes


def test_speculative_prefill_warms_history_plus_answer(tmp_path: Path) -> None:
    a = Backend(tmp_path, "a", chunks=3)
    router = quiet_router(tmp_path, [a.url], name="router")
    with stopping(a.proc, router.proc):
        messages = [{"role": "system", "content": "tools"}, {"role": "user", "content": "fix the build"}]
        body = {
            "model": "fake-model",
            "messages": messages,
            "max_tokens": 8,
            "stream": True,
            "nvext": {
                "session_control": {"session_id": "agent"},
                "agent_hints": {"speculative_prefill": True},
            },
        }
        code, _, _ = http("POST", router.url + "/v1/chat/completions", body)
        assert code == 200
        stats = wait_for(lambda: (s := a.stats())["requests"] >= 2 and s, what="the warm-up request")
        warm = json.loads(str(stats["last_body"]))
        assert warm["messages"] == [*messages, {"role": "assistant", "content": "t0 t1 t2 "}]
        assert warm["max_tokens"] == 1 and "stream" not in warm and "nvext" not in warm
        # without the hint: no warm-up
        del body["nvext"]
        assert http("POST", router.url + "/v1/chat/completions", body)[0] == 200
        time.sleep(0.5)
        assert a.stats()["requests"] == 3
