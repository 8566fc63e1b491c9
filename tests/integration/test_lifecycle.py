"""Lifecycle: SIGTERM drains with a live stream in flight, then exits 0."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from tests.support.procs import Backend, RouterProc, http

BODY = {"model": "fake-model", "prompt": "drain me", "stream": True}


async def test_sigterm_drains_live_stream_then_exits_0(tmp_path: Path) -> None:
    be = Backend(tmp_path, "slow", chunks=40, chunk_delay=0.1)  # a 4 s stream
    r = RouterProc(tmp_path, [be.url], "--kv-events", "off", "--drain-grace", "1.5", "--drain-timeout", "10")
    try:
        async with aiohttp.ClientSession() as s:
            resp = await s.post(r.url + "/v1/completions", json=BODY)
            assert resp.status == 200
            await resp.content.readany()  # the stream is live
            t_term = time.monotonic()
            r.proc.signal(signal.SIGTERM)
            await asyncio.sleep(0.1)
            # readiness turns false at once, liveness stays true while draining
            async with s.get(r.url + "/ready") as ready:
                assert ready.status == 503
                assert (await ready.json())["draining"] is True
            async with s.get(r.url + "/health") as health:
                assert health.status == 200
            # within the grace window new requests are still served (endpoints are deregistering)
            async with s.post(r.url + "/v1/completions", json={**BODY, "stream": False}) as late:
                assert late.status == 200
            await asyncio.sleep(1.8)  # past the grace window: the listener is closed
            with pytest.raises(aiohttp.ClientConnectionError):
                async with aiohttp.ClientSession() as fresh, fresh.get(r.url + "/health") as _:
                    pass
            rest = await resp.read()  # the in-flight stream finishes completely
            assert rest.endswith(b"data: [DONE]\n\n")
            assert rest.count(b'"text"') == 39
        code = await asyncio.to_thread(r.proc.p.wait, 10)
        assert code == 0
        assert time.monotonic() - t_term >= 3.5, "exited before the stream finished"
    finally:
        r.proc.stop()
        be.proc.stop()


async def test_drain_timeout_cuts_streams_that_run_too_long(tmp_path: Path) -> None:
    be = Backend(tmp_path, "endless", chunks=200, chunk_delay=0.1)  # 20 s
    r = RouterProc(tmp_path, [be.url], "--kv-events", "off", "--drain-grace", "0.2", "--drain-timeout", "1")
    try:
        async with aiohttp.ClientSession() as s:
            resp = await s.post(r.url + "/v1/completions", json=BODY)
            await resp.content.readany()
            t0 = time.monotonic()
            r.proc.signal(signal.SIGTERM)
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
        code = await asyncio.to_thread(r.proc.p.wait, 10)
        assert code == 0
        assert time.monotonic() - t0 < 5
    finally:
        r.proc.stop()
        be.proc.stop()


def test_config_entirely_by_environment(tmp_path: Path) -> None:
    be = Backend(tmp_path, "envbe")
    env = {"KVROUTER_BACKEND": be.url, "KVROUTER_POLICY": "least_loaded", "KVROUTER_KV_EVENTS": "off"}
    r = RouterProc(tmp_path, [], env=env, name="router-env")
    try:
        code, headers, _ = http("POST", r.url + "/v1/completions", {**BODY, "stream": False})
        assert code == 200 and headers["x-kvrouter-replica"] == be.url
    finally:
        r.proc.stop()
        be.proc.stop()
