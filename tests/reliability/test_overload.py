"""Overload and floods against a real `kvrouter serve`: bounded admission (global cap + FIFO queue,
per-replica cap) answers 429 + Retry-After with an OpenAI body, streaming and non-streaming wait in
one queue in arrival order, and floods of bodies, headers, connections and prompts leave memory
bounded (docs/reliability.md, "Overload")."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.harness import SimFleet, call, debug_replicas, wait_for
from tests.support.proc_stats import proc_stats
from tests.support.procs import Backend, RouterProc, http, quiet_router

COMPLETION = {"model": "fake-model", "prompt": "hello", "max_tokens": 2}


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("overload")


@pytest.fixture(scope="module")
def backend(logs: Path) -> Iterator[Backend]:
    b = Backend(logs, "slow", chunks=2, chunk_delay=0.1)
    yield b
    b.proc.stop()


async def test_queue_full_is_429_with_retry_after(logs: Path, backend: Backend) -> None:
    r = quiet_router(logs, [backend.url], "--max-in-flight", "2", "--max-queue", "2", name="r-429")
    try:
        async with aiohttp.ClientSession() as s:
            outs = await asyncio.gather(
                *(call(s, r.url + "/v1/completions", {**COMPLETION, "stream": i % 2 == 0}) for i in range(10))
            )
            async with s.post(r.url + "/v1/completions", json=COMPLETION) as probe:
                await probe.read()
        assert all(o.kind in ("ok", "failed_clean") for o in outs), outs
        assert sum(o.kind == "ok" for o in outs) == 4  # 2 running + 2 queued
        assert [o.status for o in outs if o.kind == "failed_clean"] == [429] * 6
        code, headers, raw = await asyncio.to_thread(_saturated_429, r.url)
        assert code == 429 and headers["Retry-After"] == "1"
        assert json.loads(raw)["error"]["code"] == "router_overloaded"
    finally:
        r.proc.stop()


def _saturated_429(url: str) -> tuple[int, dict[str, str], bytes]:
    """Fill the router (in threads), then take one more request's answer."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        busy = [
            pool.submit(http, "POST", url + "/v1/completions", {**COMPLETION, "stream": True})
            for _ in range(4)
        ]
        time.sleep(0.05)
        answer = http("POST", url + "/v1/completions", COMPLETION)
        for f in busy:
            f.result()
    return answer


async def test_streaming_and_unary_are_admitted_in_arrival_order(logs: Path, backend: Backend) -> None:
    r = quiet_router(logs, [backend.url], "--max-in-flight", "1", "--max-queue", "16", name="r-fifo")
    try:
        done: list[int] = []
        async with aiohttp.ClientSession() as s:

            async def one(i: int) -> None:
                await asyncio.sleep(0.03 * i)  # fixes the arrival order
                o = await call(s, r.url + "/v1/completions", {**COMPLETION, "stream": i % 2 == 1})
                assert o.kind == "ok", o
                done.append(i)

            await asyncio.gather(*(one(i) for i in range(8)))
        # one slot: each finishes before the next is admitted, so finishing order == admission order
        assert done == list(range(8))
    finally:
        r.proc.stop()


async def test_per_replica_cap_is_429(logs: Path, backend: Backend) -> None:
    r = quiet_router(logs, [backend.url], "--max-in-flight-per-replica", "1", name="r-per-replica")
    try:
        async with aiohttp.ClientSession() as s:
            outs = await asyncio.gather(
                *(call(s, r.url + "/v1/completions", {**COMPLETION, "stream": True}) for _ in range(4))
            )
        assert sorted(o.status or 0 for o in outs) == [200, 429, 429, 429]
        assert all(o.kind != "lost" for o in outs)
    finally:
        r.proc.stop()


