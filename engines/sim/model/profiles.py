"""Engine profiles: a step-time model plus the KV capacity and scheduler limits it was fitted with.

``h100-llama3-8b`` is vLLM serving Llama-3.1-8B-Instruct (bf16) on one H100 80GB, fitted from
published figures only (no GPU was available): see docs/calibration.md for the sources, the fit
and the residuals. ``tiny`` is for tests: a step costs tens of microseconds, so a request
finishes in milliseconds of wall time.

Capacity is stated in tokens so that a coarse block size (the offline simulator uses 512-token
blocks, the Mooncake trace's unit) keeps the same memory: ``num_gpu_blocks(block_size)``.
"""

from __future__ import annotations

import msgspec

from .kv_link import CPU_LOOPBACK, H100_RDMA, KVLink
from .step_time import StepTimeModel


class EngineProfile(msgspec.Struct, frozen=True, gc=False):
    name: str
    step: StepTimeModel
    kv_capacity_tokens: int  # usable KV pool, tokens
    max_num_batched_tokens: int
    max_num_seqs: int
    block_size: int = 16
    kv_link: KVLink = H100_RDMA  # P -> D handoff (kv_link.py: sources)

    def num_gpu_blocks(self, block_size: int | None = None) -> int:
        """KV pool size in blocks of ``block_size`` tokens (default: the profile's), plus vLLM's
        reserved null block so that usable capacity equals ``kv_capacity_tokens``."""
        bs = block_size or self.block_size
        return self.kv_capacity_tokens // bs + 1


H100_LLAMA3_8B = EngineProfile(
    name="h100-llama3-8b",
    step=StepTimeModel(
        a_ms=6.37,  # batch-1 ITL intercept 6.44 ms minus d
        b_ms=0.0226,  # 44k prefill tok/s
        c_ms=9.2e-7,  # per (query, key) pair
        d_ms=0.07,  # per decode sequence (weakest constant: data allow 0.05-0.18)
        e_ms=4.37e-5,  # per KV token read by a decode step (3.0 TB/s)
        cpu_load_base_ms=10.0,
        cpu_load_ms_per_token=0.0030,  # 43.7 GB/s, vLLM OffloadingConnector on H100
    ),
    kv_capacity_tokens=420_900,  # 51.38 GiB KV pool / 128 KiB per token ≈ 26.3k blocks of 16
    max_num_batched_tokens=8192,
    max_num_seqs=1024,
)

# A100 40GB SXM serving the same model, for heterogeneous fleets. NOT fitted to measurements: the
# H100 fit scaled by datasheet peak ratios (NVIDIA A100 datasheet: 312 dense bf16 TFLOPS, 1,555 GB/s
# HBM2; H100 SXM datasheet: 989 TFLOPS, 3.35 TB/s). Compute-bound terms (b, c: prefill GEMMs and
# attention) x 989/312 = 3.17; bandwidth-bound terms (a: weights per step, e: KV read per decode
# token, d, CPU-tier load) x 3.35/1.555 = 2.15. KV pool: 40 GiB - 15 GiB weights - ~6 GiB
# activations/graphs at gpu_memory_utilization 0.9 ≈ 15.3 GiB / 128 KiB per token ≈ 125k tokens.
A100_40GB_LLAMA3_8B = EngineProfile(
    name="a100-40gb-llama3-8b",
    step=StepTimeModel(
        a_ms=6.37 * 2.15,
        b_ms=0.0226 * 3.17,  # ~14k prefill tok/s
        c_ms=9.2e-7 * 3.17,
        d_ms=0.07 * 2.15,
        e_ms=4.37e-5 * 2.15,
        cpu_load_base_ms=10.0,
        cpu_load_ms_per_token=0.0030 * 2.15,
    ),
    kv_capacity_tokens=125_000,
    max_num_batched_tokens=8192,
    max_num_seqs=1024,
)

TINY = EngineProfile(
    name="tiny",
    step=StepTimeModel(
        a_ms=0.02,
        b_ms=2e-5,
        c_ms=0.0,
        d_ms=1e-3,
        e_ms=0.0,
        cpu_load_base_ms=0.05,
        cpu_load_ms_per_token=1e-5,
    ),
    kv_capacity_tokens=65_536,
    max_num_batched_tokens=2048,
    max_num_seqs=64,
    kv_link=CPU_LOOPBACK,
)

PROFILES: dict[str, EngineProfile] = {p.name: p for p in (H100_LLAMA3_8B, A100_40GB_LLAMA3_8B, TINY)}


def get_profile(name: str) -> EngineProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"invalid profile: {name!r} (known: {', '.join(sorted(PROFILES))})") from None
