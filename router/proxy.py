"""Forwarding: one shared ClientSession, retries before the first byte, byte-exact relay.

Rules (STYLE.md 7):

* A request may move to another replica only while nothing has reached the client. We wait for
  the upstream's status line *and* its first body chunk before answering, so a replica that
  refuses, resets, returns 5xx or stalls past the first-byte timeout is retried elsewhere
  (bounded by ``max_retries``), invisibly to the client.
* After the first byte we relay ``content.iter_any()`` chunks as they arrive: no buffering, no
  re-encoding (the session does not decompress), TCP_NODELAY on both sides.
* If the upstream breaks mid-stream, an SSE client gets an error event and ``[DONE]`` and the
  stream is closed; a non-SSE client gets a closed connection. Never a hang: every upstream
  read has the idle timeout.
* If the client goes away, the handler is cancelled (``handler_cancellation``), which closes the
  upstream connection, so the engine aborts the request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from .config import UpstreamConfig
from .errors import (
    NoReplicaAvailable,
    Overloaded,
    RouterError,
    UpstreamError,
    UpstreamTimeout,
    sse_error_event,
)
from .metrics import RouterMetrics
from .replicas import Replica
from .routing import Router, Ticket
from .scoring.pipeline import Explanation
from .types import ReplicaId, RequestInfo

log = logging.getLogger("kvrouter.proxy")

# RFC 9110 7.6.1 hop-by-hop headers, plus the ones the proxy owns (Host, lengths, auth).
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
    )
)
_REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "authorization", "expect"}
_RESPONSE_DROP = HOP_BY_HOP | {"content-length", "server", "date"}
RETRYABLE_STATUS = frozenset((500, 502, 503, 504))
REPLICA_HEADER = "x-kvrouter-replica"
_CACHED_RE = re.compile(rb'"cached_tokens"\s*:\s*(\d+)')


class UpstreamFailure(Exception):
    """Failed before the first byte reached the client: safe to retry elsewhere."""

    def __init__(self, reason: str, error: RouterError, eject: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error
        self.eject = eject


@dataclass(slots=True)
class ForwardHooks:
    """What the proxy tells the rest of the router (health manager, parity tracker)."""

    on_success: Callable[[Replica], None]
    on_failure: Callable[[Replica, str], None]


def _connection_listed(headers: Mapping[str, str]) -> frozenset[str]:
    """RFC 9110 7.6.1: every header named in ``Connection`` is hop-by-hop too, so a client (or an
    engine) cannot smuggle per-connection headers through the proxy by listing them there."""
    if isinstance(headers, CIMultiDictProxy | CIMultiDict):
        values = headers.getall("Connection", [])
    else:
        values = [v for k, v in headers.items() if k.lower() == "connection"]
    return frozenset(t.strip().lower() for v in values for t in v.split(",") if t.strip())


def request_headers(headers: Mapping[str, str], upstream_key: str | None) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    listed = _connection_listed(headers)
    for k, v in headers.items():
        low = k.lower()
        if low not in _REQUEST_DROP and low not in listed:
            out.add(k, v)
    if upstream_key:
        out["Authorization"] = f"Bearer {upstream_key}"
    return out


def response_headers(headers: CIMultiDictProxy[str], replica: Replica | None) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    listed = _connection_listed(headers)
    for k, v in headers.items():
        low = k.lower()
        if low not in _RESPONSE_DROP and low not in listed:
            out.add(k, v)
    if replica is not None:
        out[REPLICA_HEADER] = replica.id
    return out


class Forwarder:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        router: Router,
        cfg: UpstreamConfig,
        metrics: RouterMetrics,
        hooks: ForwardHooks,
        replica_header: bool = True,
    ) -> None:
        self.session = session
        self.router = router
        self.cfg = cfg
        self.metrics = metrics
        self.hooks = hooks
        self.replica_header = replica_header

    async def forward(
        self,
        request: web.Request,
        path: str,
        body: bytes,
        req: RequestInfo,
        *,
        routed: bool = True,
        explain: Explanation | None = None,
    ) -> web.StreamResponse:
        """Pick a replica (policy when ``routed``, else least in-flight), send, relay.

        ``explain`` is filled by the first selection (debug logging of the real decision)."""
        headers = request_headers(request.headers, self.cfg.api_key)
        tried: list[ReplicaId] = []
        last: UpstreamFailure | None = None
        # Replicas that answered 5xx: blamed only once another replica served the same request.
        # A request that makes every replica fail is the request's fault (a poison pill) and must
        # not get healthy replicas ejected.
        suspects: list[Replica] = []
        started = time.perf_counter()
        for attempt in range(self.cfg.max_retries + 1):
            try:
                if routed:
                    replica = self.router.select(req, tried, explain if attempt == 0 else None)
                    if attempt == 0 and explain is not None:
                        log.debug("route %s", explain.log_line())
                else:
                    replica = self._least_loaded(req.model, tried)
            except (NoReplicaAvailable, Overloaded):
                if last is not None:
                    break  # report the upstream failure, not the lack of another candidate
                raise
            ticket = self.router.dispatch(req, replica)
            try:
                response = await self._attempt(request, replica, ticket, path, body, headers, req, started)
                for rep in suspects:
                    self.hooks.on_failure(rep, "status_5xx")
                return response
            except UpstreamFailure as fail:
                self.router.finish(ticket, ok=False)
                if fail.reason.startswith("status_"):
                    suspects.append(replica)
                elif fail.eject:
                    self.hooks.on_failure(replica, fail.reason)
                self.metrics.count_request(replica.id, fail.error.status)
                self.metrics.retries.labels(fail.reason).inc()
                tried.append(replica.id)
                last = fail
                log.info("upstream %s failed before first byte (%s); retrying", replica.id, fail.reason)
            except BaseException:
                self.router.finish(ticket, ok=False)
                raise
        assert last is not None
        if suspects:
            log.info("request failed with 5xx on %d replica(s): not counted against their health", len(suspects))
        raise last.error

    def _least_loaded(self, model: str | None, exclude: list[ReplicaId]) -> Replica:
        cands = self.router.candidates(model, exclude)
        return min(cands, key=lambda r: r.in_flight)

    async def _attempt(
        self,
        request: web.Request,
        replica: Replica,
        ticket: Ticket,
        path: str,
        body: bytes,
        headers: CIMultiDict[str],
        req: RequestInfo,
        started: float,
    ) -> web.StreamResponse:
        url = replica.url + path
        t0 = time.perf_counter()
        # A non-streaming answer's first byte comes when generation is over: its budget is the
        # whole request (request_timeout_s), not the time to a first token.
        budget = self.cfg.first_byte_timeout_s if req.stream else self.cfg.request_timeout_s
        try:
            async with asyncio.timeout(budget):
                up = await self.session.request(
                    request.method, url, data=body or None, headers=headers, params=request.rel_url.query
                )
                try:
                    first = await up.content.readany()
                except BaseException:
                    up.close()
                    raise
        except TimeoutError:
            # Retried elsewhere (nothing reached the client), but not held against the replica:
            # a slow answer is load or a long generation as often as a fault; probes judge health.
            error = UpstreamTimeout(f"Replica did not answer within {budget:g}s.")
            raise UpstreamFailure("first_byte_timeout", error, eject=False) from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError) as exc:
            raise UpstreamFailure(
                "connect" if isinstance(exc, aiohttp.ClientConnectorError) else "upstream_reset",
                UpstreamError(f"Replica connection failed: {type(exc).__name__}"),
            ) from None

        ttfb = time.perf_counter() - t0
        if up.status in RETRYABLE_STATUS:
            up.close()
            raise UpstreamFailure(f"status_{up.status}", UpstreamError(f"Replica answered HTTP {up.status}."))
        self.metrics.observe_ttfb(replica.id, ttfb)
        is_sse = up.headers.get("Content-Type", "").startswith("text/event-stream")
        if is_sse:
            self.router.first_token(ticket, ttfb)
        out = web.StreamResponse(
            status=up.status,
            reason=up.reason,
            headers=response_headers(up.headers, replica if self.replica_header else None),
        )
        length = up.headers.get("Content-Length")
        if length is not None and not is_sse:
            out.content_length = int(length)
        # else aiohttp picks chunked framing for HTTP/1.1 clients and close-delimited for
        # HTTP/1.0 ones (forcing chunked made every HTTP/1.0 stream a 500).
        ok = False
        tail = first
        try:
            try:
                await out.prepare(request)
                if first:
                    await out.write(first)
            except ConnectionResetError:
                # The client left while the upstream was answering. Handled like a cancelled
                # handler: let through, aiohttp logs a traceback and tries to write a 500 to the
                # closed transport for each one, which after a burst of disconnects (a load
                # balancer or client pool closing) kept the loop busy long enough to stall the
                # next connections for over a second (bench-proxy, c=256).
                self.metrics.stream_aborts.labels("client").inc()
                raise asyncio.CancelledError from None
            if up.content.at_eof():
                # The whole body came with the first read (a typical non-streaming answer): no
                # relay loop, no idle timer to arm and cancel.
                ok = True
            else:
                ok, tail = await self._relay(up, out, first, is_sse, replica)
            if ok:
                await out.write_eof()
            elif not is_sse and request.transport is not None:
                # A non-SSE body cut short must not look complete (a final empty chunk or a
                # short Content-Length body followed by keep-alive): drop the connection.
                request.transport.close()
        finally:
            up.close()
            if ok:
                self.hooks.on_success(replica)
                self.metrics.count_request(replica.id, up.status)
            self.metrics.latency.observe(time.perf_counter() - started)
            cached = _cached_tokens(tail) if ok and up.status == 200 else None
            self.router.finish(ticket, ok=ok and up.status < 400, cached_tokens=cached)
        return out

    async def _relay(
        self,
        up: aiohttp.ClientResponse,
        out: web.StreamResponse,
        first: bytes,
        is_sse: bool,
        replica: Replica,
    ) -> tuple[bool, bytes]:
        """Copy the rest of the body. Returns (completed, last bytes seen for usage parsing)."""
        prev = b""
        last = first
        try:
            with _IdleTimer(self.cfg.idle_timeout_s) as idle:
                while True:
                    chunk = await up.content.readany()
                    if not chunk:
                        return True, prev + last
                    idle.touch()  # the upstream delivered; time spent writing is the client's
                    try:
                        await out.write(chunk)
                    except ConnectionResetError:
                        # The client left between two chunks: same as a cancelled handler.
                        self.metrics.stream_aborts.labels("client").inc()
                        raise asyncio.CancelledError from None
                    prev, last = last, chunk
                    idle.touch()
        except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            reason = "idle_timeout" if isinstance(exc, TimeoutError) else "upstream_disconnected"
            self.metrics.stream_aborts.labels("upstream").inc()
            self.metrics.count_request(replica.id, reason)
            self.hooks.on_failure(replica, reason)
            log.warning("stream from %s broke after first byte: %s", replica.id, reason)
            if is_sse:
                try:
                    await out.write(sse_error_event(f"Upstream replica failed mid-stream ({reason}).", code=reason))
                    await out.write_eof()
                except (ConnectionResetError, RuntimeError):
                    pass
            return False, b""


class _IdleTimer:
    """Cancels the current task when no ``touch()`` came for ``idle`` seconds; raises TimeoutError.

    Same contract as ``asyncio.timeout`` with ``reschedule`` after every chunk, but lazy: a touch
    only records the time, and the one timer re-arms itself when it fires early. A stream of N
    chunks costs one timer per idle period instead of N cancelled-and-recreated timer handles."""

    __slots__ = ("_cancelling", "_fired", "_handle", "_idle", "_last", "_loop", "_task")

    def __init__(self, idle: float) -> None:
        self._idle = idle
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._fired = False
        self._cancelling = 0
        self._last = 0.0
        self._handle: asyncio.TimerHandle | None = None

    def touch(self) -> None:
        self._last = self._loop.time()

    def _check(self) -> None:
        due = self._last + self._idle
        if self._loop.time() < due:
            self._handle = self._loop.call_at(due, self._check)
            return
        self._fired = True
        self._task.cancel()

    def __enter__(self) -> _IdleTimer:
        self._cancelling = self._task.cancelling()
        self.touch()
        self._handle = self._loop.call_at(self._last + self._idle, self._check)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        # Like asyncio.Timeout: only our own cancellation becomes TimeoutError; a cancellation
        # from outside (client gone) that raced with it stays a CancelledError.
        if self._fired and exc_type is asyncio.CancelledError and self._task.uncancel() <= self._cancelling:
            raise TimeoutError from exc


def _cached_tokens(tail: bytes) -> int | None:
    found = _CACHED_RE.findall(tail)
    return int(found[-1]) if found else None
