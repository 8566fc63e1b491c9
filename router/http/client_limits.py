"""What one client may cost the router before it has proved anything: deadlines, buffered body
bytes, connections, request rate, log lines (issue 21, docs/reliability.md "Hostile clients").

* ``BodyBudget``: bytes of request bodies buffered across *all* connections. A request reserves
  its Content-Length once its head passed authentication and admission, and gives it back when
  it was answered; a request that does not fit gets 503 + ``Retry-After`` and its body is never
  read. Without it, N connections could each hold ``max_body_bytes`` (F1).
* ``body_deadline``: a body must arrive at a minimum rate (base seconds + length / rate), so a
  client cannot hold a reservation by trickling (F2).
* ``ClientTable``: optional per-address caps (open connections, requests per second with a
  burst), for gateways where one address is one tenant. Off by default: behind a load balancer
  every client has the balancer's address.
* ``connection_cap``: the default ``--max-connections`` from the process's descriptor limit.
* ``RejectLog`` / ``quiet_client_errors``: at most one log line per rejected request, rate
  limited, and no tracebacks for malformed requests that aiohttp's parser refused (F10).
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from router.config import ServerConfig
from router.errors import RouterError
from router.index import PrefixIndex

log = logging.getLogger("kvrouter.clients")

# Descriptors kept for everything that is not a client connection: upstream connections (one per
# request in flight), KV-event sockets, probes, files. Half of what is left goes to clients.
_FD_RESERVE = 128


def connection_cap(configured: int, nofile: int | None = None) -> int:
    """``--max-connections``: -1 (the default) sizes the cap from RLIMIT_NOFILE so a connection
    flood meets a canned 503 before the process runs out of descriptors; 0 means no cap."""
    if configured >= 0:
        return configured
    if nofile is None:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        nofile = soft if soft != resource.RLIM_INFINITY else 1 << 20
    # Each served client connection may need one upstream connection too: half the rest.
    return max(64, (nofile - _FD_RESERVE) // 2)


def body_deadline(length: int, base_s: float, min_rate: int) -> float:
    """Seconds a body of ``length`` bytes may take: ``base_s`` plus the time at ``min_rate``
    bytes/s (10 s + 1 s per 64 KiB by default: 32 MiB in at most 522 s, 100 KB in 11.5 s)."""
    return base_s + length / min_rate


class ClientMetrics:
    """Counters of what the limits turned away (one series per reason) and the budget gauge."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.rejected = Counter(
            "kvrouter_client_rejections",
            "Requests or connections refused by client limits, by reason",
            ["reason"],
            registry=registry,
        )
        self.buffered = Gauge(
            "kvrouter_buffered_body_bytes",
            "Request body bytes reserved across all connections",
            registry=registry,
        )
        self.log_suppressed = Counter(
            "kvrouter_log_lines_suppressed",
            "Rejection log lines dropped by the rate limit",
            registry=registry,
        )


class BodyBudget:
    """Bytes reserved for request bodies across all connections (0 = unlimited)."""

    __slots__ = ("gauge", "limit", "used")

    def __init__(self, limit: int, gauge: Gauge | None = None) -> None:
        self.limit = limit
        self.used = 0
        self.gauge = gauge
        if gauge is not None:
            gauge.set_function(lambda: self.used)

    def reserve(self, n: int) -> bool:
        if self.limit and self.used + n > self.limit and self.used > 0:
            return False  # an idle router always takes one request, whatever its size
        self.used += n
        return True

    def release(self, n: int) -> None:
        self.used -= n


class _Bucket:
    __slots__ = ("conns", "stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.conns = 0
        self.tokens = tokens
        self.stamp = stamp


class ClientTable:
    """Per client address: open connections and a token bucket of requests (``rate`` per second,
    ``burst`` at once). An address's entry lives while it has connections or tokens to refill;
    entries without connections are pruned as the table grows, so it is bounded by the number of
    open connections plus ``max_idle_entries``."""

    def __init__(self, max_conns: int, rate: float, burst: int, *, max_idle_entries: int = 65536) -> None:
        self.max_conns = max_conns
        self.rate = rate
        self.burst = float(max(burst, 1))
        self.max_idle = max_idle_entries
        self._by_addr: dict[str, _Bucket] = {}
        self._clock: Callable[[], float] = time.monotonic

    @property
    def enabled(self) -> bool:
        return self.max_conns > 0 or self.rate > 0

    def _entry(self, addr: str) -> _Bucket:
        b = self._by_addr.get(addr)
        if b is None:
            if len(self._by_addr) >= self.max_idle:
                self._prune()
            b = self._by_addr[addr] = _Bucket(self.burst, self._clock())
        return b

    def _prune(self) -> None:
        for addr in [a for a, b in self._by_addr.items() if b.conns == 0]:
            del self._by_addr[addr]

    def connect(self, addr: str) -> bool:
        """Count a new connection from ``addr``; False (and not counted) when over the cap."""
        b = self._entry(addr)
        if self.max_conns and b.conns >= self.max_conns:
            return False
        b.conns += 1
        return True

    def disconnect(self, addr: str) -> None:
        b = self._by_addr.get(addr)
        if b is not None and b.conns > 0:
            b.conns -= 1

    def allow_request(self, addr: str) -> bool:
        if self.rate <= 0:
            return True
        b = self._entry(addr)
        now = self._clock()
        b.tokens = min(self.burst, b.tokens + (now - b.stamp) * self.rate)
        b.stamp = now
        if b.tokens < 1.0:
            return False
        b.tokens -= 1.0
        return True


class RejectLog:
    """One INFO line per rejected request, at most ``per_s`` lines a second (burst of the same);
    the rest are counted in ``kvrouter_log_lines_suppressed_total`` and summarised once the
    limiter lets a line through again."""

    def __init__(self, per_s: float = 5.0, on_suppress: Callable[[], None] | None = None) -> None:
        self.per_s = per_s
        self.tokens = per_s
        self.stamp = time.monotonic()
        self.suppressed = 0
        self.on_suppress = on_suppress or (lambda: None)

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.per_s, self.tokens + (now - self.stamp) * self.per_s)
        self.stamp = now
        if self.tokens < 1.0:
            self.suppressed += 1
            self.on_suppress()
            return False
        self.tokens -= 1.0
        return True

    def __call__(self, reason: str, peer: object, detail: str = "") -> None:
        if not log.isEnabledFor(logging.INFO) or not self.allow():
            return
        more = f" ({self.suppressed} more suppressed)" if self.suppressed else ""
        self.suppressed = 0
        log.info("rejected client %s: %s%s%s", peer, reason, f": {detail}" if detail else "", more)


