"""A vLLM server with --data-parallel-size N behind one URL (audit #42): the router follows every
rank's event stream, treats each rank as a routing target and pins the chosen one with
X-data-parallel-rank. The engine is a fake that lists two rank publishers in /kv_event_sources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.procs import Backend, RouterProc, free_port, http, wait_for

ADMIN = {"Authorization": "Bearer a"}


def _rows(r: RouterProc) -> dict[str, dict[str, object]]:
    body = json.loads(http("GET", r.url + "/debug/replicas", headers=ADMIN)[2])
    return {row["id"]: row for row in body["replicas"]}


def test_each_rank_is_a_target_with_its_own_stream_and_the_rank_header(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    logs: Path = tmp_path_factory.mktemp("dp")
    engine = Backend(logs, "dp-engine")
    engine.control(dp_sources=[f"tcp://*:{free_port()}", f"tcp://*:{free_port()}"])
    r = RouterProc(
        logs,
        [engine.url],
        "--policy",
        "round_robin",
        "--kv-events",
        "auto",
        "--scrape-metrics",
        "false",
        "--enable-debug",
        "--admin-token",
        "a",
        "--drain-grace",
        "0",
    )
    try:
        rank1 = f"{engine.url}#dp1"
        wait_for(
            lambda: (
                set(_rows(r)) == {engine.url, rank1}
                and all(row["has_kv_events"] and row["healthy"] for row in _rows(r).values())
            ),
            15,
            "two DP ranks admitted",
        )
        seen: dict[str, str] = {}
        for _ in range(4):
            code, h, _ = http(
                "POST", r.url + "/v1/completions", {"model": "fake-model", "prompt": "hi", "max_tokens": 1}
            )
            assert code == 200
            seen[h["x-kvrouter-replica"]] = engine.stats()["last_headers"].get("X-data-parallel-rank", "")
        assert seen == {engine.url: "0", rank1: "1"}
    finally:
        r.proc.stop()
        engine.proc.stop()
