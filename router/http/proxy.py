"""Forwarding: pooled upstream connections, retries before the first byte, byte-exact relay.

Rules (STYLE.md 7):

* A request may move to another replica only while nothing has reached the client. We wait for
  the upstream's status line *and* its first body chunk before answering, so a replica that
  refuses, resets, returns 5xx or stalls past the first-byte timeout is retried elsewhere
  (bounded by ``max_retries``), invisibly to the client.
* After the first byte we relay body pieces as they arrive (upstream.py): no buffering, no
  re-encoding (Content-Encoding passes through), TCP_NODELAY on both sides.
* If the upstream breaks mid-stream, an SSE client gets an error event and ``[DONE]`` and the
  stream is closed; a non-SSE client gets a closed connection. Never a hang: every upstream
  read has the idle timeout.
* If the client goes away, the handler is cancelled, which closes the upstream connection, so the
  engine aborts the request and frees its KV blocks.

The response goes to a ``ResponseSink``: aiohttp's StreamResponse for requests the aiohttp server
handles, or the raw HTTP/1.1 writer of the generate fast path (fastpath.py). Headers move
as raw byte pairs on both sides.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web
from multidict import CIMultiDict

from router.config import UpstreamConfig
from router.errors import (
    NoReplicaAvailable,
    Overloaded,
    RouterError,
    UpstreamError,
    UpstreamTimeout,
    sse_error_event,
)
from router.http.deadlines import Bucket, deadlines
from router.http.upstream import UpstreamBroken, UpstreamConnectError, UpstreamPool, UpstreamResponse
from router.metrics import RouterMetrics
from router.replicas.registry import Replica
from router.routing import Router, Ticket, pinned_candidate
from router.scoring.pipeline import Explanation
from router.types import ReplicaId, RequestInfo

log = logging.getLogger("kvrouter.proxy")

# RFC 9110 7.6.1 hop-by-hop headers, plus the ones the proxy owns (Host, lengths, auth).
HOP_BY_HOP = frozenset(
    h.lower().encode()
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
REQUEST_DROP = HOP_BY_HOP | {b"host", b"content-length", b"authorization", b"expect"}
_RESPONSE_DROP = HOP_BY_HOP | {b"content-length", b"server", b"date"}
RETRYABLE_STATUS = frozenset((500, 502, 503, 504))
REPLICA_HEADER = "x-kvrouter-replica"
_REPLICA_HEADER_B = REPLICA_HEADER.encode()
_CACHED_RE = re.compile(rb'"cached_tokens"\s*:\s*(\d+)')
Headers = list[tuple[bytes, bytes]]


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


def _connection_listed(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """RFC 9110 7.6.1: every header named in ``Connection`` is hop-by-hop too, so a client (or an
    engine) cannot smuggle per-connection headers through the proxy by listing them there."""
    return frozenset(
        t.strip().lower()
        for k, v in headers
        if k.lower() == b"connection"
        for t in v.split(b",")
        if t.strip()
    )


# Connection tokens that name no other header (hop-by-hop already).
_CONNECTION_PLAIN = frozenset((b"", b"close", b"keep-alive"))


def connection_names_others(value: bytes) -> bool:
    """Whether a Connection header value lists other headers, which are then hop-by-hop too."""
    return not all(t.strip() in _CONNECTION_PLAIN for t in value.lower().split(b","))


def request_header_lines(headers: Iterable[tuple[bytes, bytes]], upstream_key: str | None) -> bytes:
    """The client's end-to-end headers as ``Name: value\\r\\n`` lines for the engine (Host,
    Content-Length and the client's Authorization are the proxy's own)."""
    headers = list(headers)
    listed = _connection_listed(headers)
    drop = REQUEST_DROP | listed if listed else REQUEST_DROP  # one lower() per header
    out = [k + b": " + v + b"\r\n" for k, v in headers if k.lower() not in drop]
    if upstream_key:
        out.append(b"Authorization: Bearer " + upstream_key.encode() + b"\r\n")
    return b"".join(out)


def response_header_pairs(headers: Headers, replica: Replica | None) -> Headers:
    """The engine's end-to-end headers for the client, plus ``x-kvrouter-replica``. One pass
    (one ``lower()`` per header) unless ``Connection`` names other headers, which is rare."""
    out: Headers = []
    for k, v in headers:
        low = k.lower()
        if low not in _RESPONSE_DROP:
            out.append((k, v))
        elif low == b"connection" and connection_names_others(v):
            listed = _connection_listed(headers)
            out = [(k, v) for k, v in headers if k.lower() not in _RESPONSE_DROP | listed]
            break
    if replica is not None:
        out.append((_REPLICA_HEADER_B, replica.id.encode()))
    return out


class ResponseSink(Protocol):
    """Where a proxied response goes. ``write`` raises ConnectionResetError once the client left."""

    async def start(self, status: int, reason: bytes, headers: Headers, length: int | None) -> None: ...

    async def write(self, data: bytes) -> None: ...

    async def finish(self) -> None: ...

    def abort(self) -> None:
        """Drop the client connection: a non-SSE body cut short must not look complete."""


class AiohttpSink:
    """A response through aiohttp's server (``response`` is what the handler returns)."""

    __slots__ = ("request", "response")

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None

    async def start(self, status: int, reason: bytes, headers: Headers, length: int | None) -> None:
        out = web.StreamResponse(
            status=status,
            reason=reason.decode("latin-1") or None,
            headers=CIMultiDict(
                (k.decode("latin-1"), v.decode("utf-8", "surrogateescape")) for k, v in headers
            ),
        )
        if length is not None:
            out.content_length = length
        # else aiohttp picks chunked framing for HTTP/1.1 clients and close-delimited for
        # HTTP/1.0 ones (forcing chunked made every HTTP/1.0 stream a 500).
        self.response = out
        await out.prepare(self.request)

    async def write(self, data: bytes) -> None:
        assert self.response is not None
        await self.response.write(data)

    async def finish(self) -> None:
        assert self.response is not None
        await self.response.write_eof()

    def abort(self) -> None:
        if self.request.transport is not None:
            self.request.transport.close()


