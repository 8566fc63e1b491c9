"""The fast /metrics parser against the golden vLLM 0.32 capture and prometheus_client's parser."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from router.replicas.engine_metrics import parse_engine_metrics, parse_labels

GOLDEN = Path(__file__).parent / "golden" / "vllm-0.32-metrics.txt"


def test_golden_capture_matches_reference_parser() -> None:
    text = GOLDEN.read_text()
    m = parse_engine_metrics(text)
    ref: dict[str, float] = {}
    info: dict[str, str] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            ref[s.name] = ref.get(s.name, 0.0) + s.value
            if s.name == "vllm:cache_config_info":
                info = dict(s.labels)
    assert m.running == ref["vllm:num_requests_running"]
    assert m.waiting == ref["vllm:num_requests_waiting"]
    assert m.kv_usage == ref["vllm:kv_cache_usage_perc"]
    assert m.prefix_queries == ref["vllm:prefix_cache_queries_total"]
    assert m.prefix_hits == ref["vllm:prefix_cache_hits_total"]
    assert m.cache_config == info
    assert m.block_size == 32
    assert m.num_gpu_blocks == 96


def test_dp_ranks_are_summed_and_usage_averaged() -> None:
    text = (
        'vllm:num_requests_running{engine="0",model_name="m"} 2.0\n'
        'vllm:num_requests_running{engine="1",model_name="m"} 3.0\n'
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.2\n'
        'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.6\n'
        "vllm:gpu_prefix_cache_hits_total 7\n"
    )
    m = parse_engine_metrics(text)
    assert m.running == 5.0
    assert abs((m.kv_usage or 0) - 0.4) < 1e-9
    assert m.prefix_hits == 7.0


def test_label_escapes() -> None:
    assert parse_labels('a="x",b="q\\"uote",c="new\\nline"') == {"a": "x", "b": 'q"uote', "c": "new\nline"}