def test_oversized_headers_and_request_line_get_openai_json_errors(logs: Path, backend: Backend) -> None:
    r = quiet_router(logs, [backend.url], "--max-header-bytes", "8192", name="r-headers")
    try:
        code, headers, body = http("GET", r.url + "/v1/models", headers={"X-Big": "a" * 20000})
        assert code == 431 and json.loads(body)["error"]["code"] == "request_header_too_large"
        assert {k.lower(): v for k, v in headers.items()}.get("connection") == "close"
        code, _, body = http("GET", r.url + "/v1/models?q=" + "b" * 20000)
        assert code == 414 and json.loads(body)["error"]["code"] == "request_line_too_long"
        many = {f"X-H{i}": "v" for i in range(200)}  # more than 128 header fields (aiohttp's limit too)
        code, _, body = http("POST", r.url + "/v1/completions", COMPLETION, headers=many)
        assert code == 431 and json.loads(body)["error"]["type"] == "invalid_request_error"
        assert http("POST", r.url + "/v1/completions", COMPLETION)[0] == 200
        assert 'kvrouter_client_errors_total{status="431"} 2.0' in r.metrics()
    finally:
        r.proc.stop()


def test_without_the_fast_path_aiohttp_still_refuses_oversized_heads(logs: Path, backend: Backend) -> None:
    r = quiet_router(
        logs, [backend.url], "--max-header-bytes", "8192", "--fast-path", "false", name="r-headers-nofast"
    )
    try:
        assert http("GET", r.url + "/v1/models", headers={"X-Big": "a" * 20000})[0] == 400  # plain text
        assert http("POST", r.url + "/v1/completions", COMPLETION)[0] == 200
    finally:
        r.proc.stop()


def test_connection_flood_is_capped_and_memory_bounded(logs: Path, backend: Backend) -> None:
    r = quiet_router(logs, [backend.url], "--max-connections", "32", name="r-conns")
    try:
        assert http("POST", r.url + "/v1/completions", COMPLETION)[0] == 200  # warm
        rss0, fds0 = proc_stats(r.proc.p.pid)
        socks: list[socket.socket] = []
        refused = 0
        try:
            for _ in range(400):  # bounded flood of idle connections
                socks.append(socket.create_connection(("127.0.0.1", r.port), timeout=2))
            time.sleep(1.5)  # refused sockets are held at most 1 s (see server._Refuse)
            rss1, fds1 = proc_stats(r.proc.p.pid)
            for sk in socks:
                sk.settimeout(0.02)  # refused ones have their 503 buffered already
                try:
                    refused += sk.recv(64).startswith(b"HTTP/1.1 503")
                except (TimeoutError, OSError):
                    pass
        finally:
            for sk in socks:
                sk.close()
        assert refused >= 400 - 32
        # the client still holds all 400 sockets open; the router holds only the 32 admitted ones
        assert fds1 - fds0 <= 32 + 4, (fds0, fds1)
        assert rss1 - rss0 < 16, f"RSS grew {rss1 - rss0:.1f} MiB under a 400-connection flood"
        wait_for(lambda: proc_stats(r.proc.p.pid)[1] <= fds0 + 4, 5, "fds back after the flood")
        assert http("POST", r.url + "/v1/completions", COMPLETION)[0] == 200
        assert 'kvrouter_client_errors_total{status="connection_cap"}' in r.metrics()
    finally:
        r.proc.stop()


def test_prompt_flood_keeps_the_index_within_capacity(logs: Path) -> None:
    sim = SimFleet(logs, 1, name="sim-capacity")
    r = RouterProc(
        logs, sim.urls, "--enable-debug", "--index-capacity", "64", "--drain-grace", "0", name="r-capacity"
    )
    try:
        wait_for(lambda: all(x["healthy"] for x in debug_replicas(r.url)["replicas"]), 10, "admitted")

        async def flood() -> list[Any]:
            sem = asyncio.Semaphore(6)
            async with aiohttp.ClientSession() as s:

                async def one(i: int) -> Any:
                    async with sem:
                        prompt = f"distinct prompt number {i} " + "with plenty of words to fill blocks " * 20
                        return await call(
                            s, r.url + "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 2}
                        )

                return list(await asyncio.gather(*(one(i) for i in range(40))))

        outs = asyncio.run(flood())
        assert all(o.kind == "ok" for o in outs)
        wait_for(lambda: debug_replicas(r.url)["replicas"][0]["index_blocks"] > 0, 5, "blocks indexed")
        snap = debug_replicas(r.url)
        assert 0 < snap["replicas"][0]["index_blocks"] <= 64
        assert snap["index_invariants"] == "ok"
    finally:
        r.proc.stop()
        sim.proc.stop()
