"""traces.aiperf_compare's offline parts: parsing AIPerf 0.13's JSON export, the engine-metric deltas,
the Mooncake window, the fake hub entry for the tokenizer and the table. No AIPerf is run here (it lives
in its own venv; `make compare-aiperf` runs it live).

The exports in data/aiperf/ are real ``profile_export_aiperf.json`` (.json) and per-request
``profile_export.jsonl`` (.jsonl) files written by aiperf 0.13.0 against
``kvrouter serve --policy cache_aware`` on simulated replicas, trimmed to the keys the parser reads plus
their provenance (schema_version, run_info.cli_command, timestamps, x_request_id); every value is as
AIPerf wrote it.
``kvrouter_synthetic.json``: the shared-prefix synthetic workload, 24 requests, no errors.
``kvrouter_context_errors.json``: replicas with ``--max-model-len 160`` and ``--isl 110 --isl-stddev 40``,
so 5 of 16 prompts were too long and the engines' 400s came back through the router.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from traces.aiperf_compare import (
    COLUMNS,
    EXPORT_FILE,
    FAKE_REVISION,
    MAX_DROPPED_S,
    AiperfSummary,
    CacheSplit,
    EngineDelta,
    ExportError,
    RunResult,
    engine_counters,
    engine_delta,
    fake_hub_tokenizer,
    mooncake_window,
    parse_export,
    ratio_rows,
    summarize_export,
    table_rows,
    ttft_by_cache,
)

DATA = Path(__file__).parent / "data" / "aiperf"


def test_parse_synthetic_export() -> None:
    s = parse_export(DATA / "kvrouter_synthetic.json")
    assert s.aiperf_version == "0.13.0"
    assert (s.requests_ok, s.errors, s.error_kinds, s.was_cancelled) == (24, 0, {}, False)
    assert s.ttft_mean_ms == pytest.approx(84.034425375)
    assert s.ttft_p50_ms == pytest.approx(69.89941999999999)
    assert s.ttft_p99_ms == pytest.approx(156.57983613)
    assert s.itl_mean_ms == pytest.approx(6.757808455645161)
    assert s.itl_p50_ms == pytest.approx(6.701715806451613)
    assert s.req_per_s == pytest.approx(23.401167858683152)
    assert s.output_tok_per_s == pytest.approx(748.8373714778609)
    assert s.duration_s == pytest.approx(1.0067189760000002)
    # usage.prompt_tokens_details.cached_tokens as kvrouter relayed them from the engines.
    assert s.cache_read_pct == pytest.approx(56.40228097459824)


def test_parse_export_with_errors() -> None:
    s = parse_export(DATA / "kvrouter_context_errors.json")
    # request_count counts successes only; the 5 context-length 400s are AIPerf's error_request_count.
    assert (s.requests_ok, s.errors) == (11, 5)
    assert s.error_kinds == {"400 Bad Request": 5}
    assert s.ttft_p50_ms == pytest.approx(33.895275)
    assert s.cache_read_pct == 0.0


def test_error_count_from_summary_when_total_absent() -> None:
    export = json.loads((DATA / "kvrouter_context_errors.json").read_text())
    del export["error_request_count"]
    assert summarize_export(export).errors == 5


def test_parse_export_reads_the_artifact_folder(tmp_path: Path) -> None:
    (tmp_path / EXPORT_FILE).write_text((DATA / "kvrouter_synthetic.json").read_text())
    assert parse_export(tmp_path) == parse_export(DATA / "kvrouter_synthetic.json")


def test_ttft_split_by_cache_read_recombines_to_aiperfs_mean() -> None:
    s = ttft_by_cache(DATA / "kvrouter_synthetic.jsonl")
    assert (s.cached, s.uncached) == (17, 7)
    assert s.cached_ttft_mean_ms == pytest.approx(67.33192464705883)
    assert s.uncached_ttft_mean_ms == pytest.approx(124.59764142857144)
    whole = parse_export(DATA / "kvrouter_synthetic.json")
    recombined = (s.cached * s.cached_ttft_mean_ms + s.uncached * s.uncached_ttft_mean_ms) / whole.requests_ok
    assert recombined == pytest.approx(whole.ttft_mean_ms)


def test_ttft_split_leaves_failed_requests_out(tmp_path: Path) -> None:
    s = ttft_by_cache(DATA / "kvrouter_context_errors.jsonl")
    # 16 records: the 5 context-length errors are skipped, the 11 successes read nothing from cache.
    assert (s.cached, s.uncached) == (0, 11)
    assert math.isnan(s.cached_ttft_mean_ms)
    assert s.uncached_ttft_mean_ms == pytest.approx(
        parse_export(DATA / "kvrouter_context_errors.json").ttft_mean_ms
    )
    (tmp_path / "profile_export.jsonl").write_text((DATA / "kvrouter_synthetic.jsonl").read_text())
    assert ttft_by_cache(tmp_path) == ttft_by_cache(DATA / "kvrouter_synthetic.jsonl")


@pytest.mark.parametrize(
    ("drop", "message"),
    [("time_to_first_token", "time_to_first_token.avg"), ("inter_token_latency", "inter_token_latency.avg")],
)
def test_missing_latency_is_an_error(drop: str, message: str) -> None:
    export = json.loads((DATA / "kvrouter_synthetic.json").read_text())
    del export[drop]
    with pytest.raises(ExportError, match=message):
        summarize_export(export)


def test_non_numeric_stat_is_an_error() -> None:
    export = json.loads((DATA / "kvrouter_synthetic.json").read_text())
    export["time_to_first_token"]["p99"] = "N/A"
    with pytest.raises(ExportError, match="p99"):
        summarize_export(export)


METRICS = """\
# HELP vllm:prefix_cache_hits Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="tiny-llama"} %(hits)s
vllm:prefix_cache_queries_total{engine="0",model_name="tiny-llama"} %(queries)s
vllm:request_success_total{engine="0",finished_reason="length",model_name="tiny-llama"} %(ok)s
vllm:request_success_total{engine="0",finished_reason="abort",model_name="tiny-llama"} 1.0
kvrouter_sim_dropped_seconds_total{replica="r0"} %(dropped)s
vllm:prefix_cache_hits_created{engine="0",model_name="tiny-llama"} 1.7e9
"""


def test_engine_delta_hit_ratio_requests_and_dropped_time() -> None:
    def page(hits: float, queries: float, ok: float, dropped: float) -> dict[str, float]:
        return engine_counters(METRICS % {"hits": hits, "queries": queries, "ok": ok, "dropped": dropped})

    before = {"a": page(100, 1000, 2, 0.5), "b": page(0, 0, 0, 0)}
    after = {"a": page(700, 3000, 12, 0.75), "b": page(300, 2000, 9, 0)}
    d = engine_delta(before, after)
    assert d.hit_ratio == pytest.approx((600 + 300) / (2000 + 2000))
    # Success counts add over finished_reason labels (the abort line is the same in both).
    assert d.requests_per_replica == [10, 9]
    assert d.dropped_s == pytest.approx(0.25)
    assert math.isnan(engine_delta({}, {"a": page(0, 0, 0, 0)}).hit_ratio)


def test_mooncake_window_keeps_rows_and_rebases_time(tmp_path: Path) -> None:
    src = tmp_path / "t.jsonl"
    rows = [
        {"timestamp": 5000 + 250 * i, "input_length": 600, "output_length": 3, "hash_ids": [i]}
        for i in range(6)
    ]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    n, span = mooncake_window(src, 4, tmp_path / "w" / "window.jsonl")
    got = [json.loads(x) for x in (tmp_path / "w" / "window.jsonl").read_text().splitlines()]
    assert (n, span) == (4, 0.75)
    assert [r["timestamp"] for r in got] == [0, 250, 500, 750]
    assert [r["hash_ids"] for r in got] == [[0], [1], [2], [3]]
    assert mooncake_window(src, 100, tmp_path / "all.jsonl")[0] == 6
    # slowdown 2: half the request rate, same rows.
    assert mooncake_window(src, 3, tmp_path / "slow.jsonl", slowdown=2.0) == (3, 1.0)
    slow = [json.loads(x)["timestamp"] for x in (tmp_path / "slow.jsonl").read_text().splitlines()]
    assert slow == [0, 500, 1000]
    with pytest.raises(ValueError, match="slowdown"):
        mooncake_window(src, 3, tmp_path / "bad.jsonl", slowdown=0)


def test_fake_hub_entry_for_a_tokenizer_folder(tmp_path: Path) -> None:
    tok = tmp_path / "tiny-llama"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"version": "1.0"}')
    (tok / "tokenizer_config.json").write_text("{}")
    (tok / "model.safetensors").write_text("weights are not copied")
    name = fake_hub_tokenizer(tok, tmp_path / "hf")
    entry = tmp_path / "hf" / "hub" / "models--local--tiny-llama"
    snap = entry / "snapshots" / FAKE_REVISION
    assert name == "local/tiny-llama"
    assert (entry / "refs" / "main").read_text() == FAKE_REVISION
    assert sorted(p.name for p in snap.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    # Idempotent: a second run over the same hub folder gives the same entry.
    assert fake_hub_tokenizer(tok, tmp_path / "hf") == name
    (tok / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError):
        fake_hub_tokenizer(tok, tmp_path / "hf2")


def test_table_and_ratios_from_parsed_exports() -> None:
    kv = parse_export(DATA / "kvrouter_synthetic.json")
    other = AiperfSummary(
        **{**kv.__dict__, "ttft_mean_ms": 2 * kv.ttft_mean_ms, "ttft_p50_ms": kv.ttft_p50_ms}
    )
    eng = EngineDelta(hit_ratio=0.564, requests_per_replica=[6, 6, 6, 6], dropped_s=0.0)
    split = CacheSplit(17, 67.33, 7, 124.6)
    results = [
        RunResult("synthetic", 1, "kvrouter", kv, eng, split, 1.1, 4.2, 5.4),
        RunResult("synthetic", 1, "sglang-router", other, eng, None, 0.6, 5.4, 6.6),
        RunResult("mooncake", 1, "kvrouter", error="aiperf exited 1"),
    ]
    rows = table_rows(results)
    assert all(len(r) == len(COLUMNS) for r in rows)
    assert rows[0][:7] == ["synthetic", "1", "kvrouter", "24/0", "84.0", "69.9", "156.6"]
    assert rows[0][7:] == [
        "67.3 (17)",
        "124.6 (7)",
        "6.76",
        "23.40",
        "0.564",
        "56.4",
        "0.0",
        "1.1",
        "4.2→5.4",
    ]
    assert rows[1][7:9] == ["—", "—"]
    assert rows[2][3] == "failed"
    assert ratio_rows(results) == [
        "synthetic run 1: kvrouter / sglang-router: TTFT mean 0.50, p50 1.00, p99 1.00"
    ]
    # A run whose sim fell behind by more than MAX_DROPPED_S is flagged in the table and the ratios.
    results[1].engines = EngineDelta(hit_ratio=0.5, requests_per_replica=[], dropped_s=MAX_DROPPED_S + 0.1)
    assert [r[1] for r in table_rows(results)] == ["1", "1 starved", "1"]
    assert ratio_rows(results)[0].endswith("p99 1.00 (starved: not a routing measurement)")
