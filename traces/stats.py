"""Trace statistics: arrivals, lengths, and single-cache prefix-hit upper bounds.

The definitions are those of the statistics published with the traces (docs/traces.md); the
tests reproduce those tables number for number:

- Requests are processed in ``(timestamp, file order)`` (the order ``Trace.requests`` has).
  Duration is last minus first arrival; percentiles use the nearest-rank method.
- **seen-before**: the fraction of input blocks whose id appeared anywhere earlier in the trace
  (earlier requests; a repeat inside one request does not count, the set is updated per request).
- **prefix hit**: a block hits only if it is in the cache *and every earlier block of the same
  request hit*. With an infinite cache "in the cache" means "seen in an earlier request".
- **token hit**: hit tokens per request are ``min(hit_blocks * block_tokens, input_length)``,
  summed and divided by the summed input lengths.
- **LRU N**: one LRU cache of N blocks. After each lookup the request's blocks are inserted or
  touched tail-first, so the head block is the most recent (vLLM's free queue and SGLang's radix
  tree evict a sequence's tail before its head). Eviction runs after each request, so a request
  longer than the cache still inserts all of its blocks before the excess is dropped.

All of these are upper bounds for one cache; a fleet of R replicas sees less.

Complexity: one pass over all block ids per cache size, O(total blocks) dict operations each
(an ``OrderedDict`` is the LRU); the 288k-block Mooncake conversation trace takes ~0.1 s per size.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import msgspec

from .model import Trace

DEFAULT_LRU_SIZES: tuple[int, ...] = (500, 1000, 2000, 5000, 10000, 50000, 200000)


def percentile_nearest_rank(values: Sequence[float], p: float) -> float:
    """The smallest value with at least p% of the values <= it (nearest-rank; p in (0, 100])."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0 < p <= 100:
        raise ValueError(f"percentile p must be in (0, 100] (current value: {p})")
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


class Dist(msgspec.Struct, frozen=True):
    mean: float
    p50: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Dist:
        if not values:
            return cls(0.0, 0.0, 0.0)
        ordered = sorted(values)
        n = len(ordered)
        return cls(
            sum(ordered) / n,
            float(ordered[max(1, math.ceil(0.5 * n)) - 1]),
            float(ordered[max(1, math.ceil(0.99 * n)) - 1]),
        )


class CacheStats(msgspec.Struct, frozen=True, kw_only=True):
    """Prefix statistics; present only for traces with block ids."""

    block_tokens: int
    input_blocks: int
    unique_blocks: int
    seen_before: float
    prefix_hit_inf: float
    token_hit_inf: float
    frac_hit_ge1: float  # requests whose infinite-cache prefix hit is >= 1 block
    frac_hit_ge2: float  # ... >= 2 blocks
    lru_prefix_hit: dict[int, float]  # cache size in blocks -> block-weighted prefix hit ratio


