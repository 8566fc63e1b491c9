"""The PD (NixlConnector) metrics of a simulated replica, under vLLM 0.32's names.

``vllm:prompt_tokens_by_source_total{source=local_compute|local_cache_hit|external_kv_transfer}``
(every replica, as vLLM), and the NIXL counters of vllm/distributed/kv_transfer/kv_connector/v1/
nixl/stats.py: failed transfers (D: P unreachable, unknown request, engine-id mismatch),
failed notifications, expired leases (P) and read notifications after expiry (P: the decode
side read blocks that may have been reused: vLLM's silent stale read), plus the transfer-time and
bytes histograms D observes per successful read.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")
XFER_TIME_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 5.0)
BYTES_BUCKETS = (1048576.0, 5242880.0, 10485760.0, 20971520.0, 41943040.0, 83886080.0, 167772160.0,
                 335544320.0, 671088640.0, 1342177280.0, 2684354560.0, 5368709120.0)  # fmt: skip


class PDMetrics:
    def __init__(
        self, registry: CollectorRegistry, labelnames: list[str], labelvalues: dict[str, str]
    ) -> None:
        lv = labelvalues
        by_source = Counter(
            "vllm:prompt_tokens_by_source", "Number of prompt tokens by source.", [*labelnames, "source"],
            registry=registry,
        )  # fmt: skip
        self.by_source = {s: by_source.labels(source=s, **lv) for s in SOURCES}

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labelnames, registry=registry).labels(**lv)

        self.failed_transfers = counter(
            "vllm:nixl_num_failed_transfers",
            "Number of failed NIXL KV Cache transfers, including handshake and notification failures.",
        )
        self.failed_notifications = counter(
            "vllm:nixl_num_failed_notifications", "Number of failed NIXL KV Cache notifications."
        )
        self.expired = counter(
            "vllm:nixl_num_kv_expired_reqs", "Number of requests that had their KV expire."
        )
        self.after_expiry = counter(
            "vllm:nixl_num_notifications_after_expiry",
            "Number of completion notifications for requests that were no longer tracked.",
        )
        self.xfer_time = Histogram(
            "vllm:nixl_xfer_time_seconds", "Histogram of transfer duration for NIXL KV Cache transfers.",
            labelnames, buckets=XFER_TIME_BUCKETS, registry=registry,
        ).labels(**lv)  # fmt: skip
        self.bytes = Histogram(
            "vllm:nixl_bytes_transferred", "Histogram of bytes transferred per NIXL KV Cache transfers.",
            labelnames, buckets=BYTES_BUCKETS, registry=registry,
        ).labels(**lv)  # fmt: skip

    def on_prompt(self, prompt_tokens: int, local_hit: int, external: int, remote: bool) -> None:
        """vLLM's split of a scheduled prompt. A NIXL load counts every token past the local hit
        as transferred (vLLM loads the partial last block too: shared/reference/vllm-cpu-pd.md)."""
        if remote and external:
            self.by_source["local_cache_hit"].inc(local_hit)
            self.by_source["external_kv_transfer"].inc(prompt_tokens - local_hit)
            return
        self.by_source["local_cache_hit"].inc(local_hit)
        self.by_source["local_compute"].inc(max(0, prompt_tokens - local_hit - external))
