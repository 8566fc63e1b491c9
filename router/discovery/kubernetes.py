"""Where replicas come from: a static list, DNS (a headless Service), or the Kubernetes API.

Every source has the same shape (``DiscoverySource``): ``run(publish)`` runs until cancelled and
calls ``publish(full_current_set)`` once at start and then whenever its set changes. A source
publishes its *whole* set each time, never a delta, so the consumer only diffs successive sets and
a missed call can never leave it with a stale member. Transient failures (DNS timeouts, API server
restarts, an expired token) never escape ``run``: they are logged, counted in ``source.stats``,
retried with capped exponential backoff, and the last good set stays published meanwhile; a
replica is removed only when the authority says so, not because we briefly could not ask.

Kubernetes (``KubernetesSource``) follows the API's list-then-watch contract:
  LIST  -> the full set + the list's ``metadata.resourceVersion`` (RV)
  WATCH ?watch=1&resourceVersion=RV&allowWatchBookmarks=true&timeoutSeconds=N
        -> newline-delimited ``{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": ...}``
  Every event (bookmarks included) moves RV forward; a dropped or timed-out watch resumes from
  the last RV without re-listing; "410 Gone" (as the HTTP status or as an ERROR event carrying a
  Status with code 410) means RV fell out of the server's history: LIST again and rebuild.
RVs are opaque strings: we only store and send them back, never compare or order them.

Sizes: the Kubernetes source keeps one small tuple of ReplicaSpecs per watched object, so memory
is O(endpoints); each event rebuilds the union, O(endpoints), which is fine for fleets of
hundreds (events arrive at human rates, not per request).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp
import msgspec

from router.types import ReplicaSpec

log = logging.getLogger("kvrouter.discovery")

Publish = Callable[[Sequence[ReplicaSpec]], None]

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# Pod annotations read in `k8s_resource="pods"` mode. Value: a ZMQ endpoint; an empty host or
# "*" means "this pod's IP", so one pod template works for every replica ("tcp://:5557").
ANNOTATION_KV_EVENTS = "kvrouter.io/kv-events"
ANNOTATION_KV_REPLAY = "kvrouter.io/kv-replay"

SOURCE_KINDS = ("static", "dns", "k8s")
K8S_RESOURCES = ("endpointslices", "pods")
# A watch line is one serialized object; etcd caps objects at ~1.5 MiB, so 8 MiB only trips on a
# broken stream, and it keeps a runaway line from eating memory.
MAX_WATCH_LINE = 8 << 20


class DiscoverySource(Protocol):
    name: str

    async def run(self, publish: Publish) -> None:
        """Runs until cancelled. Calls publish(full_current_set) whenever the set changes
        (and once at start). Never raises on transient errors: logs, counts, retries with backoff."""
        ...


class DiscoveryConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Discovery settings. Empty strings mean "not set"; see ``validate`` for what each source needs."""

    # Which sources to run. Empty: every source whose settings are given (static if `static`,
    # dns if `dns_name`, k8s if `k8s_service_name` or `k8s_label_selector`).
    sources: list[str] = []
    static: list[str] = []  # backend base URLs, e.g. http://10.0.0.5:8000
    dns_name: str = ""  # e.g. vllm.inference.svc.cluster.local (a headless Service)
    dns_port: int = 8000  # HTTP port for A/AAAA results (SRV carries its own)
    dns_events_port: int = 0  # KV-events port for A/AAAA results; 0: ask the replica
    dns_srv: bool = False  # query _<k8s_port_name>._tcp.<dns_name> SRV records for ports
    dns_interval_s: float = 5.0
    dns_nameservers: list[str] = []  # SRV only: "ip" or "ip:port"; empty: /etc/resolv.conf
    k8s_namespace: str = ""  # empty: the pod's own namespace (service-account file)
    k8s_label_selector: str = ""  # empty: kubernetes.io/service-name=<k8s_service_name>
    k8s_service_name: str = ""
    k8s_port_name: str = "http"
    k8s_events_port_name: str = "kv-events"
    k8s_replay_port_name: str = "kv-replay"
    k8s_resource: str = "endpointslices"
    k8s_api_url: str = ""  # empty: https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT
    k8s_token_path: str = f"{SERVICE_ACCOUNT_DIR}/token"
    k8s_ca_path: str = f"{SERVICE_ACCOUNT_DIR}/ca.crt"
    k8s_namespace_path: str = f"{SERVICE_ACCOUNT_DIR}/namespace"
    k8s_watch_timeout_s: int = 300  # server-side timeoutSeconds of one watch request
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0

    def enabled_sources(self) -> list[str]:
        if self.sources:
            return list(self.sources)
        kinds = []
        if self.static:
            kinds.append("static")
        if self.dns_name:
            kinds.append("dns")
        if self.k8s_service_name or self.k8s_label_selector:
            kinds.append("k8s")
        return kinds

    def validate(self) -> None:
        """Raise ValueError("field=value: reason") for the first bad setting."""
        for kind in self.sources:
            if kind not in SOURCE_KINDS:
                _bad("sources", self.sources, f"{kind!r} is not one of {', '.join(SOURCE_KINDS)}")
        for url in self.static:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                _bad("static", url, "expected an http(s)://host[:port] URL")
        if not 0 < self.dns_port < 65536:
            _bad("dns_port", self.dns_port, "must be in 1..65535")
        if not 0 <= self.dns_events_port < 65536:
            _bad("dns_events_port", self.dns_events_port, "must be in 0..65535 (0 = none)")
        if not self.dns_interval_s > 0:
            _bad("dns_interval_s", self.dns_interval_s, "must be > 0")
        if self.k8s_resource not in K8S_RESOURCES:
            _bad("k8s_resource", self.k8s_resource, f"must be one of {', '.join(K8S_RESOURCES)}")
        if not self.k8s_port_name:
            _bad("k8s_port_name", self.k8s_port_name, "must name the replica's HTTP port")
        if self.k8s_watch_timeout_s < 1:
            _bad("k8s_watch_timeout_s", self.k8s_watch_timeout_s, "must be >= 1")
        if not self.backoff_initial_s > 0:
            _bad("backoff_initial_s", self.backoff_initial_s, "must be > 0")
        if self.backoff_max_s < self.backoff_initial_s:
            _bad("backoff_max_s", self.backoff_max_s, f"must be >= backoff_initial_s ({self.backoff_initial_s})")
        kinds = self.enabled_sources()
        if "static" in kinds and not self.static:
            _bad("static", self.static, "the static source needs at least one URL")
        if "dns" in kinds and not self.dns_name:
            _bad("dns_name", self.dns_name, "the dns source needs a name to resolve")
        if "k8s" in kinds:
            if self.k8s_resource == "pods" and not self.k8s_label_selector:
                _bad("k8s_label_selector", self.k8s_label_selector, "k8s_resource=pods needs a label selector")
            if not (self.k8s_service_name or self.k8s_label_selector):
                _bad("k8s_service_name", self.k8s_service_name, "set it or k8s_label_selector")
            if self.k8s_api_url and urlsplit(self.k8s_api_url).scheme not in ("http", "https"):
                _bad("k8s_api_url", self.k8s_api_url, "expected an http(s):// URL")


