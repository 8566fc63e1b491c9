"""The sim's /metrics page against real vLLM 0.32's (golden capture): names, types, labels, buckets."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from engines.sim.replica.metrics import SimMetrics, cache_config_labels

GOLDEN = Path(__file__).resolve().parents[1] / "router" / "golden" / "vllm-0.32-metrics.txt"

# What a router reads (DESIGN.md "Replica state"), with the type vLLM gives it.
ROUTING_METRICS = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter",
    "vllm:external_prefix_cache_queries": "counter",
    "vllm:external_prefix_cache_hits": "counter",
    "vllm:prompt_tokens": "counter",
    "vllm:prompt_tokens_cached": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:num_preemptions": "counter",
    "vllm:request_success": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:request_queue_time_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:request_prefill_time_seconds": "histogram",
    "vllm:request_decode_time_seconds": "histogram",
    "vllm:cache_config_info": "gauge",
}


def _families(text: str) -> dict[str, tuple[str, list[Sample]]]:
    return {f.name: (f.type, f.samples) for f in text_string_to_metric_families(text)}


@pytest.fixture(scope="module")
def golden() -> dict[str, tuple[str, list[Sample]]]:
    if not GOLDEN.exists():
        pytest.skip("golden capture not available")
    return _families(GOLDEN.read_text())


def _ours() -> tuple[SimMetrics, dict[str, tuple[str, list[Sample]]]]:
    m = SimMetrics("tiny", cache_config_labels(block_size=32, num_gpu_blocks=96, num_gpu_blocks_override=96))
    m.on_scheduled(prompt_tokens=100, local_hit_tokens=64, external_queried=36, external_hit_tokens=32)
    m.on_tokens(3)
    m.on_first_token(0.03)
    m.on_inter_token(0.01)
    m.on_finished("length", 100, 3, e2e_s=0.5, queue_s=0.01, prefill_s=0.02, decode_s=0.4)
    m.on_step(running=2, waiting=1, kv_usage=0.25, scheduled_tokens=40, lag_s=0.002)
    return m, _families(m.render().decode())


def test_routing_metrics_match_vllm_names_types_labels_buckets(
    golden: dict[str, tuple[str, list[Sample]]],
) -> None:
    _, ours = _ours()
    for name, typ in ROUTING_METRICS.items():
        assert golden[name][0] == typ, name  # the table itself is right about vLLM
        assert ours[name][0] == typ, name
        g_samples, o_samples = golden[name][1], ours[name][1]
        assert {s.name for s in o_samples} == {s.name for s in g_samples}, name
        if name == "vllm:cache_config_info":
            continue  # label set compared below: vLLM has many more config labels
        g_labels = {frozenset(s.labels) for s in g_samples}
        o_labels = {frozenset(s.labels) for s in o_samples}
        assert o_labels == g_labels, name
        if typ == "histogram":
            g_le = [s.labels["le"] for s in g_samples if s.name.endswith("_bucket")]
            o_le = [s.labels["le"] for s in o_samples if s.name.endswith("_bucket")]
            assert o_le == g_le, name
    for s in ours["vllm:num_requests_running"][1]:
        assert s.labels == {"engine": "0", "model_name": "tiny"}
    reasons = {s.labels["finished_reason"] for s in ours["vllm:request_success"][1]}
    assert reasons == {s.labels["finished_reason"] for s in golden["vllm:request_success"][1]}


def test_cache_config_info_carries_what_a_router_reads(golden: dict[str, tuple[str, list[Sample]]]) -> None:
    _, ours = _ours()
    (g,) = golden["vllm:cache_config_info"][1]
    (o,) = ours["vllm:cache_config_info"][1]
    for key in (
        "block_size",
        "enable_prefix_caching",
        "num_gpu_blocks",
        "prefix_caching_hash_algo",
        "engine",
    ):
        assert o.labels[key] == g.labels[key], key
    assert set(o.labels) <= set(g.labels)
    assert o.value == 1.0


def test_values_count_tokens_and_requests() -> None:
    _, fams = _ours()

    def value(name: str, sample: str, **labels: str) -> float:
        return next(s.value for s in fams[name][1] if s.name == sample and labels.items() <= s.labels.items())

    assert value("vllm:prefix_cache_queries", "vllm:prefix_cache_queries_total") == 100
    assert value("vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total") == 64
    assert value("vllm:external_prefix_cache_hits", "vllm:external_prefix_cache_hits_total") == 32
    assert value("vllm:prompt_tokens_cached", "vllm:prompt_tokens_cached_total") == 96
    assert value("vllm:request_success", "vllm:request_success_total", finished_reason="length") == 1
    assert value("vllm:request_success", "vllm:request_success_total", finished_reason="abort") == 0
    assert value("vllm:num_requests_waiting", "vllm:num_requests_waiting") == 1
    assert value("vllm:kv_cache_usage_perc", "vllm:kv_cache_usage_perc") == 0.25
    assert value("vllm:time_to_first_token_seconds", "vllm:time_to_first_token_seconds_count") == 1
    assert (
        value("vllm:time_to_first_token_seconds", "vllm:time_to_first_token_seconds_bucket", le="0.04") == 1
    )
    assert (
        value("vllm:time_to_first_token_seconds", "vllm:time_to_first_token_seconds_bucket", le="0.02") == 0
    )
    assert value("kvrouter_sim_lag_seconds", "kvrouter_sim_lag_seconds") == 0.002


def test_replicas_have_separate_registries() -> None:
    a = SimMetrics("m", cache_config_labels(16, 10))
    b = SimMetrics("m", cache_config_labels(16, 10))
    a.on_tokens(5)
    assert b'vllm:generation_tokens_total{engine="0",model_name="m"} 0.0' in b.render()
    assert b'vllm:generation_tokens_total{engine="0",model_name="m"} 5.0' in a.render()


def test_render_is_byte_identical_to_generate_latest() -> None:
    """render() formats values into a template made once; it must equal prometheus_client's page."""
    import random

    from prometheus_client import generate_latest

    m = SimMetrics("tiny", cache_config_labels(block_size=16, num_gpu_blocks=1000))
    assert m._page is not None  # the fast path is in use
    assert m.render() == generate_latest(m.registry)
    rng = random.Random(0)
    for i in range(300):
        m.on_step(rng.randrange(50), rng.randrange(50), rng.random(), rng.randrange(9000), rng.random() / 100)
        m.on_inter_token(rng.random() / 10)
        m.on_first_token(rng.random() * 3)
        m.on_scheduled(rng.randrange(12000), rng.randrange(12000), rng.randrange(100), rng.randrange(100))
        m.on_tokens(rng.randrange(3))
        m.on_preemption()
        m.on_delivered(rng.random() / 100)
        m.on_prepared(rng.random() / 10)
        if i % 7 == 0:
            reason = rng.choice(["length", "stop", "abort", "unknown"])
            m.on_finished(reason, 100, 5, e2e_s=1e6 * rng.random(), queue_s=0.1, prefill_s=0.2, decode_s=0.3)
        if i % 25 == 0:
            assert m.render() == generate_latest(m.registry), i
    assert m.render() == generate_latest(m.registry)
    # render() reuses a slot's text while its value is unchanged; -0.0 equals 0.0 but prints apart.
    for lag in (0.0, -0.0, 0.0):
        m.on_step(1, 0, 0.0, 1, lag)
        assert m.render() == generate_latest(m.registry)


