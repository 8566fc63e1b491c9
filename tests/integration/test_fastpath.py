"""The raw HTTP/1.1 generate fast path (router/http/fastpath.py) over real sockets: a `kvrouter serve`
subprocess in front of a fake OpenAI backend. Which server answered is visible in the response:
aiohttp adds a ``Server`` header, the fast path does not."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import Backend, RouterProc

BODY = json.dumps({"model": "fake-model", "prompt": "hello there", "max_tokens": 4}).encode()


def _post(path: str = "/v1/completions", body: bytes = BODY, extra: bytes = b"") -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s"
        % (path.encode(), extra, len(body), body)
    )


class Conn:
    """One keep-alive client connection that reads whole HTTP/1.1 responses."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            assert self._fill(), "connection closed before a response head"
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        if "content-length" in headers:
            n = int(headers["content-length"])
            while len(self.buf) < n:
                assert self._fill()
            body, self.buf = self.buf[:n], self.buf[n:]
            return status, headers, body
        assert headers.get("transfer-encoding") == "chunked"
        body = b""
        while True:
            while b"\r\n" not in self.buf:
                assert self._fill()
            size_line, _, self.buf = self.buf.partition(b"\r\n")
            size = int(size_line, 16)
            while len(self.buf) < size + 2:
                assert self._fill()
            body += self.buf[:size]
            self.buf = self.buf[size + 2 :]
            if size == 0:
                return status, headers, body

    def closed_by_peer(self) -> bool:
        self.sock.settimeout(5)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Backend, RouterProc, RouterProc]]:
    logs: Path = tmp_path_factory.mktemp("fastpath")
    be = Backend(logs, "be")
    common = (
        "--kv-events",
        "off",
        "--scrape-metrics",
        "false",
        "--max-body-bytes",
        "4096",
        "--api-key",
        "k1",
    )
    fast = RouterProc(logs, [be.url], *common, name="fast")
    slow = RouterProc(logs, [be.url], *common, "--fast-path", "false", name="nofast")
    yield be, fast, slow
    for p in (fast.proc, slow.proc, be.proc):
        p.stop()


AUTH = b"Authorization: Bearer k1\r\n"


def test_generate_is_served_by_the_fast_path_and_other_requests_by_aiohttp(
    fleet: tuple[Backend, RouterProc, RouterProc],
) -> None:
    be, fast, slow = fleet
    c = Conn(fast.url)
    try:
        c.send(_post(extra=AUTH))
        status, headers, body = c.response()
        assert status == 200 and "server" not in headers  # fast path
        assert headers["x-kvrouter-replica"] == be.url
        assert json.loads(body)["choices"][0]["text"].startswith("t0")
        # Same connection: a GET hands it to aiohttp, which then serves everything on it.
        c.send(b"GET /v1/models HTTP/1.1\r\nHost: r\r\n" + AUTH + b"\r\n")
        status, headers, body = c.response()
        assert status == 200 and "aiohttp" in headers["server"]
        assert json.loads(body)["data"][0]["id"] == "fake-model"
        c.send(_post(extra=AUTH))
        status, headers, _ = c.response()
        assert status == 200 and "aiohttp" in headers["server"]
    finally:
        c.close()
    c = Conn(slow.url)
    try:
        c.send(_post(extra=AUTH))
        status, headers, _ = c.response()
        assert status == 200 and "aiohttp" in headers["server"]  # --fast-path false
    finally:
        c.close()


def test_the_client_headers_reach_the_engine_minus_hop_by_hop_and_auth(
    fleet: tuple[Backend, RouterProc, RouterProc],
) -> None:
    be, fast, _ = fleet
    c = Conn(fast.url)
    try:
        c.send(_post(extra=AUTH + b"X-Trace: t-1\r\nConnection: keep-alive, X-Hop\r\nX-Hop: secret\r\n"))
        assert c.response()[0] == 200
    finally:
        c.close()
    seen = {k.lower(): v for k, v in be.stats()["last_headers"].items()}
    assert seen["x-trace"] == "t-1"
    assert "x-hop" not in seen and "authorization" not in seen
    assert seen["content-length"] == str(len(BODY))


