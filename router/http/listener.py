"""The router's listening socket: an accept loop that takes every pending connection per wake-up.

Why not ``loop.create_server``: libuv (under uvloop) accepts *one* connection per event-loop
iteration (``uv__server_io`` returns after a single ``accept``; libuv dropped the accept loop for
multi-process fairness). On a saturated loop an iteration lasts tens of milliseconds, so a burst of
256 new connections (a client pool reconnecting, a load balancer failing over, ``wrk -c256``)
waited up to 2.3 s in the kernel's accept queue while already-accepted connections were served:
that was the c=256 p99 tail in docs/benchmarks.md. Here the listening socket is watched with
``add_reader`` and drained up to ``batch`` connections per wake-up, the way CPython's asyncio
does, then each socket is handed to the loop's transport (``connect_accepted_socket``), so uvloop
still does all per-byte I/O.

It also enforces ``--max-connections``: beyond the cap a connection is answered with a canned 503
and closed, so an idle-connection flood costs a socket for at most a second each, not a handler,
a parser and buffers that live until the keep-alive timeout.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import socket
from collections.abc import Callable
from typing import cast

from aiohttp import web

from router.errors import TooManyConnections
from router.http.client_limits import ClientTable

log = logging.getLogger(__name__)

# Resource exhaustion on accept: back off instead of spinning on a readable listener.
_RETRY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_ACCEPT_RETRY_DELAY_S = 1.0

_REFUSAL = TooManyConnections(
    "The router has too many open connections; retry later.", retry_after=1
).http_response(close=True)


class _Counted(asyncio.Protocol):
    """Delegates to aiohttp's RequestHandler and counts it until its connection is lost; exact,
    where aiohttp's own ``Server.connections`` lags behind a burst of accepts."""

    __slots__ = ("inner", "site")

    def __init__(self, inner: asyncio.Protocol, site: ListenerSite) -> None:
        self.inner = inner
        self.site = site
        site.open += 1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.site.open -= 1
        self.inner.connection_lost(exc)


class _PerClient(_Counted):
    """Also counted against its client address (``--max-connections-per-client``)."""

    __slots__ = ("addr", "table")

    def __init__(self, inner: asyncio.Protocol, site: ListenerSite, table: ClientTable, addr: str) -> None:
        super().__init__(inner, site)
        self.table = table
        self.addr = addr

    def connection_lost(self, exc: Exception | None) -> None:
        self.table.disconnect(self.addr)
        super().connection_lost(exc)


class _Refuse(asyncio.Protocol):
    """A connection over the cap: a canned 503, then close. The client's request bytes are read and
    dropped until it closes (or 1 s), because closing with unread input makes the kernel send RST,
    which can destroy the 503 before the client reads it."""

    def __init__(self) -> None:
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        transport.write(_REFUSAL)
        if transport.can_write_eof():
            transport.write_eof()
        self._timer = asyncio.get_running_loop().call_later(1.0, transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()


class _AcceptServer(asyncio.AbstractServer):
    """What aiohttp's runner expects of ``site._server`` (``sockets``, ``close()``); the rest of
    the server interface for completeness. Connections already accepted are aiohttp's to close."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self.sock = sock
        self.loop = loop
        self.serving = True
        self._closed = asyncio.Event()

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return (self.sock,) if self.serving else ()

    def close(self) -> None:
        if self.serving:
            self.serving = False
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self._closed.set()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self.loop

    def is_serving(self) -> bool:
        return self.serving

    async def start_serving(self) -> None:
        pass  # serving starts with the site

    async def serve_forever(self) -> None:
        await self._closed.wait()

    async def wait_closed(self) -> None:
        await self._closed.wait()


class ListenerSite(web.BaseSite):
    """Serves the runner's aiohttp handler on ``sock`` with an accept loop of its own.

    ``max_connections`` > 0 caps open client connections (``on_refuse`` is called for each one
    turned away). ``protocol_factory`` replaces the runner's handler factory (the generate fast
    path, which hands other requests to aiohttp itself). ``batch`` bounds the accepts per wake-up so a connection storm cannot hold the
    loop for long either."""

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        *,
        max_connections: int = 0,
        on_refuse: Callable[[], None] | None = None,
        protocol_factory: Callable[[], asyncio.Protocol] | None = None,
        batch: int = 128,
        clients: ClientTable | None = None,
    ) -> None:
        super().__init__(runner)
        sock.setblocking(False)
        self._sock = sock
        self.limit = max_connections
        self.open = 0
        self._on_refuse = on_refuse
        self._batch = batch
        self._protocol_factory = protocol_factory
        self._clients = clients
        self._tasks: set[asyncio.Task[object]] = set()
        host, port = sock.getsockname()[:2]
        self._name = f"http://{host}:{port}"

    @property
    def name(self) -> str:
        return self._name

    async def start(self) -> None:
        await super().start()  # registers with the runner
        loop = asyncio.get_running_loop()
        self._server = server = _AcceptServer(self._sock, loop)
        loop.add_reader(self._sock.fileno(), self._accept_ready, server)

    def _factory(self, addr: str = "") -> asyncio.Protocol:
        handler = self._protocol_factory or self._runner.server
        assert handler is not None
        clients = self._clients
        if self.limit <= 0 and clients is None:
            return handler()
        if (self.limit > 0 and self.open >= self.limit) or (
            clients is not None and not clients.connect(addr)
        ):
            if self._on_refuse is not None:
                self._on_refuse()
            return _Refuse()
        if clients is not None:
            return _PerClient(handler(), self, clients, addr)
        return _Counted(handler(), self)

    def _accept_ready(self, server: _AcceptServer) -> None:
        loop = server.loop
        for _ in range(self._batch):
            try:
                conn, addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the peer gave up while queued: nothing to serve
            except OSError as exc:
                if exc.errno not in _RETRY_ERRNOS:
                    raise
                # Out of descriptors or buffers: stop watching for a while, as asyncio does,
                # instead of waking on a listener that stays readable.
                log.warning("accept failed (%s); pausing accepts for %.1fs", exc, _ACCEPT_RETRY_DELAY_S)
                loop.remove_reader(self._sock.fileno())
                loop.call_later(_ACCEPT_RETRY_DELAY_S, self._resume, server)
                return
            conn.setblocking(False)
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # The factory runs when the task starts: the cap is checked against connections
            # counted so far, one at a time.
            if self._clients is not None:
                ip = str(addr[0]) if isinstance(addr, tuple) and addr else "?"
                factory: Callable[[], asyncio.Protocol] = functools.partial(self._factory, ip)
            else:
                factory = self._factory
            task: asyncio.Task[object] = loop.create_task(loop.connect_accepted_socket(factory, conn))
            self._tasks.add(task)
            task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[object]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.debug("could not set up an accepted connection: %r", exc)

    def _resume(self, server: _AcceptServer) -> None:
        if server.serving:
            server.loop.add_reader(self._sock.fileno(), self._accept_ready, server)


def listening_socket(host: str, port: int, *, reuse_port: bool, backlog: int = 1024) -> socket.socket:
    """A bound, listening TCP socket (IPv4 or IPv6 by the host's form)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=backlog, reuse_port=reuse_port)
