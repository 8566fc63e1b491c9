"""Passive health: proxied-request and probe outcomes eject a replica after N failures in a row.

The proxy reports every forwarded request (``ForwardHooks``), the monitor every probe. Passing
probes re-admit (monitor.py); a success here only resets the failure streak. A failed probe does
not count while the replica completed a real request within ``probe_grace_s``.

Request failures eject at most ``max_ejected_fraction`` of a pool (the replicas with the same
models and role, draining ones aside; counted: those ejected for request failures) at once, and
never the last one serving: connect timeouts from a
fleet too loaded to accept are failures on every replica, and ejecting each in turn answered 503
to everyone until probes re-admitted them, where queueing would have served (Envoy's
``max_ejection_percent`` and panic threshold exist for this). A replica that fails its probes is
down, not loaded: probe ejections are not capped.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from router.metrics import RouterMetrics
from router.replicas.registry import Replica, ReplicaRegistry
from router.types import ReplicaId

log = logging.getLogger("kvrouter.health")


class PassiveHealth:
    def __init__(
        self,
        registry: ReplicaRegistry,
        metrics: RouterMetrics,
        eject_after_failures: int,
        *,
        max_ejected_fraction: float = 0.5,
        last_success: Callable[[Replica], float] | None = None,
        probe_grace_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self.eject_after_failures = eject_after_failures
        self.max_ejected_fraction = max_ejected_fraction
        # Replicas this class ejected for request failures (the cap counts these only: a replica
        # down by its probes, or not admitted yet, is no reason to keep a failing one serving).
        self._ejected: set[ReplicaId] = set()
        self.last_success = last_success
        self.probe_grace_s = probe_grace_s
        self.clock = clock
        self.probe_failures_ignored = 0

    def record_failure(self, rep: Replica, reason: str) -> None:
        if (
            reason == "probe"
            and self.last_success is not None
            and self.clock() - self.last_success(rep) <= self.probe_grace_s
        ):
            # Passive evidence outweighs a slow probe: a replica that completed a real request
            # within probe_grace_s is serving users; its /health timing out on a loaded host is
            # not a reason to take it out (the canary and the outlier detector judge it instead).
            self.probe_failures_ignored += 1
            return
        rep.consecutive_successes = 0
        rep.consecutive_failures += 1
        if not rep.healthy or rep.consecutive_failures < self.eject_after_failures:
            return
        if reason != "probe":
            out, size, serving = self._ejected_in_pool(rep)
            cap = max(1, math.floor(self.max_ejected_fraction * size)) if size >= 2 else 0
            if out >= cap or serving <= 1:
                if rep.consecutive_failures == self.eject_after_failures:  # once per streak
                    log.warning(
                        "not ejecting %s after %d consecutive failures (%s): of its pool of %d, %d "
                        "already ejected for failed requests (health.max_ejected_fraction %.2f), "
                        "%d serving",
                        rep.id,
                        rep.consecutive_failures,
                        reason,
                        size,
                        out,
                        self.max_ejected_fraction,
                        serving,
                    )
                    self.metrics.ejections_capped.labels(rep.id).inc()
                return
            self._ejected.add(rep.id)
        log.warning(
            "ejecting %s after %d consecutive failures (%s)", rep.id, rep.consecutive_failures, reason
        )
        self.registry.set_healthy(rep, False)
        self.metrics.ejections.labels(rep.id).inc()

    def _ejected_in_pool(self, rep: Replica) -> tuple[int, int, int]:
        """(replicas of ``rep``'s pool out for request failures, pool size, healthy ones): the
        pool is the replicas with its models and role, draining ones aside. Readmitted and
        removed replicas leave the ejected set here."""
        self._ejected = {
            rid for rid in self._ejected if (r := self.registry.get(rid)) is not None and not r.healthy
        }
        size = out = serving = 0
        for p in self.registry:
            if p.models == rep.models and p.spec.role == rep.spec.role and not p.draining:
                size += 1
                out += p.id in self._ejected
                serving += p.healthy
        return out, size, serving

    def record_success(self, rep: Replica) -> None:
        rep.consecutive_failures = 0