class _QuietParseErrors(logging.Filter):
    """aiohttp logs each request its parser refused (bad framing, bad bytes, bare LF) at ERROR
    with a traceback. A client mistake is not a router error: one rate-limited line instead."""

    def __init__(self, reject: RejectLog) -> None:
        super().__init__()
        self.reject = reject

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:
            return True
        from aiohttp.http_exceptions import HttpProcessingError

        if isinstance(exc, HttpProcessingError) and (exc.code or 400) < 500:
            peer = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            self.reject("bad_request_head", peer, f"{type(exc).__name__}: {exc.message}"[:200])
            return False
        return True


_installed: list[_QuietParseErrors] = []


def quiet_client_errors(reject: RejectLog) -> None:
    """Route aiohttp's per-request parse-error tracebacks through ``reject`` (idempotent)."""
    logger = logging.getLogger("aiohttp.server")
    for f in _installed:
        logger.removeFilter(f)
    _installed.clear()
    f = _QuietParseErrors(reject)
    logger.addFilter(f)
    _installed.append(f)


class ClientLimits:
    """Everything above, built once per process from ``server`` settings and shared by the fast
    path, the aiohttp middlewares and the listener."""

    def __init__(
        self,
        *,
        head_timeout_s: float,
        body_timeout_s: float,
        body_min_rate: int,
        keepalive_s: float,
        max_buffered_body_bytes: int,
        max_connections_per_client: int = 0,
        max_requests_per_client_s: float = 0.0,
        reject_log_per_s: float = 5.0,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.head_timeout_s = head_timeout_s
        self.body_timeout_s = body_timeout_s
        self.body_min_rate = body_min_rate
        self.keepalive_s = keepalive_s
        self.metrics = ClientMetrics(registry if registry is not None else CollectorRegistry())
        self.budget = BodyBudget(max_buffered_body_bytes, self.metrics.buffered)
        rate = max_requests_per_client_s
        self.clients = ClientTable(max_connections_per_client, rate, max(1, int(2 * rate)))
        self.log = RejectLog(reject_log_per_s, self.metrics.log_suppressed.inc)

    def reject(self, reason: str, peer: object, detail: str = "") -> None:
        """Count a refusal and log it (rate-limited): the one place every refusal goes through."""
        self.metrics.rejected.labels(reason).inc()
        if self.log.per_s > 0:
            self.log(reason, peer, detail)

    def body_deadline(self, length: int) -> float:
        return body_deadline(length, self.body_timeout_s, self.body_min_rate)


def client_limits_from(server: ServerConfig, registry: CollectorRegistry | None = None) -> ClientLimits:
    return ClientLimits(
        head_timeout_s=server.head_timeout_s,
        body_timeout_s=server.body_timeout_s,
        body_min_rate=server.body_min_rate,
        keepalive_s=server.keepalive_timeout_s,
        max_buffered_body_bytes=server.max_buffered_body_bytes,
        max_connections_per_client=server.max_connections_per_client,
        max_requests_per_client_s=server.max_requests_per_client_s,
        reject_log_per_s=server.reject_log_per_s,
        registry=registry,
    )


class RequestTimeout(RouterError):
    """A request head or body that did not arrive within its deadline."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class BodyBudgetExceeded(RouterError):
    """The global budget of buffered request bodies is spent: retry shortly."""

    status = 503
    type = "service_unavailable"
    code = "body_budget_exhausted"


class RoutingMemoryCollector:
    """Memory that routing decisions hold, and what its bounds dropped (F4): block hashes in
    speculative-expiry records (bounded at twice the index capacity; records of blocks already
    evicted go first), blocks evicted by the capacity bound (least recently used first)."""

    def __init__(self, index: PrefixIndex) -> None:
        self.index = index

    def collect(self) -> Iterator[Metric]:
        idx = self.index
        held = GaugeMetricFamily(
            "kvrouter_index_speculative_hashes", "Block hashes held by speculative-expiry records"
        )
        held.add_metric([], idx.spec_held)
        yield held
        dropped = CounterMetricFamily(
            "kvrouter_index_dropped_blocks",
            "Routing memory dropped by its bounds: capacity evictions (LRU first), expiry records of evicted blocks",
            labels=["what"],
        )
        dropped.add_metric(["capacity_eviction"], idx.evictions)
        dropped.add_metric(["expiry_record"], idx.spec_compacted)
        yield dropped