def test_streaming_pipelining_and_a_byte_at_a_time(fleet: tuple[Backend, RouterProc, RouterProc]) -> None:
    _, fast, _ = fleet
    stream = json.dumps({"model": "fake-model", "prompt": "x", "max_tokens": 4, "stream": True}).encode()
    c = Conn(fast.url)
    try:
        # Two requests in one write: answered in order on the same connection.
        c.send(_post(extra=AUTH) + _post(body=stream, extra=AUTH))
        s1, h1, b1 = c.response()
        s2, h2, b2 = c.response()
        assert (s1, s2) == (200, 200) and "server" not in h1 and "server" not in h2
        assert json.loads(b1)["object"] == "text_completion"
        assert h2["content-type"].startswith("text/event-stream") and b2.endswith(b"data: [DONE]\n\n")
        # A request trickling in byte by byte.
        for byte in _post(extra=AUTH):
            c.send(bytes([byte]))
        assert c.response()[0] == 200
    finally:
        c.close()


def test_errors_are_openai_json_with_the_right_status(fleet: tuple[Backend, RouterProc, RouterProc]) -> None:
    _, fast, _ = fleet
    c = Conn(fast.url)
    try:
        c.send(_post())  # no API key
        status, headers, body = c.response()
        assert status == 401 and "server" not in headers
        assert json.loads(body)["error"]["type"]
        c.send(_post(body=b'{"model": "fake-model"}', extra=AUTH))  # keep-alive after an error
        status, _, body = c.response()
        assert status == 400 and json.loads(body)["error"]["param"] == "prompt"
        c.send(_post(body=b'{"model": "nope", "prompt": "x"}', extra=AUTH))
        status, _, body = c.response()
        assert status == 404 and json.loads(body)["error"]["code"] == "model_not_found"
        c.send(_post(body=b"x" * 5000, extra=AUTH))  # over --max-body-bytes 4096
        status, headers, body = c.response()
        assert status == 413 and headers["connection"] == "close"
        assert json.loads(body)["error"]
        assert c.closed_by_peer()
    finally:
        c.close()


def test_smuggling_shapes_go_to_aiohttp_and_reach_the_engine_at_most_once(
    fleet: tuple[Backend, RouterProc, RouterProc],
) -> None:
    be, fast, _ = fleet
    before = be.stats()["requests"]
    smuggled = _post(extra=AUTH)
    c = Conn(fast.url)
    try:
        # Content-Length and Transfer-Encoding together: the fast path does not judge it.
        c.send(
            b"POST /v1/completions HTTP/1.1\r\nHost: r\r\n" + AUTH + b"Content-Length: %d\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n%s" % (len(smuggled) + 5, smuggled)
        )
        status, headers, _ = c.response()
        assert status == 400 and "aiohttp" in headers.get("server", "")
    finally:
        c.close()
    time.sleep(0.2)
    assert be.stats()["requests"] == before


def test_client_gone_mid_request_cancels_the_upstream(fleet: tuple[Backend, RouterProc, RouterProc]) -> None:
    be, fast, _ = fleet
    be.control(chunk_delay=0.2, chunks=20)
    try:
        before = be.stats()["cancelled"]
        stream = json.dumps({"model": "fake-model", "prompt": "x", "max_tokens": 20, "stream": True}).encode()
        c = Conn(fast.url)
        c.send(_post(body=stream, extra=AUTH))
        while b"data:" not in c.buf:
            assert c._fill()
        c.close()
        deadline = time.monotonic() + 5
        while be.stats()["cancelled"] == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert be.stats()["cancelled"] == before + 1
    finally:
        be.control(mode="ok", chunk_delay=0.0, chunks=16)