class TraceStats(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    requests: int
    duration_s: float
    req_per_s: float
    input: Dist
    output: Dist
    cache: CacheStats | None


class HitRatio(msgspec.Struct, frozen=True, kw_only=True):
    """Single-cache upper bound for one cache size (``oracle_hit_ratio``)."""

    cache_blocks: int
    token_hit_lru: float  # token-weighted prefix hit ratio, one LRU cache of cache_blocks
    token_hit_inf: float  # the same with an infinite cache
    block_hit_lru: float
    block_hit_inf: float


# --- per-request hit counts ---------------------------------------------------------------------


def prefix_hits_infinite(trace: Trace) -> list[int]:
    """Per request: leading blocks seen in earlier requests (prefix rule, infinite cache)."""
    seen: set[int] = set()
    out: list[int] = []
    for r in trace.requests:
        k = 0
        for b in r.hash_ids:
            if b not in seen:
                break
            k += 1
        out.append(k)
        seen.update(r.hash_ids)
    return out


def prefix_hits_lru(trace: Trace, capacity: int) -> list[int]:
    """Per request: leading blocks found in one LRU cache of ``capacity`` blocks (prefix rule)."""
    if capacity < 0:
        raise ValueError(f"LRU capacity must be >= 0 (current value: {capacity})")
    cache: OrderedDict[int, None] = OrderedDict()
    touch = cache.move_to_end
    evict = cache.popitem
    out: list[int] = []
    for r in trace.requests:
        ids = r.hash_ids
        k = 0
        for b in ids:
            if b not in cache:
                break
            k += 1
        out.append(k)
        # Tail first, so the head ends most recently used and is evicted last.
        for b in reversed(ids):
            if b in cache:
                touch(b)
            else:
                cache[b] = None
        while len(cache) > capacity:
            evict(last=False)
    return out


def _token_hits(trace: Trace, hits: Iterable[int]) -> int:
    bt = trace.block_tokens
    return sum(min(k * bt, r.input_length) for k, r in zip(hits, trace.requests, strict=True))


def _require_blocks(trace: Trace) -> None:
    if not trace.has_prefix_info:
        raise ValueError(f"trace {trace.name!r} has no prefix information (block_tokens == 0)")


# --- aggregate ----------------------------------------------------------------------------------


def cache_stats(trace: Trace, lru_sizes: Iterable[int] = DEFAULT_LRU_SIZES) -> CacheStats:
    _require_blocks(trace)
    reqs = trace.requests
    seen: set[int] = set()
    seen_before = 0
    total_blocks = 0
    for r in reqs:
        total_blocks += len(r.hash_ids)
        seen_before += sum(1 for b in r.hash_ids if b in seen)
        seen.update(r.hash_ids)
    hits = prefix_hits_infinite(trace)
    total_in = sum(r.input_length for r in reqs)
    n = len(reqs)
    blocks = max(total_blocks, 1)
    return CacheStats(
        block_tokens=trace.block_tokens,
        input_blocks=total_blocks,
        unique_blocks=len(seen),
        seen_before=seen_before / blocks,
        prefix_hit_inf=sum(hits) / blocks,
        token_hit_inf=_token_hits(trace, hits) / max(total_in, 1),
        frac_hit_ge1=sum(1 for k in hits if k >= 1) / max(n, 1),
        frac_hit_ge2=sum(1 for k in hits if k >= 2) / max(n, 1),
        lru_prefix_hit={size: sum(prefix_hits_lru(trace, size)) / blocks for size in lru_sizes},
    )


def trace_stats(trace: Trace, lru_sizes: Iterable[int] = DEFAULT_LRU_SIZES) -> TraceStats:
    """Everything ``kvrouter trace stats`` prints. Cache statistics only with block ids."""
    reqs = trace.requests
    duration = trace.duration_s
    return TraceStats(
        name=trace.name,
        requests=len(reqs),
        duration_s=duration,
        req_per_s=len(reqs) / duration if duration > 0 else 0.0,
        input=Dist.of([r.input_length for r in reqs]),
        output=Dist.of([r.output_length for r in reqs]),
        cache=cache_stats(trace, lru_sizes) if trace.has_prefix_info else None,
    )


def oracle_hit_ratio(trace: Trace, cache_blocks: int) -> HitRatio:
    """Upper bound on what any router can reach: one LRU cache holding ``cache_blocks`` blocks.

    ``cache_blocks`` is in the trace's own block unit (``trace.block_tokens`` tokens each); for a
    fleet, pass the fleet's total KV capacity converted to that unit. A fleet of separate caches
    can only do worse than one cache of the same total size under the same eviction rule.
    """
    _require_blocks(trace)
    inf = prefix_hits_infinite(trace)
    lru = prefix_hits_lru(trace, cache_blocks)
    total_in = max(sum(r.input_length for r in trace.requests), 1)
    blocks = max(sum(len(r.hash_ids) for r in trace.requests), 1)
    return HitRatio(
        cache_blocks=cache_blocks,
        token_hit_lru=_token_hits(trace, lru) / total_in,
        token_hit_inf=_token_hits(trace, inf) / total_in,
        block_hit_lru=sum(lru) / blocks,
        block_hit_inf=sum(inf) / blocks,
    )


# --- presentation -------------------------------------------------------------------------------


def _num(x: float) -> str:
    """Thousands separators for big numbers, 3 significant digits for small ones (README style)."""
    if abs(x) >= 100:
        return f"{round(x):,}"
    return f"{x:.3g}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def format_stats(s: TraceStats) -> str:
    """Human-readable report, same rounding as the shared traces README tables."""
    lines = [
        f"trace            {s.name}",
        f"requests         {s.requests:,}",
        f"duration (s)     {_num(s.duration_s)}",
        f"req/s            {s.req_per_s:.2f}",
        f"input  mean/p50/p99   {_num(s.input.mean)} / {_num(s.input.p50)} / {_num(s.input.p99)}",
        f"output mean/p50/p99   {_num(s.output.mean)} / {_num(s.output.p50)} / {_num(s.output.p99)}",
    ]
    c = s.cache
    if c is None:
        lines.append("block size       n/a (no prefix information)")
        return "\n".join(lines)
    lines += [
        f"block size       {c.block_tokens}",
        f"input blocks     {c.input_blocks:,}",
        f"unique blocks    {c.unique_blocks:,}",
        f"seen-before      {_pct(c.seen_before)}",
        f"prefix hit (inf) {_pct(c.prefix_hit_inf)}",
        f"token hit (inf)  {_pct(c.token_hit_inf)}",
        f"hit >=1 / >=2 blocks  {100 * c.frac_hit_ge1:.2f}% / {100 * c.frac_hit_ge2:.1f}%",
    ]
    for size, ratio in c.lru_prefix_hit.items():
        lines.append(f"prefix hit LRU {_lru_label(size):<6} {_pct(ratio)}")
    return "\n".join(lines)


def _lru_label(size: int) -> str:
    if size >= 1000 and size % 1000 == 0:
        return f"{size // 1000}k"
    if size >= 500 and size % 100 == 0:
        return f"{size / 1000:g}k"
    return str(size)
