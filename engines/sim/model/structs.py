"""The engine model's inputs and outputs: its config, a request, what a step did."""

from __future__ import annotations

from array import array
from collections.abc import Iterable, MutableSequence, Sequence

import msgspec

from ..wire import KVEvent
from .profiles import EngineProfile


def compact_ints(values: Iterable[int], code: str) -> MutableSequence[int]:
    """``values`` as an ``array(code)`` ('I': token ids, 'Q': 64-bit hashes), or a list when they
    do not fit. Why: a list of n ints is n int objects that the cyclic GC visits one by one
    whenever a collection sees the list (a 100k-token prompt: a few ms of cache misses per
    collection, per copy); an array is one flat buffer the GC never looks at."""
    try:
        return array(code, values)
    except (OverflowError, TypeError):
        return list(values)


class EngineConfig(msgspec.Struct, frozen=True):
    """Engine limits. ``num_gpu_blocks`` counts vLLM's null block (usable = num_gpu_blocks - 1)."""

    num_gpu_blocks: int
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    cpu_tier_tokens: int = 0  # 0 disables the CPU tier
    cpu_chunk_tokens: int = 256
    # LMCache 0.5.6's save_unfull_chunk default (false): only whole chunks reach the CPU tier, as
    # the real MP server does (a 600-token prompt stores 2 chunks of 256; docs/real-engines.md §10).
    cpu_save_unfull_chunk: bool = False
    enable_prefix_caching: bool = True
    emit_events: bool = True
    emit_cpu_events: bool = False  # CPU-tier BlockStored/BlockRemoved with medium "CPU"
    profile: str = "tiny"  # step-time profile name (profiles.py), used when none is passed
    time_scale: float = 1.0  # step durations are divided by this

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "cpu_chunk_tokens"):
            v = getattr(self, name)
            if v <= 0:
                raise ValueError(f"invalid {name}: {v} (must be > 0)")
        if self.num_gpu_blocks < 2:
            raise ValueError(f"invalid num_gpu_blocks: {self.num_gpu_blocks} (must be >= 2)")
        if self.time_scale <= 0:
            raise ValueError(f"invalid time_scale: {self.time_scale} (must be > 0)")
        if self.cpu_tier_tokens < 0:
            raise ValueError(f"invalid cpu_tier_tokens: {self.cpu_tier_tokens} (must be >= 0)")

    @classmethod
    def from_profile(
        cls, profile: EngineProfile, block_size: int | None = None, **overrides: object
    ) -> EngineConfig:
        """The profile's capacity and limits, with the KV pool re-counted for ``block_size``.
        Overrides that are None keep the profile's value; unknown names are ignored."""
        bs = block_size or profile.block_size
        base: dict[str, object] = {
            "num_gpu_blocks": profile.num_gpu_blocks(bs),
            "block_size": bs,
            "max_num_seqs": profile.max_num_seqs,
            "max_num_batched_tokens": profile.max_num_batched_tokens,
            "profile": profile.name,
        }
        base.update({k: v for k, v in overrides.items() if v is not None})
        return msgspec.convert(base, cls)


class SimRequest(msgspec.Struct):
    """One request as the engine sees it.

    Give either ``token_ids`` (the server: real prompt ids; the engine then tracks output ids,
    fills ``BlockStored.token_ids`` and, when ``block_hashes`` is None, hashes the prompt's full
    blocks itself with ``block_hasher``) or ``prompt_len`` plus ``block_hashes`` (the simulator:
    engine hashes of the prompt's ``prompt_len // block_size`` full blocks, chained). No EOS is
    ever sampled: a request always runs to ``max_tokens`` (vLLM with ``ignore_eos``)."""

    request_id: str
    max_tokens: int
    prompt_len: int = 0  # 0: len(token_ids)
    block_hashes: Sequence[int] | None = None
    token_ids: Sequence[int] | None = None
    arrival: float = 0.0
    # PD decode side: this many leading prompt tokens' KV wait on a prefill replica and are
    # loaded over the KV link (profile.kv_link) instead of computed (NIXL do_remote_prefill).
    remote_tokens: int = 0
    # PD prefill side: on finishing, keep the blocks (NIXL do_remote_decode) until release_kv().
    hold_kv: bool = False
    retain_s: float = 0.0  # > 0: keep this request's KV pinned this long after it finishes (BlockPool.pin)


class CachedTokens(msgspec.Struct, frozen=True, gc=False):
    """Prefix-cache result of a request's first scheduling, in tokens (vLLM's accounting)."""

    local: int  # GPU prefix-cache hit: whole blocks, at most num_tokens - 1
    external: int  # loaded from the CPU tier beyond the GPU hit
    external_queried: int  # tokens asked of the CPU tier (num_tokens - local); 0 without one


class FinishedRequest(msgspec.Struct, frozen=True, gc=False):
    request_id: str
    finish_reason: str  # "length" (max_tokens reached) or "abort"
    arrival: float
    first_scheduled: float | None
    first_token_time: float | None
    finish_time: float
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int  # -1 when aborted before being scheduled
    num_preemptions: int


class StepOutput(msgspec.Struct, gc=False):
    """What one step did. Everything in it takes effect at ``end = start + duration``."""

    start: float
    end: float
    duration: float  # seconds, already divided by time_scale
    new_tokens: dict[str, list[int]]  # request id -> the one token it produced (not for partial prefills)
    finished: dict[str, str]  # request id -> finish reason ("length"); aborts are not reported here
    finished_requests: list[FinishedRequest]
    cached_tokens: dict[str, CachedTokens]  # requests scheduled for compute for the first time
    events: list[KVEvent]  # this step's batch (vLLM publishes one per step), in order
    num_scheduled_tokens: int
    num_preemptions: int


class AdvanceOutput(msgspec.Struct, gc=False):
    now: float  # the engine is busy until here (>= the last step start, may exceed ``t``)
    steps: int
    finished: list[FinishedRequest]
    event_batches: list[tuple[float, list[KVEvent]]]
