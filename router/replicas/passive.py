"""Passive health: proxied-request and probe outcomes eject a replica after N failures in a row.

The proxy reports every forwarded request (``ForwardHooks``), the monitor every probe. Passing
probes re-admit (monitor.py); a success here only resets the failure streak. A failed probe does
not count while the replica completed a real request within ``probe_grace_s``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from router.metrics import RouterMetrics
from router.replicas.registry import Replica, ReplicaRegistry

log = logging.getLogger("kvrouter.health")


class PassiveHealth:
    def __init__(
        self,
        registry: ReplicaRegistry,
        metrics: RouterMetrics,
        eject_after_failures: int,
        *,
        last_success: Callable[[Replica], float] | None = None,
        probe_grace_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self.eject_after_failures = eject_after_failures
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
        if rep.healthy and rep.consecutive_failures >= self.eject_after_failures:
            log.warning(
                "ejecting %s after %d consecutive failures (%s)", rep.id, rep.consecutive_failures, reason
            )
            self.registry.set_healthy(rep, False)
            self.metrics.ejections.labels(rep.id).inc()

    def record_success(self, rep: Replica) -> None:
        rep.consecutive_failures = 0