def _bad(field_name: str, value: object, reason: str) -> None:
    raise ValueError(f"{field_name}={value!r}: {reason}")


@dataclass(slots=True)
class DiscoveryStats:
    """Counters a source keeps for the metrics layer (exported there, named there)."""

    publishes: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # by kind, e.g. "resolve", "http_401"
    lists: int = 0  # Kubernetes LIST calls (1 at start, +1 per 410 Gone)
    watches: int = 0  # Kubernetes WATCH requests opened
    gone: int = 0  # 410 Gone answers (history compacted past our RV)
    bookmarks: int = 0
    last_change: float = 0.0  # time.time() of the last publish

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


class _Changes:
    """Publishes a source's set only when it differs from the last one published (order-free)."""

    def __init__(self, publish: Publish, stats: DiscoveryStats) -> None:
        self._publish = publish
        self._stats = stats
        self._last: tuple[ReplicaSpec, ...] | None = None

    def offer(self, specs: Iterable[ReplicaSpec]) -> bool:
        ordered = tuple(sorted(set(specs), key=lambda s: (s.id, s.url)))
        if ordered == self._last:
            return False
        self._last = ordered
        self._stats.publishes += 1
        self._stats.last_change = time.time()
        self._publish(list(ordered))
        return True

    def offer_initial_empty(self) -> None:
        """Keep the "publish once at start" promise when the first attempt failed."""
        if self._last is None:
            self.offer(())


