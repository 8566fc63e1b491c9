"""Security behaviour of a real `kvrouter serve` (docs/security.md): router API keys apart from the
engines' key, hop-by-hop headers stripped both ways, debug endpoints off unless enabled and behind
the admin token, prompts out of logs unless --log-prompts, and no request can point the router at
an address it did not discover (a canary listener sees zero connections)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from router.http.proxy import request_header_lines, response_header_pairs
from tests.support.procs import Backend, http, quiet_router

COMPLETION = {"model": "fake-model", "prompt": "hello", "max_tokens": 2}


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("security")


@pytest.fixture(scope="module")
def backend(logs: Path) -> Iterator[Backend]:
    b = Backend(logs, "sec-backend")
    yield b
    b.proc.stop()


def test_router_keys_are_separate_from_the_upstream_key(logs: Path, backend: Backend) -> None:
    r = quiet_router(
        logs,
        [backend.url],
        "--api-key",
        "client-key-1",
        "--api-key",
        "client-key-2",
        "--upstream-api-key",
        "upstream-secret",
        name="r-keys",
    )
    try:
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "client-key-1"},
            {"Authorization": "Basic Y2xpZW50LWtleS0xOg=="},
        ):
            code, _, raw = http("POST", r.url + "/v1/completions", COMPLETION, headers)
            assert code == 401, headers
            assert json.loads(raw)["error"]["type"] == "authentication_error"
        assert http("GET", r.url + "/v1/models")[0] == 401
        for path in ("/health", "/metrics", "/openapi.json"):
            assert http("GET", r.url + path)[0] == 200, path
        for key in ("client-key-1", "client-key-2"):
            code, headers, raw = http(
                "POST", r.url + "/v1/completions", COMPLETION, {"Authorization": f"Bearer {key}"}
            )
            assert code == 200
            seen = backend.stats()["last_headers"]
            auth = {k.lower(): v for k, v in seen.items()}["authorization"]
            assert auth == "Bearer upstream-secret"  # the engine never sees the client's key
            assert "upstream-secret" not in json.dumps(headers) + raw.decode()
        assert "upstream-secret" not in r.proc.log(tail=None) and "client-key-1" not in r.proc.log(tail=None)
    finally:
        r.proc.stop()


def test_hop_by_hop_and_connection_listed_headers_are_stripped_towards_the_engine(
    logs: Path, backend: Backend
) -> None:
    r = quiet_router(logs, [backend.url], name="r-hop")
    try:
        sent = {
            "Connection": "keep-alive, X-Hop-Secret, x-other-hop",
            "X-Hop-Secret": "1",
            "X-Other-Hop": "2",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic eA==",
            "Proxy-Connection": "keep-alive",
            "X-End-To-End": "kept",
        }
        # raw bytes: urllib would replace our Connection header with its own "close"
        body = json.dumps(COMPLETION).encode()
        head = "".join(f"{k}: {v}\r\n" for k, v in sent.items())
        answer = _raw(
            r.port,
            (
                f"POST /v1/completions HTTP/1.1\r\nHost: x\r\n{head}Content-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body,
        )
        assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
        seen = {k.lower() for k in backend.stats()["last_headers"]}
        for h in (
            "x-hop-secret",
            "x-other-hop",
            "keep-alive",
            "te",
            "proxy-authorization",
            "proxy-connection",
        ):
            assert h not in seen, h
        assert "x-end-to-end" in seen
    finally:
        r.proc.stop()


def test_hop_by_hop_headers_are_stripped_towards_the_client() -> None:
    up = [
        (b"Content-Type", b"application/json"),
        (b"Connection", b"close, X-Engine-Internal"),
        (b"X-Engine-Internal", b"1"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Upgrade", b"h2c"),
        (b"Trailer", b"x"),
        (b"Proxy-Authenticate", b"Basic"),
        (b"X-Request-Id", b"abc"),
        (b"Server", b"engine"),
        (b"Content-Length", b"3"),
    ]
    out = {k.lower() for k, _ in response_header_pairs(up, None)}
    assert out == {b"content-type", b"x-request-id"}
    # the header a Connection line names may come before it; a plain Connection drops only itself
    early = [(b"X-Engine-Internal", b"1"), (b"X-Request-Id", b"abc"), (b"connection", b"X-Engine-Internal")]
    assert response_header_pairs(early, None) == [(b"X-Request-Id", b"abc")]
    plain = [(b"Content-Type", b"a"), (b"Connection", b"keep-alive"), (b"X-Request-Id", b"abc")]
    assert response_header_pairs(plain, None) == [(b"Content-Type", b"a"), (b"X-Request-Id", b"abc")]
    req = request_header_lines([(b"Authorization", b"Bearer client"), (b"Host", b"evil")], None).lower()
    assert b"authorization" not in req and b"host" not in req


def test_debug_endpoints_are_off_unless_enabled(logs: Path, backend: Backend) -> None:
    r = quiet_router(logs, [backend.url], name="r-nodebug")
    try:
        assert http("GET", r.url + "/debug/replicas")[0] == 404
        assert http("POST", r.url + "/debug/route", COMPLETION)[0] == 404
        assert b"/debug" not in http("GET", r.url + "/openapi.json")[2]
    finally:
        r.proc.stop()


def test_debug_endpoints_need_the_admin_token(logs: Path, backend: Backend) -> None:
    r = quiet_router(
        logs, [backend.url], "--enable-debug", "--admin-token", "adm1n", "--api-key", "ck", name="r-admin"
    )
    try:
        for headers in ({}, {"Authorization": "Bearer ck"}, {"Authorization": "Bearer wrong"}):
            code, _, raw = http("GET", r.url + "/debug/replicas", headers=headers)
            assert code == 403 and json.loads(raw)["error"]["type"] == "permission_error"
        assert http("GET", r.url + "/debug/replicas", headers={"Authorization": "Bearer adm1n"})[0] == 200
        assert http("POST", r.url + "/debug/route", COMPLETION, {"Authorization": "Bearer adm1n"})[0] == 200
    finally:
        r.proc.stop()


@pytest.mark.parametrize("log_prompts", [False, True])
def test_prompts_stay_out_of_debug_logs_unless_asked(logs: Path, backend: Backend, log_prompts: bool) -> None:
    extra = ("--log-prompts",) if log_prompts else ()
    r = quiet_router(logs, [backend.url], "--log-level", "debug", *extra, name=f"r-log-{log_prompts}")
    canary = f"CANARY-PROMPT-{time.monotonic_ns()}"
    try:
        http("POST", r.url + "/v1/completions", {**COMPLETION, "prompt": f"say {canary}"})
        http(
            "POST",
            r.url + "/v1/chat/completions",
            {"model": "fake-model", "messages": [{"role": "user", "content": canary}], "stream": True},
        )
        http("POST", r.url + "/v1/completions", {**COMPLETION, "prompt": canary, "max_tokens": "bad"})  # 400
        time.sleep(0.2)
    finally:
        r.proc.stop()
    assert "DEBUG" in r.proc.log(tail=None)  # debug logging was on
    assert (canary in r.proc.log(tail=None)) is log_prompts


class Canary:
    """A listener the router must never connect to: counts accepted connections."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
                self.accepted += 1
                conn.close()
            except TimeoutError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._t.join(2)
        self.sock.close()


