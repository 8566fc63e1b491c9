"""The DNS source: A/AAAA (or SRV) records of a headless Service, re-resolved on an interval."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections.abc import Awaitable, Callable, Sequence

from router.discovery.base import (
    Backoff,
    Changes,
    DiscoveryConfig,
    DiscoveryStats,
    Publish,
    replica_spec,
)
from router.types import ReplicaSpec

log = logging.getLogger("kvrouter.discovery")

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

        self._resolver = aiodns.DNSResolver(nameservers=list(nameservers) or None, timeout=timeout_s, tries=2)

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
        role: str = "both",
    ) -> None:
        self.cfg = cfg
        self.role = role
        if role != "both":
            self.name = f"dns:{role}"  # publishes its own set beside the aggregated name's
        self.stats = DiscoveryStats()
        self._resolver = resolver
        self._srv_resolver = srv_resolver
        self._backoff = Backoff(
            cfg.backoff_initial_s, max(cfg.backoff_max_s, cfg.dns_interval_s), rng or random.Random()
        )

    async def resolve_once(self) -> list[ReplicaSpec]:
        cfg = self.cfg
        if not cfg.dns_srv:
            hosts = await self._resolver(cfg.dns_name, cfg.dns_port)
            return [replica_spec(h, cfg.dns_port, cfg.dns_events_port or None, role=self.role) for h in hosts]
        assert self._srv_resolver is not None
        base = cfg.dns_name.rstrip(".")
        http = await self._srv_resolver(f"_{cfg.k8s_port_name}._tcp.{base}")
        events = dict(await self._srv_resolver(f"_{cfg.k8s_events_port_name}._tcp.{base}"))
        specs = []
        for target, port in http:
            for host in await self._resolver(target, port):
                specs.append(replica_spec(host, port, events.get(target), role=self.role))
        return specs

    async def run(self, publish: Publish) -> None:
        changes = Changes(publish, self.stats)
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
                    log.warning(
                        "dns discovery: resolving %s failed (%s); keeping the last set",
                        self.cfg.dns_name,
                        exc,
                    )
                    changes.offer_initial_empty()
                    delay = min(delay, self._backoff.next_delay())
                await asyncio.sleep(delay)
        finally:
            if owned is not None:
                self._srv_resolver = None
                await owned.close()
