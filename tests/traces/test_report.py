"""Reports from synthetic records: markdown, JSON, PNGs, the 'why' section, in-flight series, oracle."""

from __future__ import annotations

import json
import math
from pathlib import Path

from traces.model import Trace, TraceRequest
from traces.records import SLO, RequestRecord, summarize
from traces.report import in_flight_series, load_max_over_mean, oracle, text_table, why, write_report


def _records(
    target: str, n: int, ttft: float, cached_frac: float, replicas: list[str]
) -> list[RequestRecord]:
    out = []
    for i in range(n):
        out.append(
            RequestRecord(
                request_id=str(i),
                target=target,
                send_s=0.1 * i,
                prompt_tokens=1000,
                output_tokens=11,
                ttft_s=ttft * (1 + i % 5 / 10),
                e2e_s=ttft + 0.5,
                itl_s=[0.05] * 10,
                cached_tokens=int(1000 * cached_frac),
                replica=replicas[i % len(replicas)],
                status=200,
            )
        )
    out.append(
        RequestRecord(
            request_id="bad", target=target, send_s=0.0, prompt_tokens=10, status=500, error="HTTP 500: boom"
        )
    )
    return out


def _summary(records: dict[str, list[RequestRecord]]) -> dict[str, object]:
    return {
        "trace": "synthetic",
        "requests": 21,
        "model": "m",
        "config": {"speedup": 2.0, "prompt": "tokens", "slo": {"ttft_s": 2.0, "tpot_s": 0.1}},
        "targets": {n: summarize(r, slo=SLO()) for n, r in records.items()},
    }


def test_report_files_and_contents(tmp_path: Path) -> None:
    records = {
        # cache_aware: more hits but uneven; round robin: even, no hits, slower.
        "cache_aware": _records("cache_aware", 20, 0.2, 0.5, ["a", "a", "b"]),
        "round_robin": _records("round_robin", 20, 0.8, 0.0, ["a", "b"]),
    }
    summary = _summary(records)
    oracle_info = {
        "fleet_cache_tokens": 10_000,
        "cache_blocks": 19,
        "block_tokens": 512,
        "token_hit_lru": 0.6,
        "token_hit_inf": 0.7,
    }
    files = write_report(str(tmp_path), summary, records, oracle_info=oracle_info, notes=["a note"])
    for name in ("report.md", "report.json", "ttft_cdf.png", "hit_ratio.png", "load_over_time.png"):
        path = tmp_path / name
        assert path.exists() and path.stat().st_size > 0, name
    assert (tmp_path / "ttft_cdf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = Path(files["markdown"]).read_text()
    assert "| cache_aware | 20/21 |" in md and "| round_robin | 20/21 |" in md
    assert "50.0%" in md and "60.0%" in md  # cache_aware hit ratio, oracle
    assert "## Why" in md and "HTTP 500: boom" in md and "a note" in md
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["targets"]["cache_aware"]["hit_ratio"] == 0.5
    assert data["oracle"]["token_hit_lru"] == 0.6
    # NaN never reaches JSON (the strict parser would reject it).
    assert "NaN" not in (tmp_path / "report.json").read_text()
    # The explanation names the faster target, the hit-ratio gap and the spread, from the numbers.
    w = " ".join(data["why"])
    assert w.startswith("**cache_aware vs round_robin**")
    assert "more of the prompt tokens in cache" in w and "less evenly" in w


def test_why_with_one_target_and_without_plots(tmp_path: Path) -> None:
    records = {"only": _records("only", 5, 0.1, 0.0, ["a"])}
    files = write_report(str(tmp_path), _summary(records), records, plots=False)
    assert set(files) == {"json", "markdown"}
    assert why(_summary(records)["targets"], None) == [
        "Only one target completed requests: nothing to compare."
    ]  # type: ignore[arg-type]
    assert "only" in text_table(_summary(records)["targets"])  # type: ignore[arg-type]


def test_in_flight_series_counts_overlaps() -> None:
    recs = [
        RequestRecord(
            request_id="1", target="t", send_s=0.0, prompt_tokens=1, ttft_s=0.1, e2e_s=2.0, replica="a"
        ),
        RequestRecord(
            request_id="2", target="t", send_s=1.0, prompt_tokens=1, ttft_s=0.1, e2e_s=2.0, replica="a"
        ),
        RequestRecord(request_id="3", target="t", send_s=0.5, prompt_tokens=1, ttft_s=0.2, error="cut"),
        RequestRecord(
            request_id="4", target="t", send_s=0.5, prompt_tokens=1, error="refused"
        ),  # no duration
    ]
    s = in_flight_series(recs)
    ts, ns = s["a"]
    assert max(ns) == 2 and ns[-1] == 0
    assert ts[ns.index(2)] == 1.0
    assert s["?"] == ([0.0, 0.5, 0.7], [0, 1, 0])


def test_load_spread_falls_back_to_engine_counters() -> None:
    s = {"load_spread": {"replicas": 0}, "engine": {"requests_per_replica": {"a": 30.0, "b": 10.0}}}
    assert load_max_over_mean(s) == 1.5
    assert math.isnan(load_max_over_mean({"load_spread": {}}))


def test_oracle_for_the_replayed_requests() -> None:
    reqs = tuple(
        TraceRequest(
            timestamp_s=float(i),
            input_length=1024,
            output_length=1,
            hash_ids=(0, 100 + i % 2),
            request_id=str(i),
        )
        for i in range(4)
    )
    trace = Trace(requests=reqs, block_tokens=512, name="t")
    o = oracle(trace, reqs, fleet_cache_tokens=512 * 100)
    # Block 0 hits 3 times, blocks 100/101 once each: 5 of 8 blocks.
    assert o is not None and o["cache_blocks"] == 100 and o["token_hit_lru"] == 5 / 8
    assert oracle(trace, reqs, None) is None


def test_load_spread_counts_replicas_that_got_nothing() -> None:
    from traces.records import RequestRecord, summarize

    recs = [
        RequestRecord(
            request_id=str(i),
            target="t",
            send_s=i,
            prompt_tokens=10,
            output_tokens=2,
            ttft_s=0.1,
            e2e_s=0.2,
            replica="r0",
        )
        for i in range(8)
    ]
    spread = summarize(recs, replicas=["r0", "r1", "r2", "r3"])["load_spread"]
    assert spread["max_over_mean"] == 4.0 and spread["min"] == 0
    assert summarize(recs)["load_spread"]["max_over_mean"] == 1.0
