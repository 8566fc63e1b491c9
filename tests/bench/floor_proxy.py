"""The least a Python reverse proxy on uvloop costs per request: a yardstick for bench_proxy.py.

``bench_proxy.py --floor`` runs this next to kvrouter and the peers, as ``python-floor``. It relays
bytes and nothing else: asyncio protocols and callbacks only (no coroutine per request), httptools
(llhttp, the parser kvrouter's upstream pool uses) to find where each request and each response
ends, round robin over the backends, one pooled keep-alive connection per request in flight. No
validation, routing, retries, timeouts, header rewriting or metrics, and no pipelining (the load
generators never pipeline). What kvrouter costs above this row is its own per-request work, not
the interpreter's I/O.

    python tests/bench/floor_proxy.py --port 8000 --backend http://127.0.0.1:9001 ...
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import urllib.parse

import httptools
import uvloop


class _Upstream(asyncio.Protocol):
    """One keep-alive connection to a backend; relays each response to the client that asked."""

    def __init__(self, idle: list[_Upstream]) -> None:
        self.idle = idle
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.client: _Client | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is not None and client.transport is not None:
            client.transport.write(data)
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        self.client = None
        self.idle.append(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.idle:
            self.idle.remove(self)
        if self.client is not None and self.client.transport is not None:
            self.client.transport.close()


class _Client(asyncio.Protocol):
    """One client connection: a complete request goes to the next backend as the bytes it came in."""

    def __init__(
        self, backends: list[tuple[str, int]], pools: list[list[_Upstream]], turn: itertools.cycle[int]
    ):
        self.backends = backends
        self.pools = pools
        self.turn = turn
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.pending: list[bytes] = []
        self.complete = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.pending.append(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()
            return
        if self.complete:
            self.complete = False
            request = b"".join(self.pending)
            self.pending.clear()
            self._send(request)

    def on_message_complete(self) -> None:
        self.complete = True

    def _send(self, request: bytes) -> None:
        i = next(self.turn)
        pool = self.pools[i]
        if pool:
            up = pool.pop()
            up.client = self
            assert up.transport is not None
            up.transport.write(request)
        else:
            asyncio.get_running_loop().create_task(self._connect(i, request))

    async def _connect(self, i: int, request: bytes) -> None:
        host, port = self.backends[i]
        pool = self.pools[i]
        _, up = await asyncio.get_running_loop().create_connection(lambda: _Upstream(pool), host, port)
        up.client = self
        assert up.transport is not None
        up.transport.write(request)


async def serve(port: int, backends: list[tuple[str, int]]) -> None:
    pools: list[list[_Upstream]] = [[] for _ in backends]
    turn = itertools.cycle(range(len(backends)))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Client(backends, pools, turn), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--backend", action="append", required=True, help="http://host:port (repeat)")
    args = ap.parse_args()
    backends = []
    for url in args.backend:
        u = urllib.parse.urlsplit(url)
        backends.append((u.hostname or "127.0.0.1", u.port or 80))
    uvloop.run(serve(args.port, backends))


if __name__ == "__main__":
    main()
