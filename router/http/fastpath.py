"""Raw HTTP/1.1 serving of ``POST /v1/completions`` and ``POST /v1/chat/completions``.

(Over 500 lines: framing, admission from the head and the read deadlines are one state machine.)

Why: per proxied request aiohttp's server builds a BaseRequest, multidicts, a payload stream, a
StreamResponse and its writer, and runs the middleware chain; together with its client that was
about 60% of the router's CPU at concurrency 32 (bench-proxy profile). This protocol reads the
request head with a small strict parser, the body by Content-Length, and writes the response head
and body straight to the transport, while everything that decides *what* to answer (auth,
validation, drain, admission, routing, retries, relay) is the same code as on the aiohttp path
(generate.py, proxy.py).

Anything else goes to aiohttp, unchanged: the first request on a connection that is not a plain
generate POST (another path or method, HTTP/1.0, chunked request bodies, ``Expect``, ``Upgrade``,
an oversized or unusual head) hands the connection over to aiohttp's RequestHandler for good, with
the bytes read so far, so aiohttp's llhttp parser and error handling judge every request this
parser does not fully understand. ``--no-fast-path`` turns the fast path off.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from typing import cast

from router.errors import (
    REASON_PHRASES,
    BadRequest,
    Draining,
    HeaderTooLarge,
    Overloaded,
    PayloadTooLarge,
    RouterError,
    UriTooLong,
)
from router.http.client_limits import BodyBudgetExceeded, RequestTimeout
from router.http.coalesce import Coalesced, write_batch
from router.http.generate import GENERATE_PATHS, InfoParser, check_api_key, count_error, generate
from router.http.proxy import REQUEST_DROP, Headers, connection_names_others, request_header_lines
from router.http.requests import BAD_BODY_ERRORS, bad_body_error
from router.http.state import RequestPath
from router.http.targets import query_ok

log = logging.getLogger("kvrouter.server")

MAX_FIELDS = 128  # header fields per request (aiohttp's limit)
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Header names most clients send, valid tokens by construction: a set lookup instead of the
# token regex for each (2 us per request with five headers).
_COMMON_NAMES = frozenset(
    v
    for n in (
        "Host",
        "Content-Type",
        "Content-Length",
        "Accept",
        "Accept-Encoding",
        "User-Agent",
        "Authorization",
        "Connection",
    )
    for v in (n.encode(), n.lower().encode())
)
_PATHS: dict[bytes, tuple[str, InfoParser]] = {p.encode(): (p, info) for p, info in GENERATE_PATHS.items()}


class _Head:
    __slots__ = ("auth", "headers", "info", "keep_alive", "length", "lines", "path", "target")

    def __init__(
        self,
        path: str,
        info: InfoParser,
        target: bytes,
        headers: Headers,
        length: int,
        keep_alive: bool,
        auth: str,
        lines: bytes | None = None,
    ) -> None:
        self.path = path
        self.info = info
        self.target = target
        self.headers = headers
        self.length = length
        self.keep_alive = keep_alive
        self.auth = auth
        # The end-to-end header lines for the engine, built while parsing (request_header_lines
        # in one pass); None when Connection lists other headers: request_header_lines decides.
        self.lines = lines


def head_limit_error(raw: bytes, max_line: int) -> RouterError | None:
    """Which size limit a request head breaks, if any: the same limits aiohttp's parser applies
    (``--max-header-bytes`` per line, 128 fields), answered as OpenAI JSON instead of its
    plain-text 400."""
    lines = raw.split(b"\r\n")
    if len(lines[0]) > max_line:
        return UriTooLong(f"Request line exceeds {max_line} bytes.")
    if len(lines) - 1 > MAX_FIELDS:
        return HeaderTooLarge(f"More than {MAX_FIELDS} header fields.")
    if any(len(line) > max_line for line in lines):
        return HeaderTooLarge(f"A header field exceeds {max_line} bytes.")
    return None


def parse_head(raw: bytes, max_line: int) -> _Head | None:
    """A generate request head (without the final CRLF CRLF), or None when the fast path should
    not serve it. Strict on purpose: whatever is unusual is left to aiohttp."""
    # find, not ``in``: CPython 3.11's bytes.__contains__ first tries the needle as an integer and
    # raises (then clears) a TypeError, a formatted message each time (~2,000 instructions).
    if (
        raw.find(b"\x00") >= 0
        or raw.count(b"\r") != raw.count(b"\r\n")
        or raw.count(b"\n") != raw.count(b"\r\n")
    ):
        return None  # bare CR / LF / NUL: request-smuggling territory
    lines = raw.split(b"\r\n")
    if len(lines) - 1 > MAX_FIELDS or len(lines[0]) > max_line:
        return None
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[0] != b"POST" or parts[2] != b"HTTP/1.1":
        return None
    target = parts[1]
    route = _PATHS.get(target.partition(b"?")[0])
    if route is None:
        return None
    headers: Headers = []
    fwd: list[bytes] = []
    listed = False
    length: int | None = None
    keep_alive = True
    auth = ""
    for line in lines[1:]:
        if len(line) > max_line:
            return None
        name, colon, value = line.partition(b":")
        if not colon or (name not in _COMMON_NAMES and _TOKEN.fullmatch(name) is None):
            return None  # no colon, whitespace before it, obs-fold
        value = value.strip(b" \t")
        low = name.lower()
        if low == b"content-length":
            if length is not None or not value.isdigit():
                return None
            length = int(value)
        elif low in (b"transfer-encoding", b"expect", b"upgrade"):
            return None
        elif low == b"connection":
            ka, plain = _connection(value)
            keep_alive &= ka
            listed |= not plain  # other headers named hop-by-hop: request_header_lines drops them
        elif low == b"authorization":
            auth = value.decode("latin-1")
        headers.append((name, value))
        if low not in REQUEST_DROP:
            fwd.append(name + b": " + value + b"\r\n")
    if length is None:
        return None
    engine_lines = None if listed else b"".join(fwd)
    return _Head(route[0], route[1], target, headers, length, keep_alive, auth, engine_lines)


def _connection(value: bytes) -> tuple[bool, bool]:
    """(keep-alive, names no other header) of a Connection header value."""
    # names no other header: the header lines for the engine can be built while parsing
    return b"close" not in value.lower(), not connection_names_others(value)


class FastPath(asyncio.Protocol):
    """One client connection. Serves generate requests one at a time (pipelined requests wait
    in the buffer), or delegates the whole connection to ``fallback()`` (aiohttp)."""

    def __init__(self, rp: RequestPath, fallback: Callable[[], asyncio.Protocol]) -> None:
        self.rp = rp
        self.fallback = fallback
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.out: Coalesced | None = None  # what this pass wrote, sent at its end (coalesce.py)
        self.delegate: asyncio.Protocol | None = None
        # Bytes not consumed yet. Usually a whole request arrives in one read and is parsed from
        # that ``bytes`` object as is; a bytearray only when pieces must be joined.
        self.buf: bytes | bytearray = b""
        self.head: _Head | None = None
        self.head_end = 0
        # One task per connection, started by its first request, serves its requests in turn.
        self.task: asyncio.Task[None] | None = None
        self.serving = False  # a request is being answered: later bytes wait in the buffer
        self.ready: tuple[_Head, bytes] | None = None  # the next request, read in full
        self.waiter: asyncio.Future[None] | None = None  # the task waiting for ``ready``
        self.closed = False
        self.discarding = False  # an error was answered; the rest of the input is dropped
        self.paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.last_active = 0.0
        # One timer per connection for every deadline (head, body, keep-alive idle); it is
        # re-armed earlier when a stricter deadline starts and checks the state when it fires.
        self.idle_timer: asyncio.TimerHandle | None = None
        self.timer_due = 0.0
        self.head_t0 = 0.0  # when the first byte of the pending request head arrived (0: none)
        self.body_due = 0.0  # deadline of the pending body (head read, body not complete)
        self.reserved = 0  # body bytes this connection holds of the global budget
        self.limits = rp.limits
        self.peer = ""  # client address, looked up when needed (per-client limits, logs)
        cfg = rp.cfg.server
        self.max_line = cfg.max_header_bytes
        self.max_head = 8 * cfg.max_header_bytes
        self.max_body = cfg.max_body_bytes
        key = rp.cfg.upstream.api_key
        self.upstream_auth = b"Authorization: Bearer " + key.encode() + b"\r\n" if key else b""

    # ---- asyncio.Protocol ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.out = Coalesced(write_batch(self.loop), self.transport)
        self.last_active = self.loop.time()
        self._arm(self.last_active + self.limits.keepalive_s)
        if self.limits.clients.rate > 0:
            self.peer = _peer(self.transport)

    def data_received(self, data: bytes) -> None:
        if self.discarding:
            return
        if self.delegate is not None:
            self.delegate.data_received(data)
            self._watch_delegate()
            return
        if not self.buf:
            self.buf = data
        elif isinstance(self.buf, bytearray):
            self.buf += data
        else:
            self.buf = bytearray(self.buf) + data
        self.last_active = self.loop.time()
        if not self.serving:
            self._next()
        elif len(self.buf) > self.max_head + self.max_body:
            self._close()  # a pipelining flood while a request is being served

    def eof_received(self) -> bool | None:
        if self.delegate is not None:
            return self.delegate.eof_received()
        if not self.serving:
            self._close()
        return False  # close, as aiohttp does: a client that half-closes has gone

    def pause_writing(self) -> None:
        if self.delegate is not None:
            self.delegate.pause_writing()
        self.paused = True

    def resume_writing(self) -> None:
        if self.delegate is not None:
            self.delegate.resume_writing()
        self.paused = False
        self._wake_drain()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.out is not None:
            self.out.discard()
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        if not self.serving:
            self._release()  # a body read but never served holds no budget after the close
        if self.delegate is not None:
            self.delegate.connection_lost(exc)
            return
        if self.task is not None:
            self.task.cancel()  # the client left: an upstream request is closed, the engine aborts
        self._wake_drain()

    # ---- request framing ----

    def _next(self) -> None:
        buf = self.buf
        if self.head is None and not self._take_head(buf):
            return
        head = self.head
        assert head is not None
        total = self.head_end + head.length
        if len(buf) < total:
            return
        body = bytes(buf[self.head_end : total])
        self.buf = buf[total:]
        self.head = None
        self.ready = (head, body)
        self.serving = True
        if self.task is None:
            self.task = self.loop.create_task(self._run())
        elif self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _take_head(self, buf: bytes | bytearray) -> bool:
        """Parse and judge the next request head; True when it is admitted (``self.head``)."""
        if not buf:
            return False
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            self._partial_head(buf)
            return False  # the whole head first, also for requests aiohttp will serve: size limits
        self.head_t0 = 0.0
        raw = bytes(buf[:end])
        head = parse_head(raw, self.max_line) if buf.startswith(b"POST ") else None
        if head is None:
            limit = head_limit_error(raw, self.max_line)
            if limit is not None:
                count_error(self.rp.metrics, limit)
                self._reply_error(limit, close=True)
            else:
                self._hand_off()  # GET /metrics, /health, other paths, unusual heads: aiohttp
            return False
        if head.length > self.max_body:
            self._refuse(PayloadTooLarge(f"Request body exceeds {self.max_body} bytes."), "body_too_large")
            return False
        refusal = self._admit(head)
        if refusal is not None:
            total = end + 4 + head.length
            if head.keep_alive and len(buf) >= total:
                # The body came with the head: nothing more to refuse to read, keep-alive.
                self.buf = buf[total:]
                self._refuse(*refusal, close=False)
                if self.buf:
                    self.loop.call_soon(self._resume)  # a pipelined request (no recursion)
            else:
                self._refuse(*refusal)  # the body is never buffered
            return False
        self.head = head
        self.head_end = end + 4
        if len(buf) < self.head_end + head.length:
            self.body_due = self.loop.time() + self.limits.body_deadline(head.length)
            self._arm(self.body_due)
        return True

    def _partial_head(self, buf: bytes | bytearray) -> None:
        if len(buf) > self.max_head:
            self._refuse(HeaderTooLarge(f"Request head exceeds {self.max_head} bytes."), "head_too_large")
        elif b"\n\n" in buf or b"\n\r\n" in buf:
            # A head ended by bare LFs: never complete for this parser, never handed on.
            self._refuse(BadRequest("Request head lines must end in CRLF."), "bare_lf")
        elif not self.head_t0:
            self.head_t0 = self.loop.time()
            self._arm(self.head_t0 + self.limits.head_timeout_s)

    def _resume(self) -> None:
        if not (self.serving or self.closing() or self.delegate is not None or self.discarding):
            self._next()

    def _admit(self, head: _Head) -> tuple[RouterError, str] | None:
        """Everything decided from the head alone, before a byte of the body is kept: target
        bytes, API key, drain, admission queue, per-client rate, the global body budget."""
        rp = self.rp
        _path, _q, query = head.target.partition(b"?")
        if not query_ok(query):
            return BadRequest("The request query contains bytes that are not allowed."), "bad_target"
        try:
            check_api_key(rp.cfg.server.api_keys, head.auth)
        except RouterError as err:
            return err, "unauthenticated"
        if rp.drain.refusing:
            return Draining(), "draining"
        adm = rp.admission
        if adm.max_in_flight and adm.in_flight >= adm.max_in_flight and adm.queued >= adm.max_queue:
            adm.on_reject()
            return Overloaded(
                "The router is at capacity; retry later.", retry_after=adm.retry_after_s
            ), "admission"
        limits = self.limits
        if limits.clients.rate > 0 and not limits.clients.allow_request(self.peer):
            return Overloaded(
                "Too many requests from this client; retry later.", retry_after=1
            ), "client_rate"
        if not limits.budget.reserve(head.length):
            return BodyBudgetExceeded(
                "The router is buffering too many request bodies; retry later.", retry_after=1
            ), "body_budget"
        self.reserved += head.length
        return None

    def _refuse(self, err: RouterError, reason: str, *, close: bool = True) -> None:
        """Answer a request refused before its body was read, and close: what the client still
        sends is dropped, never buffered."""
        count_error(self.rp.metrics, err)
        if not self.peer and self.transport is not None:
            self.peer = _peer(self.transport)
        self.limits.reject(reason, self.peer)
        if self.closing():
            return
        self._reply_error(err, close=close)

    def _release(self) -> None:
        if self.reserved:
            self.limits.budget.release(self.reserved)
            self.reserved = 0

    def _hand_off(self) -> None:
        assert self.transport is not None
        if self.out is not None:
            self.out.flush_now()  # what aiohttp writes must follow what this connection wrote
        if self.idle_timer is not None:
            self.idle_timer.cancel()  # aiohttp keeps its own keep-alive timer
            self.idle_timer = None
        proto = self.delegate = self.fallback()
        proto.connection_made(self.transport)
        if self.paused:
            proto.pause_writing()
        data = bytes(self.buf)
        self.buf = b""
        if data:
            proto.data_received(data)

    # ---- serving ----

    async def _run(self) -> None:
        try:
            while not self.closed:
                ready = self.ready
                if ready is None:
                    self.waiter = self.loop.create_future()
                    await self.waiter
                    self.waiter = None
                    continue
                self.ready = None
                try:
                    keep = await self._serve(*ready)
                finally:
                    self._release()
                self.serving = False
                self.last_active = self.loop.time()  # keep-alive idle counts from the answer
                if not keep or self.closing():
                    self._close()
                    return
                if self.buf:
                    self._next()  # a pipelined request waited in the buffer
        except asyncio.CancelledError:
            self._close()  # client gone (or shutdown): nothing more to say on this connection

    async def _serve(self, head: _Head, body: bytes) -> bool:
        """Answer one request; True when the connection can serve the next one."""
        rp = self.rp
        sink = RawSink(self, head.keep_alive)
        try:
            with rp.drain:
                if head.lines is None:
                    headers = request_header_lines(head.headers, rp.cfg.upstream.api_key)
                else:
                    headers = head.lines + self.upstream_auth
                await generate(rp, head.path, head.info, sink, head.target, headers, body)
        except RouterError as err:
            self._answer_error(sink, err)
        except BAD_BODY_ERRORS as exc:
            self._answer_error(sink, bad_body_error(exc))
        except Exception:
            log.exception("unhandled error on POST %s", head.path)
            self._answer_error(sink, RouterError("Internal router error."))
        return head.keep_alive and sink.complete

    def _answer_error(self, sink: RawSink, err: RouterError) -> None:
        if self.closing():
            return  # the client is gone: nobody to answer
        if sink.started:
            self._close()  # the answer had begun: all that is left is to cut it
            return
        count_error(self.rp.metrics, err)
        self._reply_error(err, close=not sink.keep_alive)
        sink.complete = True

    def _reply_error(self, err: RouterError, *, close: bool) -> None:
        self.write(err.http_response(close=close))
        if close:
            self._linger_close()

    # ---- writing ----

    def write(self, data: bytes) -> None:
        if self.closed or self.out is None or self.out.closing():
            raise ConnectionResetError("client connection closed")
        self.out.queue(data)

    async def drain(self) -> None:
        if not self.paused:
            return
        if self.closed:
            raise ConnectionResetError("client connection closed")
        self.drain_waiter = self.loop.create_future()
        try:
            await self.drain_waiter
        finally:
            self.drain_waiter = None
        if self.closed:
            raise ConnectionResetError("client connection closed")

    def closing(self) -> bool:
        return self.closed or self.transport is None or self.transport.is_closing()

    def _wake_drain(self) -> None:
        w = self.drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _linger_close(self) -> None:
        """Close after an error answered before the request was read to its end: send FIN, then
        drop whatever the client still sends until it closes (or 1 s), because closing with
        unread input makes the kernel send RST, which can destroy the answer in flight."""
        t = self.transport
        if t is None or t.is_closing():
            return
        if self.out is not None:
            self.out.flush_now()  # the answer goes before the FIN
        self.discarding = True
        self.buf = b""
        if t.can_write_eof():
            t.write_eof()
        self.loop.call_later(1.0, self._close)

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            if self.out is not None:
                self.out.flush_now()  # close() sends what the transport holds, then the FIN
            self.transport.close()

    def _arm(self, due: float) -> None:
        timer = self.idle_timer
        if timer is not None:
            if due >= self.timer_due:
                return  # fires earlier anyway and re-arms for what is due then
            timer.cancel()
        self.timer_due = due
        self.idle_timer = self.loop.call_at(due, self._idle_check)

    def _watch_delegate(self) -> None:
        """The head deadline on a connection aiohttp serves: aiohttp has none (its keep-alive
        timer restarts on every byte), so bytes that leave it with no parsed request and none
        in progress start the deadline, and a parsed request clears it. Reads aiohttp's
        RequestHandler state; where that is missing, the connection counts as busy."""
        d = self.delegate
        if getattr(d, "_request_in_progress", True) or getattr(d, "_messages", True):
            self.head_t0 = 0.0
        elif not self.head_t0:
            self.head_t0 = self.loop.time()
            self._arm(self.head_t0 + self.limits.head_timeout_s)

    def _idle_check(self) -> None:
        self.idle_timer = None
        if self.closed or self.discarding:
            return
        if self.delegate is not None:
            self._watch_delegate()
            if self.head_t0:
                due = self.head_t0 + self.limits.head_timeout_s
                if self.loop.time() >= due:
                    self._refuse(RequestTimeout("The request head did not arrive in time."), "head_timeout")
                else:
                    self._arm(due)
            return  # aiohttp keeps the keep-alive timer of its connections
        now = self.loop.time()
        limits = self.limits
        if self.serving:
            due = now + limits.keepalive_s  # the upstream timeouts bound a request being served
        elif self.head is not None:
            due = self.body_due
            if now >= due:
                self._refuse(RequestTimeout("The request body did not arrive in time."), "body_timeout")
                return
        elif self.head_t0:
            due = self.head_t0 + limits.head_timeout_s
            if now >= due:
                self._refuse(RequestTimeout("The request head did not arrive in time."), "head_timeout")
                return
        else:
            due = self.last_active + limits.keepalive_s
            if now >= due:
                self._close()
                return
        self._arm(max(due, now + 0.01))


def _peer(transport: asyncio.BaseTransport) -> str:
    addr = transport.get_extra_info("peername")
    return str(addr[0]) if isinstance(addr, tuple) and addr else "?"


class RawSink:
    """The proxied response on a FastPath connection: head and body written to the transport as
    they come (the head goes out with the first body bytes: one write, one segment)."""

    __slots__ = ("chunked", "complete", "keep_alive", "pending_head", "proto", "started")

    def __init__(self, proto: FastPath, keep_alive: bool) -> None:
        self.proto = proto
        self.keep_alive = keep_alive
        self.started = False
        self.complete = False
        self.chunked = False
        self.pending_head = b""

    async def start(self, status: int, reason: bytes, headers: Headers, length: int | None) -> None:
        parts = [b"HTTP/1.1 %d %s\r\n" % (status, reason or REASON_PHRASES.get(status, b"Unknown"))]
        parts.extend(k + b": " + v + b"\r\n" for k, v in headers)
        if length is not None:
            parts.append(b"Content-Length: %d\r\n" % length)
        else:
            self.chunked = True
            parts.append(b"Transfer-Encoding: chunked\r\n")
        if not self.keep_alive:
            parts.append(b"Connection: close\r\n")
        parts.append(b"\r\n")
        self.pending_head = b"".join(parts)
        self.started = True

    async def write(self, data: bytes) -> None:
        if not data:
            return
        if self.chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        if self.pending_head:
            data = self.pending_head + data
            self.pending_head = b""
        proto = self.proto
        proto.write(data)
        if proto.paused:
            await proto.drain()

    async def finish(self) -> None:
        out = self.pending_head + (b"0\r\n\r\n" if self.chunked else b"")
        self.pending_head = b""
        if out:
            self.proto.write(out)
        self.complete = True

    def abort(self) -> None:
        self.proto._close()
