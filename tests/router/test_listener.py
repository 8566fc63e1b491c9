"""router/http/listener.py: one wake-up drains the accept queue; the cap turns extra connections away
with a JSON 503; descriptor exhaustion pauses accepting instead of spinning."""

from __future__ import annotations

import asyncio
import errno
import json
import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from router.http import listener
from router.http.listener import ListenerSite, listening_socket


async def _ok(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


@pytest.fixture
async def runner() -> AsyncIterator[web.AppRunner]:
    app = web.Application()
    app.router.add_get("/", _ok)
    r = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await r.setup()
    yield r
    await r.cleanup()


def _connect_all(port: int, n: int) -> list[socket.socket]:
    # Blocking connects complete in the kernel (the listener's backlog), before any accept().
    return [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_one_wakeup_accepts_every_queued_connection(runner: web.AppRunner) -> None:
    sock = listening_socket("127.0.0.1", 0, reuse_port=False)
    site = ListenerSite(runner, sock, max_connections=1000)
    port = sock.getsockname()[1]
    await site.start()
    loop = asyncio.get_running_loop()
    loop.remove_reader(sock.fileno())  # drive the accept loop by hand: exactly one wake-up
    clients = _connect_all(port, 60)
    try:
        assert site._server is not None
        site._accept_ready(site._server)  # type: ignore[arg-type]
        await _settle()
        # libuv would have taken one connection here; the router takes the whole queue.
        assert site.open == 60
    finally:
        for c in clients:
            c.close()
        await site.stop()


async def test_connections_over_the_cap_get_a_json_503(runner: web.AppRunner) -> None:
    refused: list[int] = []
    sock = listening_socket("127.0.0.1", 0, reuse_port=False)
    site = ListenerSite(runner, sock, max_connections=3, on_refuse=lambda: refused.append(1))
    port = sock.getsockname()[1]
    await site.start()
    try:
        kept = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        await _settle()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        raw = await asyncio.wait_for(reader.read(), 5)
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503")
        assert b"Retry-After: 1" in head
        assert json.loads(body)["error"]["code"] == "too_many_connections"
        assert refused == [1] and site.open == 3
        # The kept connections are served normally.
        r0, w0 = kept[0]
        w0.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await asyncio.wait_for(r0.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 200")
        for _, w in [*kept, (reader, writer)]:
            w.close()
    finally:
        await site.stop()


async def test_descriptor_exhaustion_pauses_then_resumes(
    runner: web.AppRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(listener, "_ACCEPT_RETRY_DELAY_S", 0.05)
    sock = listening_socket("127.0.0.1", 0, reuse_port=False)
    site = ListenerSite(runner, sock)
    port = sock.getsockname()[1]
    failures = 1

    class Exhausted:
        """The listening socket, except that the first accept() fails with EMFILE."""

        def accept(self) -> tuple[socket.socket, object]:
            nonlocal failures
            if failures:
                failures -= 1
                raise OSError(errno.EMFILE, "Too many open files")
            return sock.accept()

        def __getattr__(self, name: str) -> object:
            return getattr(sock, name)

    site._sock = Exhausted()  # type: ignore[assignment]
    await site.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")  # served once the pause ended
        assert failures == 0
        writer.close()
    finally:
        await site.stop()


async def test_stop_closes_the_listener(runner: web.AppRunner) -> None:
    sock = listening_socket("127.0.0.1", 0, reuse_port=False)
    site = ListenerSite(runner, sock)
    port = sock.getsockname()[1]
    await site.start()
    assert runner.addresses and runner.addresses[0][1] == port
    await site.stop()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)