def test_hot_hooks_kept_aside_give_the_same_page_as_direct_updates() -> None:
    """on_step / on_tokens / on_inter_token keep their updates in plain Python until a scrape; the
    page equals one where every update went to prometheus_client at once (values, buckets, sums
    to the last bit), whenever it is scraped, idle in between or not."""
    import random

    from prometheus_client import generate_latest

    labels = cache_config_labels(
        block_size=16, num_gpu_blocks=100, num_cpu_blocks=None, enable_prefix_caching=True
    )
    fast, ref = SimMetrics("m", labels), SimMetrics("m", labels)
    rng = random.Random(5)

    def page(m: SimMetrics) -> list[str]:
        text = m.render().decode()
        return [line for line in text.splitlines() if "_created" not in line]

    for i in range(3000):
        op = rng.random()
        if op < 0.5:
            args = (
                rng.randrange(9),
                rng.randrange(5),
                rng.random(),
                rng.choice([0, 1, 17, 8192]),
                rng.random() / 50,
            )
            fast.on_step(*args)
            running, waiting, kv, sched, lag = args
            ref.running.set(running)
            ref.waiting.set(waiting)
            ref.kv_usage.set(kv)
            if sched > 0:
                ref.iteration_tokens.observe(sched)
            ref.lag.set(lag)
            ref.lag_hist.observe(max(0.0, lag))
        elif op < 0.75:
            n = rng.randrange(1, 4)
            fast.on_tokens(n)
            ref.generation_tokens.inc(n)
            gap = rng.choice([0.0, rng.random() / 10, 0.025])
            fast.on_inter_token(gap)
            ref.itl.observe(gap)
        elif op < 0.8:
            kv = rng.random()
            fast.on_idle(kv)
            ref.on_idle(kv)
        if i % 97 == 0 or op > 0.99:
            assert page(fast) == page(ref)
    assert page(fast) == page(ref)
    assert [x for x in generate_latest(fast.registry).decode().splitlines() if "_created" not in x] == page(
        ref
    )
