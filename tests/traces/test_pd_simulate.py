"""Offline PD: the same trace on an aggregated fleet and on prefill + decode pools."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from traces.loaders import load_trace
from traces.model import Trace
from traces.pd_simulate import PDConfig, parse_rule, run_pd
from traces.simulate import SimConfig

ROOT = Path(__file__).resolve().parents[2]
MOONCAKE = ROOT / "traces" / "data" / "mooncake" / "conversation_trace.jsonl"
N = 150


@pytest.fixture(scope="module")
def trace() -> Trace:
    return load_trace(str(MOONCAKE))[0]


def _cfg() -> SimConfig:
    return SimConfig(replicas=4, max_requests=N)


def test_always_splits_every_request_and_moves_its_kv(trace: Trace) -> None:
    run = run_pd(trace, _cfg(), PDConfig(prefill_replicas=1, decode_replicas=3, rule="always"))
    assert run.extra["split_share"] == 1.0
    assert run.summary["ok"] == N
    assert run.extra["pd_outcomes"] == {"split": N}
    # Every prompt's KV past the decode replica's own hit crossed the link, none was recomputed there.
    assert run.extra["kv_transfer_tokens"] > 0
    for rec in run.records:
        assert rec.ttft_s is not None and rec.e2e_s is not None and rec.ttft_s <= rec.e2e_s
        assert rec.cached_tokens is not None and rec.cached_tokens >= rec.prompt_tokens - 1


def test_never_splits_nothing_and_threshold_follows_its_n(trace: Trace) -> None:
    never = run_pd(trace, _cfg(), PDConfig(prefill_replicas=1, decode_replicas=3, rule="never"))
    assert never.extra["split_share"] == 0.0 and never.extra["kv_transfer_tokens"] == 0
    thr = run_pd(
        trace,
        _cfg(),
        PDConfig(prefill_replicas=1, decode_replicas=3, rule="threshold", threshold_tokens=8000),
    )
    split = thr.extra["pd_outcomes"].get("split", 0)
    assert 0 < split < N
    long_prompts = sum(1 for r in thr.records if r.prompt_tokens >= 8000)
    assert split <= long_prompts


def test_split_ttft_counts_from_the_clients_send(trace: Trace) -> None:
    """A split request's TTFT includes leg 1 (prefill on P) and the transfer, not only D's part."""
    cfg = SimConfig(replicas=2, max_requests=5, speedup=0.01)  # requests alone on the fleet
    split = run_pd(trace, cfg, PDConfig(prefill_replicas=1, decode_replicas=1, rule="always"))
    local = run_pd(trace, cfg, PDConfig(prefill_replicas=1, decode_replicas=1, rule="never"))
    for s, lo in zip(split.records, local.records, strict=True):
        assert s.ttft_s is not None and lo.ttft_s is not None
        assert s.ttft_s > lo.ttft_s  # alone, the extra hop and transfer can only add


def test_parse_rule() -> None:
    assert parse_rule("auto") == ("auto", None)
    assert parse_rule("threshold:512") == ("threshold", 512)
    for bad in ("sometimes", "auto:3", "threshold:x"):
        with pytest.raises(ValueError):
            parse_rule(bad)


def test_cli_prints_the_three_way_comparison_in_json() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    argv = [sys.executable, "-m", "router", "simulate", "--trace", str(MOONCAKE), "--max-requests", "60",
            "--replicas", "3", "--prefill-replicas", "1", "--decode-replicas", "2", "--pd", "always",
            "--pd", "auto", "--pd", "threshold:1024", "--json"]  # fmt: skip
    out = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True)
    report = json.loads(out.stdout)
    pols = report["policies"]
    assert set(pols) == {"cache_aware", "1P+2D always", "1P+2D auto", "1P+2D threshold:1024"}
    for name in ("1P+2D always", "1P+2D auto", "1P+2D threshold:1024"):
        for key in ("ttft_mean_s", "ttft_p99_s", "tpot_mean_s", "goodput_rps", "split_share", "pd_outcomes"):
            assert key in pols[name], (name, key)
    assert pols["1P+2D always"]["split_share"] == 1.0


def test_replay_reads_the_split_share_of_a_live_pd_fleet_from_its_engines() -> None:
    from traces.records import SLO, RequestRecord
    from traces.replay import engine_delta
    from traces.report import COLUMNS, table_rows

    page = 'vllm:nixl_xfer_time_seconds_count{{engine="0",model_name="m"}} {n}\n'
    delta = engine_delta({"http://d": page.format(n=2)}, {"http://d": page.format(n=5)})
    assert delta["kv_transfers"] == 3
    recs = [RequestRecord(request_id=str(i), target="t", send_s=0.0, prompt_tokens=10) for i in range(4)]
    from traces.replay import target_summary

    class _Run:
        records = recs
        wall_s = 1.0
        lateness_p99_s = 0.0
        lateness_max_s = 0.0
        cancelled = 0

    class _Cfg:
        slo = SLO()

    s = target_summary(_Run(), _Cfg(), delta)  # type: ignore[arg-type]
    assert s["split_share"] == 0.75
    row = table_rows({"pd": s})[0]
    assert row[COLUMNS.index("split")] == "75.0%"


def test_both_replicas_never_splitting_is_the_aggregated_fleet(trace: Trace) -> None:
    """kv_both replicas under rule never serve exactly like the aggregated cache_aware fleet."""
    from traces.simulate import simulate_runs

    cfg = _cfg()
    agg = simulate_runs(trace, cfg, ["cache_aware"])[0]
    never = run_pd(trace, cfg, PDConfig(prefill_replicas=0, decode_replicas=0, both_replicas=4, rule="never"))
    assert never.name == "4B never"
    assert [r.ttft_s for r in never.records] == [r.ttft_s for r in agg.records]
    assert [r.replica for r in never.records] == [r.replica for r in agg.records]


def test_both_replicas_split_to_another_both_replica(trace: Trace) -> None:
    run = run_pd(
        trace, _cfg(), PDConfig(prefill_replicas=0, decode_replicas=0, both_replicas=4, rule="always")
    )
    assert run.extra["split_share"] == 1.0 and run.summary["ok"] == N
    assert run.extra["kv_transfer_tokens"] > 0
    for rec in run.records:
        assert rec.cached_tokens is not None and rec.cached_tokens >= rec.prompt_tokens - 1
    mixed = run_pd(
        trace, _cfg(), PDConfig(prefill_replicas=1, decode_replicas=0, both_replicas=3, rule="auto")
    )
    assert mixed.name == "1P+3B auto" and mixed.summary["ok"] == N


def test_pd_config_needs_a_decode_and_a_prefill_capable_replica() -> None:
    with pytest.raises(ValueError):
        PDConfig(prefill_replicas=2, decode_replicas=0)
    with pytest.raises(ValueError):
        PDConfig(prefill_replicas=0, decode_replicas=2)
    assert PDConfig(prefill_replicas=0, decode_replicas=0, both_replicas=1).fleet == "1B"