class Backoff:
    """Capped exponential backoff with full jitter, so a fleet of routers that lost the API
    server at the same moment does not come back in lockstep."""

    def __init__(self, initial_s: float, max_s: float, rng: random.Random) -> None:
        self._initial = initial_s
        self._max = max_s
        self._rng = rng
        self._attempt = 0

    def next_delay(self) -> float:
        cap = min(self._max, self._initial * (2**self._attempt))
        self._attempt = min(self._attempt + 1, 30)
        return self._initial / 2 + self._rng.uniform(0, cap - self._initial / 2)

    def reset(self) -> None:
        self._attempt = 0


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _spec(host: str, port: int, events_port: int | None, replay_port: int | None = None,
          name: str | None = None) -> ReplicaSpec:
    return ReplicaSpec(
        url=f"http://{_host_port(host, port)}",
        name=name,
        kv_events=f"tcp://{_host_port(host, events_port)}" if events_port else None,
        kv_replay=f"tcp://{_host_port(host, replay_port)}" if replay_port else None,
    )


# ---------------------------------------------------------------------------------------- static


class StaticSource:
    """A fixed list: published once, then idle until cancelled."""

    name = "static"

    def __init__(self, specs: Sequence[ReplicaSpec]) -> None:
        self.specs = list(specs)
        self.stats = DiscoveryStats()

    async def run(self, publish: Publish) -> None:
        _Changes(publish, self.stats).offer(self.specs)
        await asyncio.Event().wait()


# ------------------------------------------------------------------------------------------- DNS

# (name, port) -> addresses. Injected so tests need no DNS server for the A/AAAA path.
HostResolver = Callable[[str, int], Awaitable[list[str]]]
# SRV name -> [(target, port)], [] when the name has no SRV records.
SrvResolver = Callable[[str], Awaitable[list[tuple[str, int]]]]


