"""Shared by every discovery source: the source interface, the settings, stats, backoff.


Every source has the same shape (``DiscoverySource``): ``run(publish)`` runs until cancelled and
calls ``publish(full_current_set)`` once at start and then whenever its set changes. A source
publishes its *whole* set each time, never a delta, so the consumer only diffs successive sets and
a missed call can never leave it with a stale member. Transient failures (DNS timeouts, API server
restarts, an expired token) never escape ``run``: they are logged, counted in ``source.stats``,
retried with capped exponential backoff, and the last good set stays published meanwhile; a
replica is removed only when the authority says so, not because we briefly could not ask.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

import msgspec

from router.types import ReplicaSpec

log = logging.getLogger("kvrouter.discovery")

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
    static_prefill: list[str] = []  # prefill-role replicas (--prefill)
    static_decode: list[str] = []  # decode-role replicas (--decode)
    dns_name: str = ""  # e.g. vllm.inference.svc.cluster.local (a headless Service)
    dns_prefill_name: str = ""  # one name per PD pool: its replicas get role prefill
    dns_decode_name: str = ""  # ... and decode
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
        if self.static or self.static_prefill or self.static_decode:
            kinds.append("static")
        if self.dns_name or self.dns_prefill_name or self.dns_decode_name:
            kinds.append("dns")
        if self.k8s_service_name or self.k8s_label_selector:
            kinds.append("k8s")
        return kinds

    # Over the complexity limit on purpose: a flat checklist, one independent check per setting.
    def validate(self) -> None:  # noqa: C901
        """Raise ValueError("field=value: reason") for the first bad setting."""
        for kind in self.sources:
            if kind not in SOURCE_KINDS:
                bad_setting("sources", self.sources, f"{kind!r} is not one of {', '.join(SOURCE_KINDS)}")
        for url in (*self.static, *self.static_prefill, *self.static_decode):
            problem = http_url_problem(url)
            if problem:
                bad_setting("static", url, problem)
        if not 0 < self.dns_port < 65536:
            bad_setting("dns_port", self.dns_port, "must be in 1..65535")
        if not 0 <= self.dns_events_port < 65536:
            bad_setting("dns_events_port", self.dns_events_port, "must be in 0..65535 (0 = none)")
        if not self.dns_interval_s > 0:
            bad_setting("dns_interval_s", self.dns_interval_s, "must be > 0")
        if self.k8s_resource not in K8S_RESOURCES:
            bad_setting("k8s_resource", self.k8s_resource, f"must be one of {', '.join(K8S_RESOURCES)}")
        if not self.k8s_port_name:
            bad_setting("k8s_port_name", self.k8s_port_name, "must name the replica's HTTP port")
        if self.k8s_watch_timeout_s < 1:
            bad_setting("k8s_watch_timeout_s", self.k8s_watch_timeout_s, "must be >= 1")
        if not self.backoff_initial_s > 0:
            bad_setting("backoff_initial_s", self.backoff_initial_s, "must be > 0")
        if self.backoff_max_s < self.backoff_initial_s:
            bad_setting(
                "backoff_max_s",
                self.backoff_max_s,
                f"must be >= backoff_initial_s ({self.backoff_initial_s})",
            )
        kinds = self.enabled_sources()
        if "static" in kinds and not (self.static or self.static_prefill or self.static_decode):
            bad_setting("static", self.static, "the static source needs at least one URL")
        if "dns" in kinds and not (self.dns_name or self.dns_prefill_name or self.dns_decode_name):
            bad_setting("dns_name", self.dns_name, "the dns source needs a name to resolve")
        if "k8s" in kinds:
            if self.k8s_resource == "pods" and not self.k8s_label_selector:
                bad_setting(
                    "k8s_label_selector", self.k8s_label_selector, "k8s_resource=pods needs a label selector"
                )
            if not (self.k8s_service_name or self.k8s_label_selector):
                bad_setting("k8s_service_name", self.k8s_service_name, "set it or k8s_label_selector")
            if self.k8s_api_url and urlsplit(self.k8s_api_url).scheme not in ("http", "https"):
                bad_setting("k8s_api_url", self.k8s_api_url, "expected an http(s):// URL")


def http_url_problem(url: str) -> str | None:
    """Why ``url`` is not a usable replica base URL, or None: the one check for backend URLs."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "expected an http(s)://host[:port] URL"
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        return "invalid port"
    return None


def bad_setting(field_name: str, value: object, reason: str) -> None:
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


class Changes:
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


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def replica_spec(
    host: str,
    port: int,
    events_port: int | None,
    replay_port: int | None = None,
    name: str | None = None,
    role: str = "both",
) -> ReplicaSpec:
    return ReplicaSpec(
        url=f"http://{host_port(host, port)}",
        name=name,
        kv_events=f"tcp://{host_port(host, events_port)}" if events_port else None,
        kv_replay=f"tcp://{host_port(host, replay_port)}" if replay_port else None,
        role=role,
    )
