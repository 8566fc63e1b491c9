"""Passive health: proxied-request and probe outcomes eject a replica after N failures in a row.

The proxy reports every forwarded request (``ForwardHooks``), the monitor every probe. Passing
probes re-admit (monitor.py); a success here only resets the failure streak.
"""

from __future__ import annotations

import logging

from router.metrics import RouterMetrics
from router.replicas.registry import Replica, ReplicaRegistry

log = logging.getLogger("kvrouter.health")


class PassiveHealth:
    def __init__(self, registry: ReplicaRegistry, metrics: RouterMetrics, eject_after_failures: int) -> None:
        self.registry = registry
        self.metrics = metrics
        self.eject_after_failures = eject_after_failures

    def record_failure(self, rep: Replica, reason: str) -> None:
        rep.consecutive_successes = 0
        rep.consecutive_failures += 1
        if rep.healthy and rep.consecutive_failures >= self.eject_after_failures:
            log.warning(
                "ejecting %s after %d consecutive failures (%s)", rep.id, rep.consecutive_failures, reason
            )
            self.registry.set_healthy(rep, False)
            self.metrics.ejections.labels(rep.id).inc()

    def record_success(self, rep: Replica) -> None:
        rep.consecutive_failures = 0