class Forwarder:
    def __init__(
        self,
        pool: UpstreamPool,
        router: Router,
        cfg: UpstreamConfig,
        metrics: RouterMetrics,
        hooks: ForwardHooks,
        replica_header: bool = True,
    ) -> None:
        self.pool = pool
        self.router = router
        self.cfg = cfg
        self.metrics = metrics
        self.hooks = hooks
        self.replica_header = replica_header

    async def forward(
        self,
        sink: ResponseSink,
        method: str,
        target: bytes,
        headers: bytes,
        body: bytes,
        req: RequestInfo,
        *,
        routed: bool = True,
        explain: Explanation | None = None,
        body_for: Callable[[Replica], bytes] | None = None,
        pinned: Replica | None = None,
    ) -> None:
        """Pick a replica (policy when ``routed``, else least in-flight), send, relay to ``sink``.

        ``target`` is the request target (path and query) as the client sent it; ``headers``
        the lines for the engine (``request_header_lines``). ``explain`` is filled by the first
        selection (debug logging of the real decision). ``body_for`` gives the body for the chosen
        replica when it depends on the replica (session hints: router/http/sessions.py).
        ``pinned``: the first attempt's replica, chosen by the caller (router/pd/route.py);
        retries go through the policy."""
        tried: list[ReplicaId] = []
        last: UpstreamFailure | None = None
        # Replicas that answered 5xx: blamed only once another replica served the same request.
        # A request that makes every replica fail is the request's fault (a poison pill) and must
        # not get healthy replicas ejected.
        suspects: list[tuple[Replica, str]] = []
        started = time.perf_counter()
        # Each attempt has its own budget, and all of them together retry_budget_s: a stalled
        # fleet answers 504 within that, however many replicas there are to try (F7).
        per_attempt = self.cfg.first_byte_timeout_s if req.stream else self.cfg.request_timeout_s
        for attempt in range(self.cfg.max_retries + 1):
            left = min(per_attempt, self.cfg.retry_budget_s - (time.perf_counter() - started))
            if left <= 0 and last is not None:
                break
            try:
                if attempt == 0 and pinned is not None:
                    replica = pinned
                elif routed:
                    replica = self.router.select(req, tried, explain if attempt == 0 else None)
                    if attempt == 0 and explain is not None:
                        log.debug("route %s", explain.log_line())
                else:
                    replica = self._least_loaded(req, tried)
            except (NoReplicaAvailable, Overloaded):
                if last is not None:
                    break  # report the upstream failure, not the lack of another candidate
                raise
            ticket = self.router.dispatch(req, replica)
            try:
                sent = body if body_for is None else body_for(replica)
                await self._attempt(sink, replica, ticket, method, target, headers, sent, req, started, left)
                for rep, why in suspects:
                    self.hooks.on_failure(rep, why)
                return
            except UpstreamFailure as fail:
                self.router.finish(ticket, ok=False)
                if fail.reason.startswith("status_") or fail.reason == "upstream_reset":
                    # A reset before the answer may be the engine refusing this request's bytes:
                    # the same poison-pill rule as 5xx (F5).
                    suspects.append(
                        (replica, "status_5xx" if fail.reason.startswith("status_") else fail.reason)
                    )
                elif fail.eject:
                    self.hooks.on_failure(replica, fail.reason)
                self.metrics.count_request(replica.id, fail.error.status)
                self.metrics.retries.labels(fail.reason).inc()
                tried.append(replica.id)
                last = fail
                log.info("upstream %s failed before first byte (%s); retrying", replica.id, fail.reason)
            except BaseException as exc:
                if isinstance(exc, asyncio.CancelledError):
                    # The client closed the connection or timed out: visible by outcome.
                    self.metrics.count_request(replica.id, "client_cancelled")
                self.router.finish(ticket, ok=False)
                raise
        assert last is not None
        if suspects:
            log.info(
                "request failed (5xx or reset) on %d replica(s): not counted against their health",
                len(suspects),
            )
        raise last.error

    def _least_loaded(self, req: RequestInfo, exclude: list[ReplicaId]) -> Replica:
        # as Router.select: a pinned target is looked up before outlier thinning
        pinned = (
            None
            if req.pin is None or req.pin in exclude
            else pinned_candidate(self.router.registry.candidates(req.model), req.pin)
        )
        if pinned is not None:
            return pinned
        cands = self.router.candidates(req.model, exclude)
        return min(cands, key=lambda r: r.in_flight)

    async def _attempt(
        self,
        sink: ResponseSink,
        replica: Replica,
        ticket: Ticket,
        method: str,
        target: bytes,
        headers: bytes,
        body: bytes,
        req: RequestInfo,
        started: float,
        budget: float,
    ) -> None:
        """``budget``: what is left of the request's deadline. A non-streaming answer's first
        byte comes when generation is over: its budget is the whole request (request_timeout_s),
        not the time to a first token."""
        t0 = time.perf_counter()
        try:
            # A timer nobody touches is a deadline; cheaper than asyncio.timeout per request.
            with _IdleTimer(budget):
                if replica.dp_rank is not None:  # a data-parallel rank: vLLM's pinning header
                    headers += b"X-data-parallel-rank: %d\r\n" % replica.dp_rank
                up = await self.pool.request(replica.url, method, target, headers, body)
                try:
                    first = await up.read()
                except BaseException:
                    up.close()
                    raise
        except TimeoutError:
            # Retried elsewhere (nothing reached the client), but not held against the replica:
            # a slow answer is load or a long generation as often as a fault; probes judge health.
            error = UpstreamTimeout(f"Replica did not answer within {budget:.3g}s.")
            raise UpstreamFailure("first_byte_timeout", error, eject=False) from None
        except (UpstreamBroken, OSError) as exc:
            raise UpstreamFailure(
                "connect" if isinstance(exc, UpstreamConnectError) else "upstream_reset",
                UpstreamError(f"Replica connection failed: {type(exc).__name__}"),
            ) from None

        ttfb = time.perf_counter() - t0
        status = up.status
        if status in RETRYABLE_STATUS:
            up.close()
            raise UpstreamFailure(f"status_{status}", UpstreamError(f"Replica answered HTTP {status}."))
        self.metrics.observe_ttfb(replica.id, ttfb)
        if req.on_response is not None and status < 400:
            req.on_response(first, replica.id)
        is_sse = up.content_type.startswith(b"text/event-stream")
        if is_sse:
            self.router.first_token(ticket, ttfb)
        ok = False
        tail = first
        try:
            try:
                await sink.start(
                    status,
                    up.reason,
                    response_header_pairs(up.headers, replica if self.replica_header else None),
                    None if is_sse else up.content_length,
                )
                if first:
                    await sink.write(first)
            except ConnectionResetError:
                # The client left while the upstream was answering. Handled like a cancelled
                # handler: aiohttp would log a traceback and try to write a 500 to the closed
                # transport for each one, which after a burst of disconnects kept the loop busy.
                self.metrics.stream_aborts.labels("client").inc()
                raise asyncio.CancelledError from None
            if up.at_eof():
                # The whole body came with the first read (a typical non-streaming answer): no
                # relay loop, no idle timer to arm and cancel.
                ok = True
            else:
                ok, tail = await self._relay(up, sink, first, is_sse, replica, ticket)
            if ok:
                await sink.finish()
            elif not is_sse:
                # A non-SSE body cut short must not look complete (a final empty chunk or a
                # short Content-Length body followed by keep-alive): drop the connection.
                sink.abort()
        finally:
            up.close()
            if ok:
                self.hooks.on_success(replica)
                self.metrics.count_request(replica.id, status)
            self.metrics.latency.observe(time.perf_counter() - started)
            cached = _cached_tokens(tail) if ok and status == 200 else None
            self.router.finish(ticket, ok=ok and status < 400, cached_tokens=cached)

    async def _relay(
        self,
        up: UpstreamResponse,
        sink: ResponseSink,
        first: bytes,
        is_sse: bool,
        replica: Replica,
        ticket: Ticket,
    ) -> tuple[bool, bytes]:
        """Copy the rest of the body. Returns (completed, last bytes seen for usage parsing).

        A stream's mean gap between upstream reads is its inter-token latency for the outlier
        detector (one read is usually one step's tokens)."""
        prev = b""
        last = first
        t_first = time.perf_counter()
        reads = 0
        try:
            with _IdleTimer(self.cfg.idle_timeout_s) as idle:
                while True:
                    chunk = await up.read()
                    if not chunk:
                        if is_sse and reads >= 2:
                            self.router.observe_itl(ticket, (time.perf_counter() - t_first) / reads)
                        return True, prev + last
                    reads += 1
                    idle.touch()  # the upstream delivered; time spent writing is the client's
                    try:
                        await sink.write(chunk)
                    except ConnectionResetError:
                        # The client left between two chunks: same as a cancelled handler.
                        self.metrics.stream_aborts.labels("client").inc()
                        raise asyncio.CancelledError from None
                    prev, last = last, chunk
                    idle.touch()
        except (TimeoutError, UpstreamBroken) as exc:
            reason = "idle_timeout" if isinstance(exc, TimeoutError) else "upstream_disconnected"
            self.metrics.stream_aborts.labels("upstream").inc()
            self.metrics.count_request(replica.id, reason)
            self.hooks.on_failure(replica, reason)
            log.warning("stream from %s broke after first byte: %s", replica.id, reason)
            if is_sse:
                try:
                    await sink.write(
                        sse_error_event(f"Upstream replica failed mid-stream ({reason}).", code=reason)
                    )
                    await sink.finish()
                except (ConnectionResetError, RuntimeError):
                    pass
            return False, b""