async def resolve_host(host: str, port: int) -> list[str]:
    """A and AAAA through the event loop's resolver (getaddrinfo in a thread; honours /etc/hosts
    and the pod's resolv.conf search path, exactly what the engines' own clients see)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


class AiodnsSrvResolver:
    """SRV lookups through aiodns (c-ares); Python's stdlib has no SRV query.

    Imported lazily so the other sources work without aiodns installed."""

    def __init__(self, nameservers: Sequence[str] = (), timeout_s: float = 2.0) -> None:
        import aiodns

        self._resolver = aiodns.DNSResolver(
            nameservers=list(nameservers) or None, timeout=timeout_s, tries=2
        )

    async def __call__(self, name: str) -> list[tuple[str, int]]:
        import aiodns
        import pycares

        try:
            result = await self._resolver.query_dns(name, "SRV")
        except aiodns.error.DNSError as exc:
            # "no such name" / "no data" is an answer (no endpoints), not a failure.
            if exc.args and exc.args[0] in (aiodns.error.ARES_ENOTFOUND, aiodns.error.ARES_ENODATA):
                return []
            raise
        out = []
        for record in result.answer:
            data = record.data
            if isinstance(data, pycares.SRVRecordData):
                out.append((data.target.rstrip("."), data.port))
        return out

    async def close(self) -> None:
        await self._resolver.close()


class DnsSource:
    """Re-resolves a (headless Service) name every `dns_interval_s`; publishes only on change.

    A/AAAA mode: every address x `dns_port` (+ `dns_events_port`). SRV mode: the targets and ports
    of `_<k8s_port_name>._tcp.<dns_name>`, and the KV-events port from
    `_<k8s_events_port_name>._tcp.<dns_name>` (Kubernetes publishes one SRV name per named port of a
    headless Service), each target then resolved to addresses. Any failure keeps the last good set.
    """

    name = "dns"

    def __init__(
        self,
        cfg: DiscoveryConfig,
        *,
        resolver: HostResolver = resolve_host,
        srv_resolver: SrvResolver | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self.stats = DiscoveryStats()
        self._resolver = resolver
        self._srv_resolver = srv_resolver
        self._backoff = Backoff(cfg.backoff_initial_s, max(cfg.backoff_max_s, cfg.dns_interval_s),
                                rng or random.Random())

    async def resolve_once(self) -> list[ReplicaSpec]:
        cfg = self.cfg
        if not cfg.dns_srv:
            hosts = await self._resolver(cfg.dns_name, cfg.dns_port)
            return [_spec(h, cfg.dns_port, cfg.dns_events_port or None) for h in hosts]
        assert self._srv_resolver is not None
        base = cfg.dns_name.rstrip(".")
        http = await self._srv_resolver(f"_{cfg.k8s_port_name}._tcp.{base}")
        events = dict(await self._srv_resolver(f"_{cfg.k8s_events_port_name}._tcp.{base}"))
        specs = []
        for target, port in http:
            for host in await self._resolver(target, port):
                specs.append(_spec(host, port, events.get(target)))
        return specs

    async def run(self, publish: Publish) -> None:
        changes = _Changes(publish, self.stats)
        owned: AiodnsSrvResolver | None = None
        if self.cfg.dns_srv and self._srv_resolver is None:
            owned = AiodnsSrvResolver(self.cfg.dns_nameservers)
            self._srv_resolver = owned
        try:
            while True:
                delay = self.cfg.dns_interval_s
                try:
                    changes.offer(await self.resolve_once())
                    self._backoff.reset()
                except Exception as exc:
                    # Resolvers raise their own types (socket.gaierror, aiodns.error.DNSError, ...)
                    # and one failed round is transient by contract. CancelledError is not an
                    # Exception, so cancellation still stops the loop.
                    self.stats.error("resolve")
                    log.warning("dns discovery: resolving %s failed (%s); keeping the last set",
                                self.cfg.dns_name, exc)
                    changes.offer_initial_empty()
                    delay = min(delay, self._backoff.next_delay())
                await asyncio.sleep(delay)
        finally:
            if owned is not None:
                self._srv_resolver = None
                await owned.close()


# ------------------------------------------------------------------------------------ Kubernetes
# Views of the API objects: only the fields discovery reads are decoded (msgspec ignores the rest).


class _Meta(msgspec.Struct, frozen=True, rename="camel"):
    name: str = ""
    resource_version: str = ""
    annotations: dict[str, str] | None = None
    deletion_timestamp: str | None = None


class _ListMeta(msgspec.Struct, frozen=True, rename="camel"):
    resource_version: str = ""


class _TargetRef(msgspec.Struct, frozen=True):
    kind: str = ""
    name: str = ""


class _Conditions(msgspec.Struct, frozen=True):
    ready: bool | None = None  # nil means ready (API contract)
    serving: bool | None = None
    terminating: bool | None = None


class _Endpoint(msgspec.Struct, frozen=True, rename="camel"):
    addresses: list[str] = []
    conditions: _Conditions = _Conditions()
    target_ref: _TargetRef | None = None


class _Port(msgspec.Struct, frozen=True):
    name: str | None = None
    port: int | None = None


class _EndpointSlice(msgspec.Struct, frozen=True, rename="camel"):
    metadata: _Meta = _Meta()
    address_type: str = "IPv4"
    endpoints: list[_Endpoint] | None = None
    ports: list[_Port] | None = None


class _ContainerPort(msgspec.Struct, frozen=True, rename="camel"):
    name: str | None = None
    container_port: int = 0


class _Container(msgspec.Struct, frozen=True):
    ports: list[_ContainerPort] | None = None


class _PodSpec(msgspec.Struct, frozen=True):
    containers: list[_Container] = []


class _PodCondition(msgspec.Struct, frozen=True):
    type: str = ""
    status: str = ""


class _PodStatus(msgspec.Struct, frozen=True):
    phase: str = ""
    pod_ip: str | None = msgspec.field(default=None, name="podIP")
    conditions: list[_PodCondition] | None = None


class _Pod(msgspec.Struct, frozen=True):
    metadata: _Meta = _Meta()
    spec: _PodSpec = _PodSpec()
    status: _PodStatus = _PodStatus()


class _List(msgspec.Struct, frozen=True):
    metadata: _ListMeta = _ListMeta()
    items: list[msgspec.Raw] = []


class _Status(msgspec.Struct, frozen=True):
    code: int = 0
    reason: str = ""
    message: str = ""


class _WatchEvent(msgspec.Struct, frozen=True):
    type: str
    object: msgspec.Raw = msgspec.Raw(b"{}")


class _Bookmark(msgspec.Struct, frozen=True):
    metadata: _ListMeta = _ListMeta()


_decode_event = msgspec.json.Decoder(_WatchEvent).decode
_decode_list = msgspec.json.Decoder(_List).decode
_decode_slice = msgspec.json.Decoder(_EndpointSlice).decode
_decode_pod = msgspec.json.Decoder(_Pod).decode
_decode_status = msgspec.json.Decoder(_Status).decode
_decode_bookmark = msgspec.json.Decoder(_Bookmark).decode
# Dual-stack Services have one IPv4 and one IPv6 slice naming the same pods: when a pod appears in
# both, its IPv4 address wins (one replica per pod, never two ids for one engine).
_ADDRESS_RANK = {"IPv4": 0, "IPv6": 1}


class _Gone(Exception):
    """The watch's resourceVersion is older than the server's history: re-LIST."""


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def slice_replicas(s: _EndpointSlice, cfg: DiscoveryConfig) -> tuple[ReplicaSpec, ...]:
    """Ready, non-terminating endpoints of one EndpointSlice, named after their pod."""
    if s.address_type not in _ADDRESS_RANK:  # FQDN slices: semantics undefined, kube-proxy skips them too
        return ()
    ports = {p.name or "": p.port for p in s.ports or () if p.port}
    http_port = ports.get(cfg.k8s_port_name)
    if http_port is None:
        return ()
    events_port = ports.get(cfg.k8s_events_port_name)
    replay_port = ports.get(cfg.k8s_replay_port_name)
    out = []
    for ep in s.endpoints or ():
        cond = ep.conditions
        if cond.ready is False or cond.terminating is True or not ep.addresses:
            continue
        name = ep.target_ref.name if ep.target_ref and ep.target_ref.kind == "Pod" and ep.target_ref.name else None
        # The API says an endpoint's addresses are fungible and controllers set exactly one.
        out.append(_spec(ep.addresses[0], http_port, events_port, replay_port, name))
    return tuple(out)


def _annotation_endpoint(value: str | None, pod_ip: str) -> str | None:
    if not value:
        return None
    parts = urlsplit(value)
    if parts.scheme != "tcp" or parts.port is None:
        raise ValueError(f"{value!r} is not tcp://[host]:port")
    host = parts.hostname
    if not host or host == "*":
        host = pod_ip
    return f"tcp://{_host_port(host, parts.port)}"


def pod_replicas(p: _Pod, cfg: DiscoveryConfig, annotations: bool = True) -> tuple[ReplicaSpec, ...]:
    """A Running, Ready, not-deleting pod with an IP and the named HTTP container port.

    The kvrouter.io/kv-* annotations override the named ports; a malformed one raises ValueError
    (the caller counts it and retries with ``annotations=False``)."""
    st = p.status
    ready = any(c.type == "Ready" and c.status == "True" for c in st.conditions or ())
    if st.phase != "Running" or not ready or not st.pod_ip or p.metadata.deletion_timestamp:
        return ()
    ports: dict[str, int] = {}
    for c in p.spec.containers:
        for cp in c.ports or ():
            if cp.name and cp.container_port:
                ports.setdefault(cp.name, cp.container_port)
    http_port = ports.get(cfg.k8s_port_name)
    if http_port is None:
        return ()
    ann = (p.metadata.annotations or {}) if annotations else {}
    base = _spec(st.pod_ip, http_port, ports.get(cfg.k8s_events_port_name),
                 ports.get(cfg.k8s_replay_port_name), p.metadata.name or None)
    kv_events = _annotation_endpoint(ann.get(ANNOTATION_KV_EVENTS), st.pod_ip) or base.kv_events
    kv_replay = _annotation_endpoint(ann.get(ANNOTATION_KV_REPLAY), st.pod_ip) or base.kv_replay
    return (ReplicaSpec(url=base.url, name=base.name, kv_events=kv_events, kv_replay=kv_replay),)


def in_cluster_api_url(environ: Mapping[str, str]) -> str:
    host = environ.get("KUBERNETES_SERVICE_HOST", "")
    port = environ.get("KUBERNETES_SERVICE_PORT", "443")
    return f"https://{_host_port(host, int(port))}" if host else ""


class KubernetesSource:
    """List + watch EndpointSlices (or Pods) of one namespace, by label selector."""

    name = "k8s"

    def __init__(self, cfg: DiscoveryConfig, *, api_url: str, namespace: str,
                 rng: random.Random | None = None, min_watch_s: float = 1.0) -> None:
        self.cfg = cfg
        self.api_url = api_url.rstrip("/")
        self.namespace = namespace
        self.stats = DiscoveryStats()
        self.resource_version: str | None = None  # last RV seen (None: must LIST)
        self._backoff = Backoff(cfg.backoff_initial_s, cfg.backoff_max_s, rng or random.Random())
        # A watch that ends cleanly but sooner than this (and empty) is treated like an error, so a
        # misbehaving server cannot spin us in a tight reconnect loop.
        self._min_watch_s = min_watch_s
        self._objects: dict[str, tuple[int, tuple[ReplicaSpec, ...]]] = {}
        selector = cfg.k8s_label_selector or f"kubernetes.io/service-name={cfg.k8s_service_name}"
        self.selector = selector
        if cfg.k8s_resource == "pods":
            self.path = f"/api/v1/namespaces/{namespace}/pods"
        else:
            self.path = f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"

    # -- state ------------------------------------------------------------------------------------

    def _decode_object(self, raw: bytes) -> tuple[str, str, int, tuple[ReplicaSpec, ...]]:
        """-> (object name, its RV, address rank, replicas)."""
        if self.cfg.k8s_resource == "pods":
            pod = _decode_pod(raw)
            try:
                specs = pod_replicas(pod, self.cfg)
            except ValueError as exc:
                self.stats.error("annotation")
                log.warning("k8s discovery: pod %s: bad annotation %s; ignoring it", pod.metadata.name, exc)
                specs = pod_replicas(pod, self.cfg, annotations=False)
            return pod.metadata.name, pod.metadata.resource_version, 0, specs
        s = _decode_slice(raw)
        rank = _ADDRESS_RANK.get(s.address_type, 2)
        return s.metadata.name, s.metadata.resource_version, rank, slice_replicas(s, self.cfg)

    def replicas(self) -> list[ReplicaSpec]:
        """The union over all objects, one replica per id (IPv4 slices first)."""
        seen: set[str] = set()
        out = []
        for _, (_rank, specs) in sorted(self._objects.items(), key=lambda kv: (kv[1][0], kv[0])):
            for spec in specs:
                if spec.id not in seen:
                    seen.add(spec.id)
                    out.append(spec)
        return out

    # -- HTTP -------------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        # Re-read on every request: projected service-account tokens are rotated by the kubelet
        # (about hourly), and a long-lived router must pick up the new one.
        headers = {"Accept": "application/json"}
        try:
            with open(self.cfg.k8s_token_path, encoding="utf-8") as f:
                token = f.read().strip()
        except FileNotFoundError:
            token = ""  # e.g. `kubectl proxy` on loopback, which authenticates for us
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def _ssl(self) -> ssl.SSLContext | bool:
        if not self.api_url.startswith("https:"):
            return True
        if os.path.exists(self.cfg.k8s_ca_path):
            return ssl.create_default_context(cafile=self.cfg.k8s_ca_path)
        return ssl.create_default_context()

    async def _raise_for_status(self, resp: aiohttp.ClientResponse) -> None:
        if resp.status == 200:
            return
        body = await resp.read()
        message = body[:200].decode("utf-8", "replace")
        with contextlib.suppress(msgspec.DecodeError):
            message = _decode_status(body).message or message
        if resp.status == 410:
            raise _Gone(message)
        raise ApiError(resp.status, message)

    async def _list(self, session: aiohttp.ClientSession) -> str:
        self.stats.lists += 1
        params = {"labelSelector": self.selector}
        async with session.get(self.api_url + self.path, params=params, headers=self._headers(),
                               timeout=aiohttp.ClientTimeout(total=30)) as resp:
            await self._raise_for_status(resp)
            lst = _decode_list(await resp.read())
        objects = {}
        for raw in lst.items:
            name, _rv, rank, specs = self._decode_object(raw)
            objects[name] = (rank, specs)
        self._objects = objects
        if not lst.metadata.resource_version:
            raise ApiError(200, "LIST response has no metadata.resourceVersion")
        return lst.metadata.resource_version

    async def _watch(self, session: aiohttp.ClientSession, changes: _Changes) -> int:
        """One WATCH request from self.resource_version until the server ends it. -> events seen."""
        assert self.resource_version is not None
        self.stats.watches += 1
        params = {
            "labelSelector": self.selector,
            "watch": "1",
            "resourceVersion": self.resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(self.cfg.k8s_watch_timeout_s),
        }
        # sock_read bounds silence: the server ends the watch at timeoutSeconds, so anything much
        # longer than that without a byte is a dead connection (e.g. a vanished node).
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10,
                                        sock_read=self.cfg.k8s_watch_timeout_s + 30)
        events = 0
        async with session.get(self.api_url + self.path, params=params, headers=self._headers(),
                               timeout=timeout) as resp:
            await self._raise_for_status(resp)
            buf = bytearray()
            async for chunk in resp.content.iter_any():
                buf += chunk
                while (nl := buf.find(b"\n")) >= 0:
                    line = bytes(buf[:nl])
                    del buf[: nl + 1]
                    if line.strip():
                        self._apply(line, changes)
                        events += 1
                if len(buf) > MAX_WATCH_LINE:
                    raise ApiError(200, f"watch line longer than {MAX_WATCH_LINE} bytes")
            if buf.strip():
                self._apply(bytes(buf), changes)
                events += 1
        return events

    def _apply(self, line: bytes, changes: _Changes) -> None:
        ev = _decode_event(line)
        if ev.type == "ERROR":
            status = _decode_status(ev.object)
            if status.code == 410:
                raise _Gone(status.message)
            raise ApiError(status.code, status.message or status.reason)
        if ev.type == "BOOKMARK":
            # A bookmark carries only an RV: nothing changed for us up to there, so resuming from
            # it skips replaying everyone else's events (and avoids 410s on quiet selectors).
            self.stats.bookmarks += 1
            rv = _decode_bookmark(ev.object).metadata.resource_version
        else:
            name, rv, rank, specs = self._decode_object(ev.object)
            if ev.type in ("ADDED", "MODIFIED"):
                self._objects[name] = (rank, specs)
            elif ev.type == "DELETED":
                self._objects.pop(name, None)
            else:
                raise ApiError(200, f"unknown watch event type {ev.type!r}")
            changes.offer(self.replicas())
        if rv:
            self.resource_version = rv

    # -- loop -------------------------------------------------------------------------------------

    async def run(self, publish: Publish) -> None:
        changes = _Changes(publish, self.stats)
        connector = aiohttp.TCPConnector(ssl=self._ssl(), limit=2)
        gone_in_a_row = 0
        async with aiohttp.ClientSession(connector=connector) as session:
            while True:
                try:
                    if self.resource_version is None:
                        self.resource_version = await self._list(session)
                        changes.offer(self.replicas())
                    started = time.monotonic()
                    events = await self._watch(session, changes)
                    gone_in_a_row = 0
                    if events == 0 and time.monotonic() - started < self._min_watch_s:
                        await asyncio.sleep(self._backoff.next_delay())
                    else:
                        self._backoff.reset()
                except _Gone as exc:
                    self.stats.gone += 1
                    gone_in_a_row += 1
                    log.info("k8s discovery: resourceVersion %s expired (%s); re-listing",
                             self.resource_version, exc)
                    self.resource_version = None
                    # Re-list at once after a watch expired; back off only if the server keeps
                    # answering Gone without a watch succeeding in between.
                    if gone_in_a_row > 1:
                        await asyncio.sleep(self._backoff.next_delay())
                except (aiohttp.ClientError, TimeoutError, OSError, ApiError,
                        msgspec.DecodeError, msgspec.ValidationError) as exc:
                    kind = f"http_{exc.status}" if isinstance(exc, ApiError) else type(exc).__name__
                    self.stats.error(kind)
                    delay = self._backoff.next_delay()
                    log.warning("k8s discovery: %s %s failed: %s; retrying in %.1fs from RV %s",
                                self.cfg.k8s_resource, self.selector, exc, delay, self.resource_version)
                    changes.offer_initial_empty()
                    await asyncio.sleep(delay)


# ----------------------------------------------------------------------------------------- build


def build_sources(config: DiscoveryConfig, environ: Mapping[str, str] | None = None) -> list[DiscoverySource]:
    """Validate `config` and make its sources. `environ` defaults to os.environ (in-cluster API url)."""
    config.validate()
    env = os.environ if environ is None else environ
    sources: list[DiscoverySource] = []
    for kind in config.enabled_sources():
        if kind == "static":
            sources.append(StaticSource([ReplicaSpec(url=u.rstrip("/")) for u in config.static]))
        elif kind == "dns":
            if config.dns_srv:
                _require_aiodns()
            sources.append(DnsSource(config))
        else:
            api_url = config.k8s_api_url or in_cluster_api_url(env)
            if not api_url:
                _bad("k8s_api_url", config.k8s_api_url,
                     "not set and KUBERNETES_SERVICE_HOST is not in the environment (not in a pod?)")
            namespace = config.k8s_namespace or _read_namespace(config.k8s_namespace_path)
            sources.append(KubernetesSource(config, api_url=api_url, namespace=namespace))
    return sources


def _read_namespace(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            namespace = f.read().strip()
    except OSError as exc:
        raise ValueError(f"k8s_namespace='': not set and {path} is unreadable ({exc})") from exc
    if not namespace:
        _bad("k8s_namespace", "", f"not set and {path} is empty")
    return namespace


def _require_aiodns() -> None:
    try:
        import aiodns  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"dns_srv=True: SRV lookups need the aiodns package ({exc})") from exc


__all__: list[str] = [
    "ANNOTATION_KV_EVENTS",
    "ANNOTATION_KV_REPLAY",
    "AiodnsSrvResolver",
    "ApiError",
    "Backoff",
    "DiscoveryConfig",
    "DiscoverySource",
    "DiscoveryStats",
    "DnsSource",
    "KubernetesSource",
    "StaticSource",
    "build_sources",
    "in_cluster_api_url",
    "resolve_host",
]
