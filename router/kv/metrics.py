"""``kvrouter_kv_events_*``: the KV-event ingestion metrics (listed in docs/metrics.md)."""

from __future__ import annotations

import contextlib

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

from router.types import ReplicaId


class KVEventMetrics:
    """``kvrouter_kv_events_*``: the KV-event ingestion metrics (listed in docs/metrics.md)."""

    def __init__(self, registry: CollectorRegistry | None = REGISTRY) -> None:
        p = "kvrouter_kv_events_"
        self.batches = Counter(p + "batches", "KV-event batches applied", registry=registry)
        self.events = Counter(p + "events", "KV events seen, by type", ["type"], registry=registry)
        self.blocks_stored = Counter(
            p + "blocks_stored", "Blocks confirmed by BlockStored", registry=registry
        )
        self.blocks_removed = Counter(
            p + "blocks_removed", "Blocks retracted by BlockRemoved", registry=registry
        )
        self.decode_errors = Counter(
            p + "decode_errors", "Payloads or events that did not decode", ["replica"], registry=registry
        )
        self.gaps = Counter(p + "gaps", "Sequence gaps detected", ["replica"], registry=registry)
        self.restarts = Counter(p + "restarts", "Publisher restarts detected", ["replica"], registry=registry)
        self.stale = Counter(p + "stale", "Duplicate/out-of-order batches dropped", registry=registry)
        self.orphans = Counter(
            p + "orphans", "Stored blocks skipped: parent block unknown", registry=registry
        )
        self.unmodeled = Counter(
            p + "unmodeled_blocks",
            "Stored blocks skipped: multimodal/embedding keys, LoRA id without name, offload placeholders, masked (SWA/Mamba) blocks",
            registry=registry,
        )
        self.unknown_removals = Counter(
            p + "unknown_removals", "Removed blocks never seen stored", registry=registry
        )
        self.block_size_mismatch = Counter(
            p + "block_size_mismatch", "Events whose block_size differs from the router's", registry=registry
        )
        self.replays = Counter(p + "replays", "Replay requests, by result", ["result"], registry=registry)
        self.uncertain = Gauge(
            p + "uncertain",
            "1 while a replica's confirmed blocks may be stale",
            ["replica"],
            registry=registry,
        )
        # Labelled children resolved once: .labels() costs a lock and a dict lookup per call.
        self.ev_stored = self.events.labels("BlockStored")
        self.ev_removed = self.events.labels("BlockRemoved")
        self.ev_cleared = self.events.labels("AllBlocksCleared")
        self.ev_unknown = self.events.labels("unknown")

    def forget(self, replica: ReplicaId) -> None:
        """Drop a removed replica's labelled series so dashboards do not show a ghost."""
        for m in (self.decode_errors, self.gaps, self.restarts, self.uncertain):
            with contextlib.suppress(KeyError):
                m.remove(replica)


_default_metrics: KVEventMetrics | None = None


def default_metrics() -> KVEventMetrics:
    """The process-wide metrics on prometheus_client's REGISTRY (created once: names are unique)."""
    global _default_metrics
    if _default_metrics is None:
        _default_metrics = KVEventMetrics(REGISTRY)
    return _default_metrics
