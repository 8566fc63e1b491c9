"""router/http/upstream.py against an in-process raw HTTP/1.1 server on loopback: framing, keep-alive
reuse, the idle-close race, mid-body failures."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable

import pytest

from router.http.upstream import UpstreamBroken, UpstreamConnectError, UpstreamPool

Answer = Callable[[bytes], list[bytes] | None]  # request head+body -> writes (None: close at once)


class Server:
    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.transports: list[asyncio.Transport] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        server = self

        class P(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.t = transport
                self.buf = b""
                server.connections += 1
                server.transports.append(transport)  # type: ignore[arg-type]

            def data_received(self, data: bytes) -> None:
                self.buf += data
                head, sep, rest = self.buf.partition(b"\r\n\r\n")
                if not sep:
                    return
                n = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        n = int(line.split(b":")[1])
                if len(rest) < n:
                    return
                self.buf = rest[n:]
                server.requests.append(head + b"\r\n\r\n" + rest[:n])
                writes = server.answer(head)
                if writes is None:
                    self.t.close()
                    return
                for w in writes:
                    self.t.write(w)  # type: ignore[attr-defined]

        self._server = await asyncio.get_running_loop().create_server(P, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for t in self.transports:
            t.close()


def _json(body: bytes, extra: bytes = b"") -> list[bytes]:
    return [
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s"
        % (extra, len(body), body)
    ]


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    p = UpstreamPool(connect_timeout_s=2.0)
    yield p
    p.close()


async def _get(pool: UpstreamPool, url: str, body: bytes = b"{}") -> tuple[int, bytes]:
    resp = await pool.request(url, "POST", b"/v1/completions", b"Content-Type: application/json\r\n", body)
    out = b""
    while chunk := await resp.read():
        out += chunk
    resp.close()
    return resp.status, out


async def test_keep_alive_reuses_one_connection_and_sends_a_well_formed_request(pool: UpstreamPool) -> None:
    srv = Server(lambda head: _json(b'{"ok":1}'))
    await srv.start()
    try:
        for _ in range(3):
            assert await _get(pool, srv.url, b'{"a":1}') == (200, b'{"ok":1}')
        assert srv.connections == 1
        first = srv.requests[0]
        assert first.startswith(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % srv.port)
        assert b'Content-Length: 7\r\n\r\n{"a":1}' in first
    finally:
        await srv.close()


async def test_chunked_body_comes_out_decoded_piece_by_piece(pool: UpstreamPool) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    srv = Server(lambda h: [head, b"5\r\nhello\r\n", b"6\r\n world\r\n", b"0\r\n\r\n"])
    await srv.start()
    try:
        resp = await pool.request(srv.url, "POST", b"/v1/completions", b"", b"{}")
        assert resp.content_type == b"text/event-stream" and resp.content_length is None
        got = b""
        while chunk := await resp.read():
            got += chunk
        assert got == b"hello world" and resp.at_eof()
        resp.close()
        assert pool.idle_connections() == 1
    finally:
        await srv.close()


async def test_an_idle_connection_the_engine_closed_is_replaced_transparently(pool: UpstreamPool) -> None:
    srv = Server(lambda head: _json(b"{}"))
    await srv.start()
    try:
        assert (await _get(pool, srv.url))[0] == 200
        for t in srv.transports:
            t.close()  # the engine's keep-alive timeout fired
        await asyncio.sleep(0.05)
        assert (await _get(pool, srv.url))[0] == 200
        assert srv.connections == 2
    finally:
        await srv.close()


async def test_connection_close_is_not_reused(pool: UpstreamPool) -> None:
    srv = Server(lambda head: _json(b"{}", b"Connection: close\r\n"))
    await srv.start()
    try:
        await _get(pool, srv.url)
        await _get(pool, srv.url)
        assert srv.connections == 2 and pool.idle_connections() == 0
    finally:
        await srv.close()


async def test_a_body_cut_short_raises_and_the_connection_is_dropped(pool: UpstreamPool) -> None:
    def answer(head: bytes) -> list[bytes]:
        return [b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial"]

    srv = Server(answer)
    await srv.start()
    try:
        resp = await pool.request(srv.url, "POST", b"/x", b"", b"")
        assert await resp.read() == b"partial"
        for t in srv.transports:
            t.close()
        with pytest.raises(UpstreamBroken):
            await resp.read()
        resp.close()
        assert pool.idle_connections() == 0
    finally:
        await srv.close()


async def test_no_answer_at_all_is_upstream_broken(pool: UpstreamPool) -> None:
    srv = Server(lambda head: None)  # closes without a byte
    await srv.start()
    try:
        with pytest.raises(UpstreamBroken):
            await _get(pool, srv.url)
    finally:
        await srv.close()


async def test_refused_connection_is_a_connect_error(pool: UpstreamPool) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(UpstreamConnectError):
        await _get(pool, f"http://127.0.0.1:{port}")


async def test_a_slow_reader_pauses_the_socket_instead_of_buffering_everything(pool: UpstreamPool) -> None:
    big = b"x" * (4 * 1024 * 1024)
    srv = Server(lambda head: [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big), big])
    await srv.start()
    try:
        resp = await pool.request(srv.url, "POST", b"/x", b"", b"")
        await asyncio.sleep(0.2)  # let the engine write as much as it can
        conn = resp._conn
        assert conn.paused and conn.buffered < len(big)
        got = 0
        while chunk := await resp.read():
            got += len(chunk)
        assert got == len(big)
        resp.close()
    finally:
        await srv.close()
