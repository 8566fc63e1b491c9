"""The Kubernetes source: EndpointSlices or Pods through the API server's list-then-watch.

``KubernetesSource`` follows the API's list-then-watch contract:
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
import ssl
import time
from collections.abc import Mapping
from urllib.parse import urlsplit

import aiohttp
import msgspec

from router.discovery.base import (
    ANNOTATION_KV_EVENTS,
    ANNOTATION_KV_REPLAY,
    MAX_WATCH_LINE,
    Backoff,
    Changes,
    DiscoveryConfig,
    DiscoveryStats,
    Publish,
    host_port,
    replica_spec,
)
from router.pd.roles import role_from_labels
from router.types import ReplicaSpec

log = logging.getLogger("kvrouter.discovery")

# Views of the API objects: only the fields discovery reads are decoded (msgspec ignores the rest).


class _Meta(msgspec.Struct, frozen=True, rename="camel"):
    name: str = ""
    resource_version: str = ""
    annotations: dict[str, str] | None = None
    labels: dict[str, str] | None = None  # the PD role label (router/pd/roles.py)
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
    role = role_from_labels(s.metadata.labels)  # the EndpointSlice controller copies the Service's labels
    out = []
    for ep in s.endpoints or ():
        cond = ep.conditions
        if cond.ready is False or cond.terminating is True or not ep.addresses:
            continue
        name = (
            ep.target_ref.name
            if ep.target_ref and ep.target_ref.kind == "Pod" and ep.target_ref.name
            else None
        )
        # The API says an endpoint's addresses are fungible and controllers set exactly one.
        out.append(replica_spec(ep.addresses[0], http_port, events_port, replay_port, name, role))
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
    return f"tcp://{host_port(host, parts.port)}"


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
    base = replica_spec(
        st.pod_ip,
        http_port,
        ports.get(cfg.k8s_events_port_name),
        ports.get(cfg.k8s_replay_port_name),
        p.metadata.name or None,
    )
    kv_events = _annotation_endpoint(ann.get(ANNOTATION_KV_EVENTS), st.pod_ip) or base.kv_events
    kv_replay = _annotation_endpoint(ann.get(ANNOTATION_KV_REPLAY), st.pod_ip) or base.kv_replay
    role = role_from_labels(p.metadata.labels)
    return (ReplicaSpec(url=base.url, name=base.name, kv_events=kv_events, kv_replay=kv_replay, role=role),)


def in_cluster_api_url(environ: Mapping[str, str]) -> str:
    host = environ.get("KUBERNETES_SERVICE_HOST", "")
    port = environ.get("KUBERNETES_SERVICE_PORT", "443")
    return f"https://{host_port(host, int(port))}" if host else ""


class KubernetesSource:
    """List + watch EndpointSlices (or Pods) of one namespace, by label selector."""

    name = "k8s"

    def __init__(
        self,
        cfg: DiscoveryConfig,
        *,
        api_url: str,
        namespace: str,
        rng: random.Random | None = None,
        min_watch_s: float = 1.0,
    ) -> None:
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
        async with session.get(
            self.api_url + self.path,
            params=params,
            headers=self._headers(),
            timeout=aiohttp.ClientTimeout(total=30),
        ) as resp:
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

    async def _watch(self, session: aiohttp.ClientSession, changes: Changes) -> int:
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
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=10, sock_read=self.cfg.k8s_watch_timeout_s + 30
        )
        events = 0
        async with session.get(
            self.api_url + self.path, params=params, headers=self._headers(), timeout=timeout
        ) as resp:
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

    def _apply(self, line: bytes, changes: Changes) -> None:
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
        changes = Changes(publish, self.stats)
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
                    log.info(
                        "k8s discovery: resourceVersion %s expired (%s); re-listing",
                        self.resource_version,
                        exc,
                    )
                    self.resource_version = None
                    # Re-list at once after a watch expired; back off only if the server keeps
                    # answering Gone without a watch succeeding in between.
                    if gone_in_a_row > 1:
                        await asyncio.sleep(self._backoff.next_delay())
                except (
                    aiohttp.ClientError,
                    TimeoutError,
                    OSError,
                    ApiError,
                    msgspec.DecodeError,
                    msgspec.ValidationError,
                ) as exc:
                    kind = f"http_{exc.status}" if isinstance(exc, ApiError) else type(exc).__name__
                    self.stats.error(kind)
                    delay = self._backoff.next_delay()
                    log.warning(
                        "k8s discovery: %s %s failed: %s; retrying in %.1fs from RV %s",
                        self.cfg.k8s_resource,
                        self.selector,
                        exc,
                        delay,
                        self.resource_version,
                    )
                    changes.offer_initial_empty()
                    await asyncio.sleep(delay)
