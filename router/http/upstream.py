"""Upstream HTTP/1.1 client: keep-alive connection pools per replica on raw asyncio protocols.

Why not ``aiohttp.ClientSession`` on the request path: per request it builds a ClientRequest, a
ClientResponse, multidicts, a StreamReader, a timer context and several tasks; at concurrency 32
that was a third of the router's CPU (bench-proxy profile). The proxy needs much less: write one
pre-built request head, parse the response with ``httptools`` (llhttp, the parser aiohttp and
uvicorn use), hand body bytes to the relay as they arrive, and keep the connection for the next
request. Health probes and scrapes still use aiohttp (not the hot path).

Contract the proxy relies on:

* ``request()`` returns once the status line and headers are in; timeouts are the caller's
  (``asyncio.timeout`` around it), and a cancelled request closes its connection, so the engine
  sees the disconnect and aborts the generation.
* ``read()`` returns body bytes with the transfer framing removed, ``b""`` at the end of the
  message, and raises ``UpstreamBroken`` if the connection ends mid-body.
* A kept-alive connection that the engine closed while idle is retried once on a new connection
  (before any byte was read), so a keep-alive race never looks like a replica failure.
* Backpressure: past ``HIGH_WATER`` buffered bytes the socket stops being read until the relay
  catches up, so a slow client cannot make the router buffer a whole response.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools
from mypy_extensions import mypyc_attr

from router.http.coalesce import Coalesced, write_batch

HIGH_WATER = 256 * 1024


@mypyc_attr(native_class=False)  # a built-in base: a plain class when compiled (setup.py)
class UpstreamBroken(ConnectionError):
    """The upstream connection failed or closed before the response was complete."""


@mypyc_attr(native_class=False)
class UpstreamConnectError(UpstreamBroken):
    """No connection could be opened to the replica."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a replica listens: parsed once from its URL."""

    host: str
    port: int
    tls: bool
    prefix: bytes  # path prefix of the replica URL (b"" for most)
    host_header: bytes

    @classmethod
    def parse(cls, url: str) -> Origin:
        parts = urlsplit(url)
        tls = parts.scheme == "https"
        host = parts.hostname or "127.0.0.1"
        port = parts.port or (443 if tls else 80)
        return cls(host, port, tls, parts.path.rstrip("/").encode(), parts.netloc.encode("idna"))


