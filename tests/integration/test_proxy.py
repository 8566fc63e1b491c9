"""Failure behaviour, each against real processes on loopback: a `kvrouter serve`
subprocess in front of fake OpenAI backend subprocesses."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.procs import Backend, RouterProc, free_port, http, wait_http

COMPLETION = {"model": "fake-model", "prompt": "hello there, a prompt", "max_tokens": 4}


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("proxy-logs")


@pytest.fixture(scope="module", params=["fast-path", "aiohttp"])
def pair(logs: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Backend, Backend, RouterProc]]:
    """Every test on this fixture runs against both servers of the generate endpoints: the raw
    fast path (default) and aiohttp (``--fast-path false``, and any connection it hands over)."""
    a = Backend(logs, f"a-{request.param}", chunk_delay=0.0)
    b = Backend(logs, f"b-{request.param}", chunk_delay=0.0)
    server = ("--fast-path", "false") if request.param == "aiohttp" else ()
    r = RouterProc(
        logs,
        [a.url, b.url],
        "--policy",
        "round_robin",
        "--kv-events",
        "off",
        "--scrape-metrics",
        "false",
        "--first-byte-timeout",
        "1.0",
        "--request-timeout",
        "1.0",
        "--max-body-bytes",
        "1048576",
        "--eject-after",
        "1000",
        *server,
        name=f"router-{request.param}",
    )
    yield a, b, r
    for p in (r.proc, a.proc, b.proc):
        p.stop()


@pytest.fixture(autouse=True)
def reset(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "pair" in request.fixturenames:
        a, b, _ = request.getfixturevalue("pair")
        for be in (a, b):
            be.control(mode="ok", chunk_delay=0.0, chunks=16, unhealthy=False)


def test_non_streaming_and_replica_header(pair: tuple[Backend, Backend, RouterProc]) -> None:
    a, b, r = pair
    seen = set()
    for _ in range(4):
        code, headers, body = http("POST", r.url + "/v1/completions", COMPLETION)
        assert code == 200
        assert json.loads(body)["choices"][0]["text"].startswith("t0")
        seen.add(headers["x-kvrouter-replica"])
    assert seen == {a.url, b.url}  # round robin over both


def test_chat_streaming_relays_bytes_unchanged(pair: tuple[Backend, Backend, RouterProc]) -> None:
    a, _, r = pair
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    direct = http("POST", a.url + "/v1/chat/completions", body)[2]
    via = http("POST", r.url + "/v1/chat/completions", body)[2]
    assert via == direct
    assert via.endswith(b"data: [DONE]\n\n")


async def _chunk_times(url: str, body: dict[str, object]) -> tuple[float, list[float]]:
    async with aiohttp.ClientSession() as s:
        t0 = time.perf_counter()
        async with s.post(url, json=body) as resp:
            assert resp.status == 200
            times = []
            async for _chunk in resp.content.iter_any():
                times.append(time.perf_counter() - t0)
    return t0, times


async def test_streaming_flushes_each_chunk_without_delay(pair: tuple[Backend, Backend, RouterProc]) -> None:
    a, b, r = pair
    for be in (a, b):
        be.control(chunk_delay=0.05, chunks=10)
    body = {**COMPLETION, "stream": True}
    _, times = await _chunk_times(r.url + "/v1/completions", body)
    # 10 token chunks + usage + [DONE]; the first token after ~50 ms, then every ~50 ms
    assert len(times) >= 10, "chunks were coalesced: the proxy buffered"
    # Lower bounds are exact (a chunk cannot arrive before the backend sent it); upper bounds
    # leave room for a loaded CI machine but still catch buffering and Nagle/delayed-ACK stalls
    # (40 ms and 200 ms classes).
    assert 0.04 <= times[0] <= 0.5, f"first chunk at {times[0]:.3f}s"
    gaps = [t2 - t1 for t1, t2 in itertools.pairwise(times[:10])]
    gaps.sort()
    median = gaps[len(gaps) // 2]
    assert 0.04 <= median <= 0.12, f"median gap {median:.3f}s"
    assert max(gaps) < 0.5, f"a chunk stalled {max(gaps):.3f}s (Nagle/delayed ACK?)"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b'{"model": "fake-model"}', "prompt"),
        # no `model` is valid (vLLM serves it with its first served name): test_generate_apis.py
        (b'{"model": 3, "prompt": "x"}', "model"),
        (b'{"model": "fake-model", "prompt": "x", "stream": "yes"}', "stream"),
        (b'{"model": "fake-model", "prompt": []}', "prompt"),
        (b'{"model": "fake-model", "prompt": [1, "a"]}', "prompt"),
        (b"[]", None),
    ],
)
def test_bad_completion_bodies_are_400(
    pair: tuple[Backend, Backend, RouterProc], body: bytes, param: str | None
) -> None:
    _, _, r = pair
    code, _, raw = http("POST", r.url + "/v1/completions", body, {"Content-Type": "application/json"})
    assert code == 400
    err = json.loads(raw)["error"]
    assert err["type"] == "invalid_request_error"
    assert err["message"]
    if param:
        assert err["param"] == param


def test_bad_chat_bodies_are_400(pair: tuple[Backend, Backend, RouterProc]) -> None:
    _, _, r = pair
    for body in (
        b'{"model":"fake-model"}',
        b'{"model":"fake-model","messages":[]}',
        b'{"model":"fake-model","messages":[{"content":"x"}]}',
    ):
        code, _, raw = http("POST", r.url + "/v1/chat/completions", body)
        assert code == 400, body
        assert json.loads(raw)["error"]["type"] == "invalid_request_error"


def test_body_over_limit_is_413(pair: tuple[Backend, Backend, RouterProc]) -> None:
    _, _, r = pair
    big = json.dumps({"model": "fake-model", "prompt": "x" * (2 * 1024 * 1024)}).encode()
    code, _, raw = http("POST", r.url + "/v1/completions", big)
    assert code == 413
    assert json.loads(raw)["error"]["code"] == "request_too_large"


def test_unknown_model_is_404(pair: tuple[Backend, Backend, RouterProc]) -> None:
    _, _, r = pair
    code, _, raw = http("POST", r.url + "/v1/completions", {**COMPLETION, "model": "gpt-nope"})
    assert code == 404
    assert json.loads(raw)["error"]["code"] == "model_not_found"


def test_failure_before_first_byte_is_retried_invisibly(pair: tuple[Backend, Backend, RouterProc]) -> None:
    a, b, r = pair
    a.control(mode="fail")
    for _ in range(6):
        code, headers, _ = http("POST", r.url + "/v1/completions", COMPLETION)
        assert code == 200
        assert headers["x-kvrouter-replica"] == b.url
    assert 'kvrouter_retries_total{reason="status_500"}' in r.metrics()


def test_stall_is_first_byte_timeout_then_retry(pair: tuple[Backend, Backend, RouterProc]) -> None:
    a, b, r = pair
    a.control(mode="stall")
    for _ in range(2):
        t0 = time.monotonic()
        code, headers, _ = http("POST", r.url + "/v1/completions", COMPLETION)
        assert code == 200
        assert headers["x-kvrouter-replica"] == b.url
        assert time.monotonic() - t0 < 3.0


def test_all_stalled_is_504(pair: tuple[Backend, Backend, RouterProc]) -> None:
    a, b, r = pair
    a.control(mode="stall")
    b.control(mode="stall")
    code, _, raw = http("POST", r.url + "/v1/completions", COMPLETION)
    assert code == 504
    assert json.loads(raw)["error"]["code"] == "upstream_timeout"
    # the stalled upstream requests were cancelled, not left hanging on the backends
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and a.stats()["cancelled"] + b.stats()["cancelled"] < 2:
        time.sleep(0.05)
    assert a.stats()["cancelled"] + b.stats()["cancelled"] >= 2


async def test_replica_dies_mid_stream_clean_sse_end(pair: tuple[Backend, Backend, RouterProc]) -> None:
    a, b, r = pair
    for be in (a, b):
        be.control(mode="die_mid_stream", die_after=3, chunk_delay=0.01)
    async with aiohttp.ClientSession() as s:
        async with asyncio.timeout(5):
            async with s.post(r.url + "/v1/completions", json={**COMPLETION, "stream": True}) as resp:
                assert resp.status == 200
                data = await resp.read()
    events = [e for e in data.split(b"\n\n") if e]
    assert sum(1 for e in events if b'"text"' in e) == 3  # what was sent before the death
    assert b'"error"' in events[-2]
    assert events[-1] == b"data: [DONE]"


async def test_client_disconnect_cancels_upstream(pair: tuple[Backend, Backend, RouterProc]) -> None:
    a, b, r = pair
    for be in (a, b):
        be.control(chunk_delay=0.1, chunks=50)
    before = a.stats()["cancelled"] + b.stats()["cancelled"]
    async with aiohttp.ClientSession() as s:
        resp = await s.post(r.url + "/v1/completions", json={**COMPLETION, "stream": True})
        await resp.content.readany()
        resp.close()  # hang up mid-stream
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if a.stats()["cancelled"] + b.stats()["cancelled"] > before:
            break
        await asyncio.sleep(0.05)
    assert a.stats()["cancelled"] + b.stats()["cancelled"] == before + 1


def test_passthrough_to_a_healthy_replica(pair: tuple[Backend, Backend, RouterProc]) -> None:
    _, _, r = pair
    code, headers, raw = http("POST", r.url + "/tokenize", {"model": "fake-model", "prompt": "abc"})
    assert code == 200
    assert json.loads(raw)["path"] == "/tokenize"
    assert "x-kvrouter-replica" in headers
    assert http("POST", r.url + "/v1/embeddings", {"model": "fake-model", "input": "x"})[0] == 200
    assert http("GET", r.url + "/not-an-api")[0] == 404


def test_metrics_names(pair: tuple[Backend, Backend, RouterProc]) -> None:
    _, _, r = pair
    http("POST", r.url + "/v1/completions", COMPLETION)
    text = r.metrics()
    for name in (
        "kvrouter_requests_total",
        "kvrouter_in_flight",
        "kvrouter_routing_decision_seconds_bucket",
        "kvrouter_upstream_ttfb_seconds_bucket",
        "kvrouter_replica_healthy",
        "kvrouter_index_blocks",
    ):
        assert name in text, name


def test_no_healthy_replica_is_503_with_retry_after(logs: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    r = RouterProc(logs, [dead], "--kv-events", "off", name="router-dead", wait_ready=False)
    try:
        assert http("GET", r.url + "/ready")[0] == 503
        code, headers, raw = http("POST", r.url + "/v1/completions", COMPLETION)
        assert code == 503
        assert headers["Retry-After"] == "1"
        assert json.loads(raw)["error"]["code"] == "no_replica_available"
    finally:
        r.proc.stop()


def test_refused_connection_is_retried_and_ejected(logs: Path) -> None:
    live = Backend(logs, "live")
    doomed = Backend(logs, "doomed")
    # slow probes: the router still believes `doomed` is healthy when it starts refusing
    r = RouterProc(
        logs,
        [live.url, doomed.url],
        "--kv-events",
        "off",
        "--policy",
        "round_robin",
        "--probe-interval",
        "30",
        "--eject-after",
        "2",
        name="router-refused",
    )
    try:
        doomed.proc.stop()  # the port now refuses connections
        for _ in range(6):
            code, headers, _ = http("POST", r.url + "/v1/completions", COMPLETION)
            assert code == 200
            assert headers["x-kvrouter-replica"] == live.url
        text = r.metrics()
        assert 'kvrouter_retries_total{reason="connect"} 2.0' in text  # then it was ejected
        assert 'kvrouter_ejections_total{replica="' + doomed.url + '"} 1.0' in text
    finally:
        r.proc.stop()
        live.proc.stop()


def test_routing_by_model_and_models_union(logs: Path) -> None:
    m1 = Backend(logs, "m1", model="alpha")
    m2 = Backend(logs, "m2", model="beta")
    r = RouterProc(logs, [m1.url, m2.url], "--kv-events", "off", name="router-models")
    try:
        # models are learned at admission; wait until both replicas are known
        deadline = time.monotonic() + 5
        ids: set[str] = set()
        while time.monotonic() < deadline and ids != {"alpha", "beta"}:
            ids = {m["id"] for m in json.loads(http("GET", r.url + "/v1/models")[2])["data"]}
            time.sleep(0.05)
        assert ids == {"alpha", "beta"}
        for model, url in (("alpha", m1.url), ("beta", m2.url)):
            for _ in range(3):
                code, headers, _ = http("POST", r.url + "/v1/completions", {**COMPLETION, "model": model})
                assert code == 200
                assert headers["x-kvrouter-replica"] == url
    finally:
        for p in (r.proc, m1.proc, m2.proc):
            p.stop()


def test_health_ejection_and_readmission(logs: Path) -> None:
    a = Backend(logs, "h1")
    r = RouterProc(logs, [a.url], "--kv-events", "off", "--eject-after", "2", name="router-health")
    try:
        a.control(unhealthy=True)
        wait_http(r.url + "/ready", ok=(503,), timeout=5)
        assert http("POST", r.url + "/v1/completions", COMPLETION)[0] == 503
        a.control(unhealthy=False)
        wait_http(r.url + "/ready", timeout=5)
        assert http("POST", r.url + "/v1/completions", COMPLETION)[0] == 200
        assert 'kvrouter_ejections_total{replica="' + a.url + '"} 1.0' in r.metrics()
    finally:
        r.proc.stop()
        a.proc.stop()


def test_replica_header_can_be_turned_off(logs: Path) -> None:
    a = Backend(logs, "nh")
    r = RouterProc(logs, [a.url], "--kv-events", "off", "--replica-header", "false", name="router-nohdr")
    try:
        code, headers, _ = http("POST", r.url + "/v1/completions", COMPLETION)
        assert code == 200
        assert "x-kvrouter-replica" not in {k.lower() for k in headers}
    finally:
        r.proc.stop()
        a.proc.stop()


def test_poison_request_does_not_eject_healthy_replicas(logs: Path) -> None:
    """A request that every replica answers with 500 is the request's fault: retried, then a clean
    502, and no replica is ejected however often it is sent (found by the bad-input fuzzing)."""
    a = Backend(logs, "p1")
    b = Backend(logs, "p2")
    r = RouterProc(
        logs,
        [a.url, b.url],
        "--kv-events",
        "off",
        "--eject-after",
        "2",
        "--probe-interval",
        "30",
        name="router-poison",
    )
    try:
        a.control(mode="fail")
        b.control(mode="fail")
        for _ in range(5):
            code, _, raw = http("POST", r.url + "/v1/completions", COMPLETION)
            assert code == 502
            assert json.loads(raw)["error"]["type"] == "upstream_error"
        assert "kvrouter_ejections_total{" not in r.metrics()
        a.control(mode="ok")
        b.control(mode="ok")
        assert http("POST", r.url + "/v1/completions", COMPLETION)[0] == 200
        # but a replica that fails while another serves the same request is blamed
        a.control(mode="fail")
        for _ in range(4):
            assert http("POST", r.url + "/v1/completions", COMPLETION)[0] == 200
        assert 'kvrouter_ejections_total{replica="' + a.url + '"} 1.0' in r.metrics()
    finally:
        for p in (r.proc, a.proc, b.proc):
            p.stop()


def test_http10_client_gets_a_close_delimited_stream(pair: tuple[Backend, Backend, RouterProc]) -> None:
    """Regression: forced chunked framing made every HTTP/1.0 stream (nginx's default upstream
    protocol) a 500."""
    import socket

    _, _, r = pair
    body = json.dumps({**COMPLETION, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", r.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200"), head
    assert b"chunked" not in head.lower()
    assert payload.endswith(b"data: [DONE]\n\n")


def test_method_not_allowed_keeps_allow_header(pair: tuple[Backend, Backend, RouterProc]) -> None:
    _, _, r = pair
    code, headers, raw = http("PUT", r.url + "/v1/embeddings", {"model": "fake-model", "input": "x"})
    assert code == 405
    assert "Allow" in headers
    assert json.loads(raw)["error"]["message"]
