"""The prefill -> decode KV link of a simulated PD pair (NIXL over RDMA): how long a handoff takes.

    transfer_ms(tokens) = latency_ms + tokens * bytes_per_token / bandwidth

Defaults for the H100 profile come from published figures:

* **Bandwidth 25 GB/s per replica.** Mooncake's Transfer Engine (Qin et al., "Mooncake: A
  KVCache-centric Disaggregated Architecture for LLM Serving", FAST '25, §5 / Fig. 7) reaches
  190 GB/s over 8 x 400 Gb/s RoCE NICs, i.e. ~24 GB/s per NIC (48% of a ConnectX-7's 50 GB/s
  line rate); a one-GPU replica owns one NIC. NIXL drives the same verbs (UCX/libfabric), so
  the same order is assumed.
* **Latency 1 ms** per handoff: the D->P notification and NIXL request posting (vLLM's
  ``vllm:nixl_post_time_seconds``) plus D's scheduler noticing the finished load; the wire's
  one-way RDMA latency (a few microseconds) is negligible beside it.
* **128 KiB of KV per token** for Llama-3.1-8B bf16: 32 layers x 8 KV heads x 128 x 2 (K, V) x 2 B.

The ``tiny`` profile uses the CPU/loopback figure measured with real vLLM's NixlConnector
(shared/reference/vllm-cpu-pd.md: 0.656 MB in 4.6 ms, tiny Llama: 2 layers x 4 heads x 32 x 2 x 2 B
= 1 KiB per token), so the tests' handoffs take milliseconds, as on this box.
"""

from __future__ import annotations

import msgspec


class KVLink(msgspec.Struct, frozen=True, gc=False):
    bytes_per_token: int = 131_072
    gbytes_per_s: float = 25.0
    latency_ms: float = 1.0

    def __post_init__(self) -> None:
        if self.bytes_per_token <= 0 or not self.gbytes_per_s > 0 or self.latency_ms < 0:
            raise ValueError(f"invalid KV link: {self}")

    def transfer_ms(self, tokens: int) -> float:
        """Time to move ``tokens`` tokens' KV, in milliseconds (0 for none)."""
        if tokens <= 0:
            return 0.0
        return self.latency_ms + tokens * self.bytes_per_token / (self.gbytes_per_s * 1e6)

    def bytes_for(self, tokens: int) -> int:
        return max(0, tokens) * self.bytes_per_token


H100_RDMA = KVLink()
CPU_LOOPBACK = KVLink(bytes_per_token=1024, gbytes_per_s=0.14, latency_ms=0.5)
