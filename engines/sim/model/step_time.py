"""Step-time model of one vLLM engine step (shared/reference/h100-llama3-8b.md §7).

    T_step_ms = a + b*P + c*Σ_chunks n*(p + n/2) + d*D + e*Σ_decode ctx

P is the number of prefill tokens in the step; a prefill chunk computes ``n`` new tokens after
``p`` tokens already in the KV cache (prefix hit or earlier chunks), and its attention cost is
the number of (query, key) pairs, ``n*p + n²/2``; D is the number of decode sequences and
``ctx`` the length each decode token attends to. ``a`` is the fixed cost of streaming the
weights, ``b`` the linear (GEMM) cost per token, ``e`` the cost of reading KV per decode token.

Everything here is pure arithmetic on floats so that the engine can also sum a whole decode
stretch in closed form (``decode_stretch_ms``) instead of stepping: consecutive decode steps of a
fixed batch differ only by ``e*D`` (each sequence's context grows by one token per step).
"""

from __future__ import annotations

import math

import msgspec


class StepTimeModel(msgspec.Struct, frozen=True, gc=False):
    """Fitted constants, all in milliseconds. ``cpu_load_*`` is the CPU-tier (LMCache) load cost
    on the loading request's TTFT path: ``load_ms = cpu_load_base_ms + cpu_load_ms_per_token*n``."""

    a_ms: float
    b_ms: float
    c_ms: float
    d_ms: float
    e_ms: float
    cpu_load_base_ms: float = 10.0
    cpu_load_ms_per_token: float = 0.0030

    def step_ms(self, prefill_tokens: int, attn_pairs: float, num_decode: int, decode_ctx_sum: int) -> float:
        """One step. ``attn_pairs`` is Σ over prefill chunks of ``chunk_attn_pairs(n, p)``."""
        return (
            self.a_ms
            + self.b_ms * prefill_tokens
            + self.c_ms * attn_pairs
            + self.d_ms * num_decode
            + self.e_ms * decode_ctx_sum
        )

    def decode_stretch_ms(self, k: int, num_decode: int, decode_ctx_sum: int) -> float:
        """Total time of ``k`` consecutive decode-only steps of the same ``num_decode`` sequences
        whose contexts sum to ``decode_ctx_sum`` in the first step (and grow by ``num_decode``
        per step): an arithmetic series."""
        if k <= 0:
            return 0.0
        per_step = self.a_ms + self.d_ms * num_decode
        return k * per_step + self.e_ms * (k * decode_ctx_sum + num_decode * k * (k - 1) / 2)

    def steps_starting_before(
        self, budget_ms: float, num_decode: int, decode_ctx_sum: int, k_max: int
    ) -> int:
        """How many consecutive decode steps (at most ``k_max``) *start* strictly before
        ``budget_ms`` from now: the largest k with ``decode_stretch_ms(k-1) < budget_ms``."""
        if budget_ms <= 0.0 or k_max <= 0:
            return 0
        if self.decode_stretch_ms(k_max - 1, num_decode, decode_ctx_sum) < budget_ms:
            return k_max
        lo, hi = 1, k_max - 1  # step 0 starts at 0 < budget; step k_max-1 does not
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.decode_stretch_ms(mid - 1, num_decode, decode_ctx_sum) < budget_ms:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def cpu_load_ms(self, tokens: int) -> float:
        return self.cpu_load_base_ms + self.cpu_load_ms_per_token * tokens if tokens > 0 else 0.0

    def prefill_ms(self, prompt_len: int, cached: int = 0, budget: int = 8192) -> float:
        """TTFT of one request alone on the engine (no queueing): the sum of its chunked-prefill
        steps. Used by docs/calibration.md and the fit script to compare with published TTFT."""
        total = 0.0
        p = cached
        while p < prompt_len:
            n = min(budget, prompt_len - p)
            total += self.step_ms(n, chunk_attn_pairs(n, p), 0, 0)
            p += n
        return total


def chunk_attn_pairs(n: int, p: int) -> float:
    """Attention (query, key) pairs of a prefill chunk of ``n`` tokens after ``p`` cached ones."""
    return n * (p + n / 2)


def series_bucket_counts(first: float, step: float, n: int, bounds: tuple[float, ...]) -> list[int]:
    """How many of ``first + j*step`` (j in [0, n)) fall at or below each bound (cumulative).
    Lets a decode stretch add its n inter-token latencies to a histogram in O(buckets)."""
    out: list[int] = []
    for u in bounds:
        if u < first:
            out.append(0)
        elif step <= 0.0:
            out.append(n)
        else:
            out.append(min(n, math.floor((u - first) / step) + 1))
    return out
