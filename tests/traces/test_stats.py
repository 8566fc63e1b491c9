"""Statistics: the README rules on hand-built traces, and both README tables reproduced exactly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from traces.loaders import load_trace
from traces.model import Trace, TraceRequest
from traces.stats import (
    Dist,
    cache_stats,
    format_stats,
    oracle_hit_ratio,
    percentile_nearest_rank,
    prefix_hits_infinite,
    prefix_hits_lru,
    trace_stats,
)

# The public traces are vendored (traces/data/README.md); KVROUTER_SHARED_TRACES can point elsewhere.
SHARED = Path(
    os.environ.get("KVROUTER_SHARED_TRACES", Path(__file__).resolve().parents[2] / "traces" / "data")
)


def _trace(*ids: tuple[int, ...], block_tokens: int = 4, lengths: list[int] | None = None) -> Trace:
    lens = lengths or [len(h) * block_tokens for h in ids]
    return Trace(
        requests=tuple(
            TraceRequest(timestamp_s=float(i), input_length=n, output_length=1, hash_ids=h, request_id=str(i))
            for i, (h, n) in enumerate(zip(ids, lens, strict=True))
        ),
        block_tokens=block_tokens,
        name="t",
    )


@pytest.mark.parametrize(
    ("values", "p", "expected"),
    [
        ([1, 2, 3, 4], 50, 2),
        ([1, 2, 3, 4], 51, 3),
        ([5], 99, 5),
        (list(range(1, 101)), 99, 99),
        (list(range(1, 201)), 99, 198),
        ([3, 1, 2], 100, 3),
    ],
)
def test_percentile_nearest_rank(values: list[int], p: float, expected: int) -> None:
    assert percentile_nearest_rank(values, p) == expected


def test_percentile_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="empty"):
        percentile_nearest_rank([], 50)
    with pytest.raises(ValueError, match="current value: 0"):
        percentile_nearest_rank([1], 0)


def test_dist_matches_percentile_function() -> None:
    vals = [7, 1, 9, 3, 3, 8, 2]
    d = Dist.of(vals)
    assert d == Dist(sum(vals) / 7, percentile_nearest_rank(vals, 50), percentile_nearest_rank(vals, 99))


def test_prefix_rule_stops_at_first_miss() -> None:
    # Blocks seen before but after a miss are not hits (per-block hashes, as in Qwen traces).
    t = _trace((1, 2, 3), (1, 9, 2), (4, 1, 2), (1, 9, 2, 3))
    assert prefix_hits_infinite(t) == [0, 1, 0, 4]
    c = cache_stats(t, lru_sizes=())
    assert c.input_blocks == 13 and c.unique_blocks == 5
    assert c.seen_before == pytest.approx(8 / 13)  # 1, 2 | 1, 2 | 1, 9, 2, 3
    assert c.prefix_hit_inf == pytest.approx(5 / 13)
    assert (c.frac_hit_ge1, c.frac_hit_ge2) == (pytest.approx(2 / 4), pytest.approx(1 / 4))


def test_token_hit_caps_at_input_length() -> None:
    # 2 blocks of 4 tokens cover a 6-token prompt: the second block is partial.
    t = _trace((1, 2), (1, 2), lengths=[6, 6])
    c = cache_stats(t, lru_sizes=())
    assert c.token_hit_inf == pytest.approx(6 / 12)  # min(2*4, 6) hit tokens of 12


def test_lru_inserts_tail_first_so_the_head_survives() -> None:
    # Capacity 2. After (1, 2, 3) the order, oldest first, is 3, 2, 1; eviction after the request
    # drops 3 -> cache {2, 1} with 1 most recent. (1, 2) then hits both blocks.
    t = _trace((1, 2, 3), (1, 2), (3,))
    assert prefix_hits_lru(t, 2) == [0, 2, 0]


def test_lru_evicts_after_the_request_not_during() -> None:
    # A request longer than the cache inserts every block, then trims to capacity; its own
    # blocks never evict each other mid-insert, and the head is what remains.
    t = _trace((1, 2, 3, 4), (1, 5), (1, 2))
    assert prefix_hits_lru(t, 1) == [0, 1, 1]
    assert prefix_hits_lru(t, 2) == [0, 1, 1]  # 5 pushed 2 out
    assert prefix_hits_lru(t, 3) == [0, 1, 2]  # 5 pushed 3 (the oldest, a tail block) out
    assert prefix_hits_lru(t, 0) == [0, 0, 0]


def test_lru_recency_decides_which_prefix_survives() -> None:
    t = _trace((1,), (2,), (1,), (3,), (2,), (1,))
    # cap 2: [1] [1,2] hit1 -> [2,1] [1,3] (2 evicted) miss2 -> [3,2] (1 evicted) miss1
    assert prefix_hits_lru(t, 2) == [0, 0, 1, 0, 0, 0]
    assert prefix_hits_lru(t, 3) == [0, 0, 1, 0, 1, 1]
    with pytest.raises(ValueError, match="current value: -1"):
        prefix_hits_lru(t, -1)


def test_oracle_hit_ratio_single_cache_bound() -> None:
    t = _trace((1, 2), (1, 2), (3, 4), (1, 2), lengths=[8, 7, 8, 8])
    r = oracle_hit_ratio(t, 2)
    # LRU of 2: hits 0, 2, 0, 0 (3, 4 evicted 1, 2); infinite: 0, 2, 0, 2.
    assert r.block_hit_lru == pytest.approx(2 / 8) and r.block_hit_inf == pytest.approx(4 / 8)
    assert r.token_hit_lru == pytest.approx(7 / 31) and r.token_hit_inf == pytest.approx(15 / 31)
    assert oracle_hit_ratio(t, 10**6).token_hit_lru == r.token_hit_inf


def test_no_prefix_info_has_no_cache_stats() -> None:
    t = Trace(
        requests=(TraceRequest(timestamp_s=0.0, input_length=5, output_length=2, request_id="a"),),
        block_tokens=0,
        name="azure",
    )
    s = trace_stats(t)
    assert s.cache is None and s.req_per_s == 0.0 and s.input.p50 == 5
    assert "n/a" in format_stats(s)
    with pytest.raises(ValueError, match="no prefix information"):
        oracle_hit_ratio(t, 10)


# --- the traces' published statistics tables, number for number ------------------------------------

README_MAIN = {
    # trace: requests, duration, req/s, in mean/p50/p99, out mean/p50/p99, block size,
    #        input blocks, unique blocks, seen-before, prefix hit inf, token hit inf, LRU 10k/50k/200k
    "mooncake/conversation_trace.jsonl": (
        "12,031", "3,537", "3.40", "12,035 / 6,909 / 85,401", "343 / 350 / 1,120", "512",
        "288,500", "182,790", "36.6%", "36.6%", "37.4%", "21.2%", "35.5%", "36.6%",
    ),
    "mooncake/synthetic_trace.jsonl": (
        "3,993", "1,022", "3.91", "15,325 / 11,587 / 66,458", "149 / 69 / 769", "512",
        "121,877", "43,924", "64.0%", "64.0%", "65.1%", "42.4%", "64.0%", "64.0%",
    ),
}  # fmt: skip
README_AZURE = {
    "azure_llm_2023/AzureLLMInferenceTrace_code.csv": (
        "8,819", "3,436", "2.57", "2,048 / 1,469 / 7,436", "27.9 / 13 / 252",
    ),
    "azure_llm_2023/AzureLLMInferenceTrace_conv.csv": (
        "19,366", "3,502", "5.53", "1,155 / 1,020 / 4,142", "211 / 129 / 601",
    ),
}  # fmt: skip
README_SMALL_LRU = {
    "mooncake/conversation_trace.jsonl": ("4.2%", "4.5%", "5.4%", "11.2%"),
    "mooncake/synthetic_trace.jsonl": ("4.5%", "8.4%", "14.6%", "27.9%"),
}
README_HIT_GE = {  # fraction of requests with prefix hit >= 1 / >= 2 blocks
    "mooncake/conversation_trace.jsonl": ("99.99%", "38.7%"),
    "mooncake/synthetic_trace.jsonl": ("44.6%", "43.8%"),
}


def _n(x: float) -> str:
    return f"{round(x):,}" if abs(x) >= 100 else f"{x:.3g}"


def _pct(x: float, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f}%"


def _load(rel: str) -> Trace:
    path = SHARED / rel
    assert path.exists(), f"bundled trace missing: {path}"
    trace, report = load_trace(path)
    assert report.ok
    return trace


def _basic(trace: Trace) -> tuple[str, ...]:
    s = trace_stats(trace, lru_sizes=())
    return (
        f"{s.requests:,}",
        _n(s.duration_s),
        f"{s.req_per_s:.2f}",
        f"{_n(s.input.mean)} / {_n(s.input.p50)} / {_n(s.input.p99)}",
        f"{_n(s.output.mean)} / {_n(s.output.p50)} / {_n(s.output.p99)}",
    )


@pytest.mark.parametrize("rel", sorted(README_MAIN))
def test_readme_tables_mooncake(rel: str) -> None:
    trace = _load(rel)
    s = trace_stats(trace, lru_sizes=(500, 1000, 2000, 5000, 10000, 50000, 200000))
    c = s.cache
    assert c is not None
    got = (
        *_basic(trace),
        str(c.block_tokens),
        f"{c.input_blocks:,}",
        f"{c.unique_blocks:,}",
        _pct(c.seen_before),
        _pct(c.prefix_hit_inf),
        _pct(c.token_hit_inf),
        *(_pct(c.lru_prefix_hit[n]) for n in (10000, 50000, 200000)),
    )
    assert got == README_MAIN[rel]
    assert tuple(_pct(c.lru_prefix_hit[n]) for n in (500, 1000, 2000, 5000)) == README_SMALL_LRU[rel]
    ge1, ge2 = README_HIT_GE[rel]
    assert _pct(c.frac_hit_ge1, len(ge1.split(".")[1]) - 1) == ge1
    assert _pct(c.frac_hit_ge2) == ge2
    # The Mooncake ids are chained hashes, so seen-before equals the prefix hit exactly.
    assert c.seen_before == c.prefix_hit_inf


@pytest.mark.parametrize("rel", sorted(README_AZURE))
def test_readme_table_azure(rel: str) -> None:
    trace = _load(rel)
    assert _basic(trace) == README_AZURE[rel]
    assert trace_stats(trace).cache is None


def test_oracle_on_mooncake_matches_lru_table() -> None:
    trace = _load("mooncake/conversation_trace.jsonl")
    r = oracle_hit_ratio(trace, 10000)
    assert _pct(r.block_hit_lru) == "21.2%" and _pct(r.token_hit_inf) == "37.4%"
    assert r.token_hit_lru <= r.token_hit_inf


def test_bundled_slice_matches_its_documented_stats() -> None:
    path = Path(__file__).parents[2] / "traces" / "data" / "mooncake_conv_slice.jsonl"
    assert path.stat().st_size < 200_000
    trace, report = load_trace(path)
    assert report.ok and report.warned == 0
    c = trace_stats(trace, lru_sizes=(1000, 5000, 20000))
    assert (c.requests, _n(c.duration_s), f"{c.req_per_s:.2f}") == (750, "252", "2.98")
    assert c.cache is not None
    assert (c.cache.input_blocks, c.cache.unique_blocks) == (20520, 16840)
    assert (_pct(c.cache.prefix_hit_inf), _pct(c.cache.token_hit_inf)) == ("17.9%", "18.2%")
    assert [_pct(v) for v in c.cache.lru_prefix_hit.values()] == ["3.8%", "9.7%", "17.9%"]
    full = SHARED / "mooncake" / "conversation_trace.jsonl"
    if full.exists():  # cut as documented: the first 750 lines, byte for byte
        with full.open("rb") as f:
            head = b"".join(next(f) for _ in range(750))
        assert path.read_bytes() == head