def _raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        out = b""
        s.settimeout(5)
        while b"\r\n\r\n" not in out:
            chunk = s.recv(4096)
            if not chunk:
                break
            out += chunk
    return out


def test_requests_cannot_point_the_router_at_another_address(logs: Path, backend: Backend) -> None:
    canary = Canary()
    r = quiet_router(logs, [backend.url], name="r-ssrf")
    evil = f"127.0.0.1:{canary.port}"
    body = json.dumps(COMPLETION).encode()
    post = (
        b"Content-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\nConnection: close\r\n\r\n"
        + body
    )
    get_tail = b"Connection: close\r\n\r\n"
    try:
        attempts = [
            f"POST http://{evil}/v1/completions HTTP/1.1\r\nHost: {evil}\r\n".encode() + post,
            f"GET http://{evil}/v1/models HTTP/1.1\r\nHost: {evil}\r\n".encode() + get_tail,
            f"POST /v1/completions HTTP/1.1\r\nHost: {evil}\r\nX-Forwarded-Host: {evil}\r\n"
            f"X-Forwarded-Proto: http\r\nForwarded: host={evil}\r\nX-Real-IP: 127.0.0.1\r\n".encode()
            + post,
            f"GET //{evil}/v1/models HTTP/1.1\r\nHost: x\r\n".encode() + get_tail,
            f"GET /v1//{evil}/models HTTP/1.1\r\nHost: x\r\n".encode() + get_tail,
            f"GET /v1/../..//{evil}/x HTTP/1.1\r\nHost: x\r\n".encode() + get_tail,
            f"GET /v1/%2e%2e/%2e%2e/{evil}/x HTTP/1.1\r\nHost: x\r\n".encode() + get_tail,
            f"GET /v1/@{evil}/x HTTP/1.1\r\nHost: x\r\n".encode() + get_tail,
            f"GET /v1/models%40{evil} HTTP/1.1\r\nHost: x\r\n".encode() + get_tail,
            f"GET /tokenize/..%2F..%2F@{evil} HTTP/1.1\r\nHost: x\r\n".encode() + get_tail,
            b"CONNECT " + evil.encode() + b" HTTP/1.1\r\nHost: " + evil.encode() + b"\r\n\r\n",
        ]
        for data in attempts:
            answer = _raw(r.port, data)
            assert answer.startswith(b"HTTP/1.1 "), (data[:60], answer[:80])
        for model in (f"http://{evil}/v1", evil, f"//{evil}"):
            code, _, raw = http("POST", r.url + "/v1/completions", {**COMPLETION, "model": model})
            assert code == 404 and json.loads(raw)["error"]["code"] == "model_not_found"
            code, _, _ = http("POST", r.url + "/v1/embeddings", {"model": model, "input": "x"})
        time.sleep(0.3)
        assert canary.accepted == 0
        assert r.proc.alive()
    finally:
        r.proc.stop()
        canary.close()
