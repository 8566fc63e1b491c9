"""Where replicas come from: a static list, DNS (a headless Service), or the Kubernetes API.

Every source has the same shape (``DiscoverySource``): ``run(publish)`` runs until cancelled and
calls ``publish(full_current_set)`` once at start and then whenever its set changes. A source
publishes its *whole* set each time, never a delta, so the consumer only diffs successive sets and
a missed call can never leave it with a stale member. Transient failures (DNS timeouts, API server
restarts, an expired token) never escape ``run``: they are logged, counted in ``source.stats``,
retried with capped exponential backoff, and the last good set stays published meanwhile; a
replica is removed only when the authority says so, not because we briefly could not ask.

The sources live in static.py, dns.py and kubernetes.py; base.py holds what they share
(the interface, ``DiscoveryConfig``, stats, backoff); ``build_sources`` here picks and builds them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import msgspec

from router.discovery.base import (
    ANNOTATION_KV_EVENTS,
    ANNOTATION_KV_REPLAY,
    Backoff,
    DiscoveryConfig,
    DiscoverySource,
    DiscoveryStats,
    bad_setting,
    http_url_problem,
)
from router.discovery.dns import AiodnsSrvResolver, DnsSource, resolve_host
from router.discovery.kubernetes import ApiError, KubernetesSource, in_cluster_api_url
from router.discovery.static import StaticSource
from router.types import ReplicaSpec

log = logging.getLogger("kvrouter.discovery")


def build_sources(config: DiscoveryConfig, environ: Mapping[str, str] | None = None) -> list[DiscoverySource]:
    """Validate `config` and make its sources. `environ` defaults to os.environ (in-cluster API url)."""
    config.validate()
    env = os.environ if environ is None else environ
    sources: list[DiscoverySource] = []
    for kind in config.enabled_sources():
        if kind == "static":
            specs = [ReplicaSpec(url=u.rstrip("/")) for u in config.static]
            specs += [ReplicaSpec(url=u.rstrip("/"), role="prefill") for u in config.static_prefill]
            specs += [ReplicaSpec(url=u.rstrip("/"), role="decode") for u in config.static_decode]
            sources.append(StaticSource(specs))
        elif kind == "dns":
            if config.dns_srv:
                _require_aiodns()
            # one name per pool (PD): each is its own source, its replicas stamped with the role
            for dns_name, role in (
                (config.dns_name, "both"),
                (config.dns_prefill_name, "prefill"),
                (config.dns_decode_name, "decode"),
            ):
                if dns_name:
                    sources.append(DnsSource(msgspec.structs.replace(config, dns_name=dns_name), role=role))
        else:
            api_url = config.k8s_api_url or in_cluster_api_url(env)
            if not api_url:
                bad_setting(
                    "k8s_api_url",
                    config.k8s_api_url,
                    "not set and KUBERNETES_SERVICE_HOST is not in the environment (not in a pod?)",
                )
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
        bad_setting("k8s_namespace", "", f"not set and {path} is empty")
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
    "http_url_problem",
    "in_cluster_api_url",
    "resolve_host",
]