class _IdleTimer:
    """Cancels the current task when no ``touch()`` came for ``idle`` seconds; raises TimeoutError.

    Same contract as ``asyncio.timeout`` with ``reschedule`` after every chunk, but lazy: a touch
    only records the time, and the deadline re-registers itself when it comes up early. It sits in
    a shared deadline bucket (deadlines.py), so a request costs no timer handle of its own; it
    fires at most ~3% of ``idle`` late."""

    __slots__ = ("_bucket", "_cancelling", "_deadlines", "_fired", "_idle", "_last", "_loop", "_task")

    def __init__(self, idle: float) -> None:
        self._idle = idle
        self._loop = loop = asyncio.get_running_loop()
        self._deadlines = deadlines(loop)
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._fired = False
        self._cancelling = 0
        self._last = 0.0
        self._bucket: Bucket | None = None

    def touch(self) -> None:
        self._last = self._loop.time()

    def expired(self) -> None:
        if self._bucket is None:
            return  # exited while its bucket was firing
        due = self._last + self._idle
        if self._loop.time() < due:
            self._bucket = self._deadlines.add(self._loop, self, due, self._idle)
            return
        self._bucket = None
        self._fired = True
        self._task.cancel()

    def __enter__(self) -> _IdleTimer:
        self._cancelling = self._task.cancelling()
        self.touch()
        self._bucket = self._deadlines.add(self._loop, self, self._last + self._idle, self._idle)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if self._bucket is not None:
            self._deadlines.discard(self, self._bucket)
            self._bucket = None
        # Like asyncio.Timeout: only our own cancellation becomes TimeoutError; a cancellation
        # from outside (client gone) that raced with it stays a CancelledError.
        if self._fired and exc_type is asyncio.CancelledError and self._task.uncancel() <= self._cancelling:
            raise TimeoutError from exc


def _cached_tokens(tail: bytes) -> int | None:
    found = _CACHED_RE.findall(tail)
    return int(found[-1]) if found else None