class UpstreamResponse:
    """One response on one pooled connection. ``close()`` releases it (to the pool if the
    message was read to the end and the engine keeps the connection alive)."""

    __slots__ = ("_conn", "content_length", "content_type", "headers", "reason", "status")

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self.status = conn.status
        self.reason = conn.reason
        self.headers = conn.headers
        self.content_type = b""
        self.content_length: int | None = None
        for name, value in conn.headers:
            low = name.lower()
            if low == b"content-type":
                self.content_type = value.lower()
            elif low == b"content-length" and value.isdigit():
                self.content_length = int(value)

    async def read(self) -> bytes:
        return await self._conn.read_body()

    def at_eof(self) -> bool:
        conn = self._conn
        return conn.complete and not conn.body

    def close(self) -> None:
        self._conn.finish()


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; one request at a time."""

    def __init__(self, pool: UpstreamPool, key: Origin) -> None:
        self.pool = pool
        self.key = key
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.out: Coalesced | None = None  # the request, sent at the end of the loop pass (coalesce.py)
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.busy = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.complete = False
        self.keep_alive = False
        self.got_bytes = False
        self.error: BaseException | None = None
        self.head_waiter: asyncio.Future[None] | None = None
        self.body_waiter: asyncio.Future[None] | None = None
        self.paused = False

    # ---- asyncio.Protocol ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.out = Coalesced(write_batch(self.loop), self.transport)  # type: ignore[arg-type]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if not self.busy or self.complete:
            self._fail(UpstreamBroken("unexpected bytes from the replica"))  # no request is waiting
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamBroken(f"malformed response from the replica: {exc}"))

    def eof_received(self) -> bool | None:
        return False  # close; connection_lost settles the message

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.busy:
            self.pool._forget(self)
        elif not self.complete:
            self._fail(UpstreamBroken("the replica closed the connection mid-response"), close=False)

    # ---- httptools callbacks ----

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if self.status < 200:  # 1xx interim answers: the real head follows
            self.headers = []
            self.reason = b""
            return
        # Asked here: llhttp resets its state once the message is complete.
        self.keep_alive = self.parser.should_keep_alive()
        waiter = self.head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake_body()

    def on_message_complete(self) -> None:
        if self.status < 200:
            return
        self.complete = True
        self._wake_body()

    # ---- request side ----

    def send(self, data: bytes) -> asyncio.Future[None]:
        assert self.out is not None
        self._reset()
        self.busy = True
        self.head_waiter = self.loop.create_future()
        self.out.queue(data)
        return self.head_waiter

    async def read_body(self) -> bytes:
        while True:
            if self.body:
                # Pieces that arrived together (one read from the socket) go out as one write.
                chunk = self.body.popleft() if len(self.body) == 1 else b"".join(self.body)
                self.body.clear()
                self.buffered = 0
                if self.paused and self.transport is not None:
                    self.paused = False
                    self.transport.resume_reading()
                return chunk
            if self.complete:
                return b""
            if self.error is not None:
                raise self.error
            self.body_waiter = self.loop.create_future()
            try:
                await self.body_waiter
            finally:
                self.body_waiter = None

    def finish(self) -> None:
        """Release after a response: back to the pool when it was read to the end on a
        connection both sides keep alive; otherwise closed (the engine aborts the request)."""
        reusable = (
            self.busy
            and self.complete
            and not self.body
            and self.error is None
            and not self.closed
            and self.keep_alive
        )
        self.busy = False
        if reusable:
            self.pool._release(self)
        else:
            self.close()

    def close(self) -> None:
        self.closed = True
        if self.out is not None:
            self.out.discard()  # a request given up before it left: the engine never sees it
        if self.transport is not None:
            self.transport.close()

    def _fail(self, exc: BaseException, close: bool = True) -> None:
        self.error = exc
        if self.head_waiter is not None and not self.head_waiter.done():
            self.head_waiter.set_exception(exc)
            self.head_waiter.exception()  # retrieved: the caller may already have given up
        self._wake_body()
        if close:
            self.close()

    def _wake_body(self) -> None:
        waiter = self.body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class UpstreamPool:
    """Keep-alive connections per replica origin. Idle connections older than
    ``keepalive_s`` are dropped on the next acquire (the engine may have closed them)."""

    def __init__(
        self, *, connect_timeout_s: float, max_idle_per_origin: int = 512, keepalive_s: float = 30.0
    ) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.max_idle = max_idle_per_origin
        self.keepalive_s = keepalive_s
        self._idle: dict[Origin, collections.deque[_Connection]] = {}
        self._origins: dict[str, Origin] = {}
        self._ssl: ssl.SSLContext | None = None

    def origin(self, url: str) -> Origin:
        key = self._origins.get(url)
        if key is None:
            key = self._origins[url] = Origin.parse(url)
        return key

    async def request(
        self, url: str, method: str, target: bytes, headers: bytes, body: bytes
    ) -> UpstreamResponse:
        """Send ``method target`` to the replica at ``url``; ``headers`` is pre-encoded
        ``Name: value\\r\\n`` lines without Host and Content-Length."""
        key = self.origin(url)
        head = b"%s %s%s HTTP/1.1\r\nHost: %s\r\n%s" % (
            method.encode(),
            key.prefix,
            target,
            key.host_header,
            headers,
        )
        if body or method not in ("GET", "HEAD"):
            head += b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        else:
            head += b"\r\n"
        while True:
            conn, reused = self._take(key)
            if conn is None:
                conn = await self._connect(key)
            try:
                await conn.send(head)
            except UpstreamBroken:
                if reused and not conn.got_bytes:
                    continue  # the engine closed an idle keep-alive connection: use a fresh one
                raise
            except BaseException:
                conn.close()  # timeout or client gone: the engine must see the disconnect
                raise
            return UpstreamResponse(conn)

    def _take(self, key: Origin) -> tuple[_Connection | None, bool]:
        idle = self._idle.get(key)
        if idle:
            deadline = time.monotonic() - self.keepalive_s
            while idle:
                conn = idle.pop()  # most recently used first: the warmest connection
                if not conn.closed and conn.idle_since >= deadline:
                    return conn, True
                conn.close()
        return None, False

    async def _connect(self, key: Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        ctx: ssl.SSLContext | None = None
        if key.tls:
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            ctx = self._ssl
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, key), key.host, key.port, ssl=ctx
                )
        except TimeoutError:
            raise UpstreamConnectError(f"connect to {key.host}:{key.port} timed out") from None
        except OSError as exc:
            raise UpstreamConnectError(f"connect to {key.host}:{key.port} failed: {exc}") from None
        return conn

    def _release(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.key, collections.deque())
        if len(idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)

    def _forget(self, conn: _Connection) -> None:
        idle = self._idle.get(conn.key)
        if idle is not None:
            try:
                idle.remove(conn)
            except ValueError:
                pass
            if not idle:
                del self._idle[conn.key]

    def idle_connections(self) -> int:
        return sum(1 for q in self._idle.values() for c in q if not c.closed)

    def close(self) -> None:
        for q in self._idle.values():
            for conn in q:
                conn.close()
        self._idle.clear()
