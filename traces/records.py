"""Per-request records and the summary every report uses, live replay and offline simulation alike.

One ``RequestRecord`` per request sent. Times are seconds; ``send_s`` is relative to the start of
the run. ``ttft_s``/``e2e_s`` are ``None`` for failed requests. ``cached_tokens`` comes from the
engine (``usage.prompt_tokens_details.cached_tokens``) when it reports it.

``summarize`` turns records into the numbers a replay reports: throughput, goodput under a
TTFT/TPOT SLO, TTFT mean/p50/p90/p99, TPOT, end-to-end, prefix hit ratio, load spread.
Percentiles are nearest-rank (like traces/stats.py), so reports and trace stats agree.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from .stats import percentile_nearest_rank


class RequestRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    request_id: str
    target: str  # policy or endpoint name
    send_s: float  # when it was sent, seconds since the run started
    prompt_tokens: int
    output_tokens: int = 0  # tokens received
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = msgspec.field(default_factory=list)  # inter-token latencies (live replay)
    cached_tokens: int | None = None
    replica: str | None = None
    status: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.ttft_s is not None

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first (None with fewer than 2 tokens)."""
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


class SLO(msgspec.Struct, frozen=True):
    ttft_s: float = 2.0
    tpot_s: float = 0.1


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100], the trace statistics' definition); NaN for no data."""
    return percentile_nearest_rank(values, p) if values else math.nan


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def summarize(
    records: Iterable[RequestRecord],
    *,
    slo: SLO | None = None,
    duration_s: float | None = None,
    replicas: Sequence[str] = (),
) -> dict[str, Any]:
    """Numbers for one target. ``duration_s`` defaults to first send -> last completion.
    ``replicas`` names the whole fleet, so replicas that got no request count in the spread
    (one replica taking everything is max/mean = n, not 1)."""
    slo = slo or SLO()
    recs = list(records)
    ok = [r for r in recs if r.ok]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    e2es = [r.e2e_s for r in ok if r.e2e_s is not None]
    tpots = [t for r in ok if (t := r.tpot_s) is not None]
    if duration_s is None:
        if recs:
            start = min(r.send_s for r in recs)
            end = max(r.send_s + (r.e2e_s or 0.0) for r in recs)
            duration_s = max(end - start, 1e-9)
        else:
            duration_s = 0.0
    good = [
        r
        for r in ok
        if r.ttft_s is not None and r.ttft_s <= slo.ttft_s and (r.tpot_s is None or r.tpot_s <= slo.tpot_s)
    ]
    with_cached = [r for r in ok if r.cached_tokens is not None]
    prompt_all = sum(r.prompt_tokens for r in with_cached)
    cached_all = sum(r.cached_tokens or 0 for r in with_cached)
    per_replica = Counter(r.replica for r in ok if r.replica is not None)
    for name in replicas:
        per_replica.setdefault(name, 0)
    counts = list(per_replica.values())
    spread: dict[str, Any] = {"replicas": len(counts)}
    if counts:
        mean = _mean(counts)
        spread.update(
            {
                "min": min(counts),
                "max": max(counts),
                "max_over_mean": max(counts) / mean if mean else math.nan,
                "cv": math.sqrt(_mean([(c - mean) ** 2 for c in counts])) / mean if mean else math.nan,
                "per_replica": dict(sorted(per_replica.items())),
            }
        )
    return {
        "requests": len(recs),
        "ok": len(ok),
        "errors": len(recs) - len(ok),
        "duration_s": duration_s,
        "throughput_rps": len(ok) / duration_s if duration_s else 0.0,
        "output_tps": sum(r.output_tokens for r in ok) / duration_s if duration_s else 0.0,
        "goodput_rps": len(good) / duration_s if duration_s else 0.0,
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
        "slo_attainment": len(good) / len(recs) if recs else math.nan,
        "ttft_mean_s": _mean(ttfts),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p90_s": percentile(ttfts, 90),
        "ttft_p99_s": percentile(ttfts, 99),
        "tpot_mean_s": _mean(tpots),
        "tpot_p99_s": percentile(tpots, 99),
        "e2e_mean_s": _mean(e2es),
        "e2e_p99_s": percentile(e2es, 99),
        "hit_ratio": cached_all / prompt_all if prompt_all else math.nan,
        "prompt_tokens": sum(r.prompt_tokens for r in recs),
        "cached_tokens": cached_all,
        "load_spread": spread,
    }


_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder(RequestRecord)


def write_records(path: str, records: Iterable[RequestRecord]) -> None:
    with open(path, "wb") as f:
        for r in records:
            f.write(_enc.encode(r))
            f.write(b"\n")


def read_records(path: str) -> list[RequestRecord]:
    with open(path, "rb") as f:
        return [_dec.decode(line) for line in f if line.strip()]
