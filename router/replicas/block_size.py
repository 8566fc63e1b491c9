"""The fleet's block size: token-mode keys must use the engines' block size or they never match
KV events, so the router adopts the first size an engine reports and warns about any other."""

from __future__ import annotations

import logging

from router.kv.subscriber import KVEventManager
from router.replicas.registry import Replica
from router.routing import Router

log = logging.getLogger("kvrouter.health")


class BlockSizeAdoption:
    """Owns the one write to ``Router.block_size`` and the KV streams' ``block_size`` after
    start-up; the first engine that reports a size decides it, for good."""

    def __init__(self, router: Router, kv_events: KVEventManager | None) -> None:
        self.router = router
        self.kv_events = kv_events
        self._locked = False

    def observe(self, size: int, rep: Replica) -> None:
        if size == self.router.block_size:
            self._locked = True
            return
        if self._locked:
            log.warning(
                "replica %s reports block_size=%d but the fleet uses %d; its prefix matches will be 0",
                rep.id,
                size,
                self.router.block_size,
            )
            return
        log.info("adopting engine block_size=%d (was %d)", size, self.router.block_size)
        self.router.block_size = size
        self._locked = True
        if self.kv_events is not None:
            for rid in self.kv_events.replicas():
                events = self.kv_events.events_of(rid)
                if events is not None:
                    events.block_size = size
