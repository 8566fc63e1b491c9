"""Scorers (hand-computed tables), the bounded-load filter, the pipeline and the simple policies."""

from __future__ import annotations

import math
import random

import pytest

from router.index import PrefixIndex
from router.replicas.registry import Replica, ReplicaRegistry
from router.scoring.guard import BoundedLoadFilter
from router.scoring.kv_usage import KVUsageScorer
from router.scoring.latency import TailLatencyScorer
from router.scoring.pipeline import Explanation, Pipeline
from router.scoring.policies import POLICIES, build_policy
from router.scoring.prefix import PrefixCacheScorer
from router.scoring.queue import QueueDepthScorer
from router.scoring.ttft import EstimatedTTFTScorer
from router.types import BlockHash, KeyMode, ReplicaSpec, RequestInfo


def replicas(n: int) -> list[Replica]:
    reg = ReplicaRegistry(PrefixIndex(100))
    return [reg.add(ReplicaSpec(url=f"http://r{i}:8000", name=f"r{i}")) for i in range(n)]


def req(
    blocks: int = 4, gpu: list[int] | None = None, cpu: list[int] | None = None, bs: int = 16
) -> RequestInfo:
    r = RequestInfo(model="m", prompt_tokens=blocks * bs, block_size=bs, key_mode=KeyMode.TOKENS)
    r.block_hashes = [BlockHash(i) for i in range(blocks)]
    r.gpu_blocks = gpu or []
    r.any_tier_blocks = cpu or (gpu or [])
    return r


@pytest.mark.parametrize(
    ("gpu", "cpu", "expected"),
    [
        ([4, 2, 0], [4, 2, 0], [1.0, 0.5, 0.0]),
        ([0, 0, 0], [0, 0, 0], [0.0, 0.0, 0.0]),
        ([2, 2, 0], [2, 4, 4], [0.5, 0.5 + 0.8 * 0.5, 0.8]),  # CPU blocks earn 0.8 credit
    ],
)
def test_prefix_cache_scorer(gpu: list[int], cpu: list[int], expected: list[float]) -> None:
    reps = replicas(3)
    assert PrefixCacheScorer(cpu_credit=0.8).score(req(4, gpu, cpu), reps) == pytest.approx(expected)


def test_prefix_cache_neutral_without_blocks_and_uncertain_discount() -> None:
    reps = replicas(2)
    assert PrefixCacheScorer().score(req(0), reps) == [1.0, 1.0]
    s = PrefixCacheScorer()
    uncertain = req(4, [4, 4])
    uncertain.uncertain_slots = frozenset({0})
    assert s.score(uncertain, reps) == [0.5, 1.0]


@pytest.mark.parametrize(
    ("in_flight", "waiting", "expected"),
    [
        ([10, 5, 0], [None, None, None], [0.0, 0.5, 1.0]),  # llm-d queue_test.go table
        ([3, 3, 3], [None, None, None], [1.0, 1.0, 1.0]),
        ([0, 0, 0], [8.0, 0.0, 4.0], [0.0, 1.0, 0.5]),  # engine queue counts too
    ],
)
def test_queue_depth_scorer(in_flight: list[int], waiting: list[float | None], expected: list[float]) -> None:
    reps = replicas(3)
    for r, f, w in zip(reps, in_flight, waiting, strict=True):
        r.in_flight = f
        r.set_engine_load(None, w, None)
    assert QueueDepthScorer().score(req(), reps) == pytest.approx(expected)


def test_kv_usage_scorer() -> None:
    reps = replicas(3)
    for r, u in zip(reps, [0.9, 0.1, None], strict=True):
        r.kv_usage = u
    assert KVUsageScorer().score(req(), reps) == pytest.approx([0.1, 0.9, 1.0])
    for r in reps:
        r.kv_usage = 0.5
    assert KVUsageScorer().score(req(), reps) == [1.0, 1.0, 1.0]


def test_tail_latency_scorer() -> None:
    reps = replicas(3)
    for r, ttfts in zip(reps, [[0.1] * 10, [0.1] * 8 + [2.0, 2.0], []], strict=True):
        for t in ttfts:
            r.observe_ttft(t, 0)
    # p90: 0.1, 2.0, 0 (nothing observed)
    assert TailLatencyScorer().score(req(), reps) == pytest.approx([0.95, 0.0, 1.0])


def test_estimated_ttft_trades_hit_against_queue() -> None:
    reps = replicas(2)
    scorer = EstimatedTTFTScorer(default_rate=1000.0, step_s=0.0)
    r = req(blocks=64, gpu=[64, 0])  # 1024 tokens; replica 0 holds all of them
    # equal queues: the hit wins (1 uncached token vs 1024)
    scores = scorer.score(r, reps)
    assert scores[0] == 1.0 and scores[1] < 0.01
    # replica 0 has 5000 tokens of prefill queued: 5.0 s vs 1.024 s -> replica 1 wins
    reps[0].pending_prefill_tokens = 5000
    est = scorer.estimates(r, reps)
    assert est == pytest.approx([5.0, 1.024])
    assert scorer.score(r, reps)[1] == 1.0


def test_bounded_load_filter_never_empties() -> None:
    reps = replicas(4)
    for r, load in zip(reps, [12, 0, 1, 1], strict=True):
        r.in_flight = load
    kept = BoundedLoadFilter(1.5).filter(req(), reps)
    # limit = 1.5 * (14 + 1) / 4 = 5.625: the replica with 12 is excluded
    assert [r.id for r in kept] == ["r1", "r2", "r3"]
    for r in reps:
        r.in_flight = 100
    assert len(BoundedLoadFilter(1.0).filter(req(), reps)) == 4


def test_pipeline_weights_clamps_and_explains() -> None:
    reps = replicas(3)

    class Wild:
        type_name = "wild"

        def score(self, _r: RequestInfo, rs: list[Replica]) -> list[float]:
            return [5.0, -3.0, 0.5]

    p = Pipeline("t", [(Wild(), 2.0), (PrefixCacheScorer(), 1.0)], rng=random.Random(0))
    r = req(4, [0, 4, 0])
    ex = Explanation("t", 4, 16, "tokens")
    chosen = p.select(r, reps, ex)
    # totals: r0 = 2*1 + 0 = 2, r1 = 2*0 + 1 = 1, r2 = 2*0.5 + 0 = 1
    assert chosen.id == "r0"
    assert [row.total for row in ex.replicas] == [2.0, 1.0, 1.0]
    assert ex.replicas[0].scores == {"wild": 5.0, "prefix-cache": 0.0}
    assert "chosen=r0" in ex.log_line()


def test_ties_break_at_random_but_seeded() -> None:
    reps = replicas(4)
    picks = {build_policy("cache_aware", rng=random.Random(s)).select(req(0), reps).id for s in range(40)}
    assert len(picks) == 4
    a = [build_policy("cache_aware", rng=random.Random(7)).select(req(0), reps).id for _ in range(5)]
    assert len(set(a)) == 1


def test_simple_policies() -> None:
    reps = replicas(3)
    rr = build_policy("round_robin")
    assert [rr.select(req(), reps).id for _ in range(4)] == ["r0", "r1", "r2", "r0"]
    reps[0].in_flight, reps[1].in_flight, reps[2].in_flight = 3, 1, 2
    assert build_policy("least_loaded").select(req(), reps).id == "r1"
    p2 = build_policy("power_of_two", rng=random.Random(1))
    assert all(p2.select(req(), reps).id != "r0" for _ in range(20))  # r0 never wins a pair
    assert {build_policy("random", rng=random.Random(s)).select(req(), reps).id for s in range(30)} == {
        "r0",
        "r1",
        "r2",
    }
    for name in POLICIES:
        assert build_policy(name).select(req(), reps) in reps
    with pytest.raises(ValueError, match="unknown policy"):
        build_policy("nope")
    with pytest.raises(ValueError, match="unknown scorer"):
        build_policy("cache_aware", weights={"bogus": 1.0})


def test_cache_aware_prefers_hit_but_not_an_overloaded_replica() -> None:
    reps = replicas(8)
    policy = build_policy("cache_aware", rng=random.Random(0))
    r = req(64, [64] + [0] * 7)
    assert policy.select(r, reps).id == "r0"
    reps[0].in_flight = 30  # limit = 4.0 * 31 / 8 = 15.5: the bounded-load guard takes r0 out
    assert policy.select(r, reps).id != "r0"


def test_queued_prefill_outweighs_a_cache_hit() -> None:
    """Small fleets (n <= load_factor) are balanced by estimated TTFT, not by the guard."""
    reps = replicas(3)
    policy = build_policy("cache_aware", rng=random.Random(0))
    r = req(64, [64, 0, 0])
    reps[0].pending_prefill_tokens = 50_000  # 2.5 s of prefill queued ahead at 20k tok/s
    assert policy.select(r, reps).id != "r0"


def test_cache_churn_prefers_the_replica_whose_cache_is_overwritten_least() -> None:
    from router.scoring.churn import CacheChurnScorer

    reps = replicas(3)
    for r, blocks in zip(reps, [1000, 1000, 2000], strict=True):
        r.num_gpu_blocks, r.block_size = blocks, 16
    reps[0].add_churn(16_000, now=0.0, tau_s=30.0)  # 1.0 of its 16k-token cache
    reps[1].add_churn(8_000, now=0.0, tau_s=30.0)  # 0.5
    reps[2].add_churn(16_000, now=0.0, tau_s=30.0)  # 0.5 of a cache twice as large
    r = req()
    r.now = 0.0
    assert CacheChurnScorer().score(r, reps) == pytest.approx([0.0, 1.0, 1.0])
    r.now = 30.0  # decays with time, the ordering stays
    assert reps[0].churn(30.0, 30.0) == pytest.approx(16_000 / 2.718281828, rel=1e-6)


def test_unmeasured_replicas_borrow_the_fleets_prefill_rate() -> None:
    """Regression: a fixed default rate made a fast, measured replica beat idle unmeasured peers
    forever, hot-spotting one replica and thrashing its cache (found with the offline simulator)."""
    reps = replicas(2)
    reps[0].prefill_tps = 1_000_000.0  # measured: very fast
    r = req(64, [16, 16])  # both hold the same prefix
    est = EstimatedTTFTScorer(step_s=0.0).estimates(r, reps)
    assert est[0] == pytest.approx(est[1])


def test_large_fleets_score_a_bounded_sample_that_keeps_the_cache_holders() -> None:
    reps = replicas(64)
    policy = build_policy("cache_aware", rng=random.Random(1))
    gpu = [0] * 64
    gpu[37] = 64  # only r37 holds the prompt
    for _ in range(20):
        assert policy.select(req(64, gpu), reps).id == "r37"
    # with no affinity the sample still reaches every replica over time (load balancing)
    picks = {policy.select(req(0), reps).id for _ in range(400)}
    assert len(picks) > 48
    # a prefix held everywhere does not pin the sample to the first replicas in the list
    every = [8] * 64
    picks = {policy.select(req(8, every), reps).id for _ in range(400)}
    assert len(picks) > 48


def test_tail_ttft_is_the_nearest_rank_quantile_of_the_last_64() -> None:
    """The window keeps the last 64 TTFTs (CPU-tier loads included) and answers any quantile."""
    rep = replicas(1)[0]
    assert rep.tail_ttft() == 0.0
    rng = random.Random(5)
    seen: list[float] = []
    for i in range(300):
        v = rng.uniform(0.0, 3.0)
        seen.append(v)
        if i % 7 == 0:
            rep.observe_cpu_load(v, 100, 100)
        else:
            rep.observe_ttft(v, 10)
        window = sorted(seen[-64:])
        for q in (0.5, 0.9, 0.99):
            assert rep.tail_ttft(q) == window[min(len(window) - 1, max(0, math.ceil(q * len(window)) - 1))]


def test_non_finite_engine_gauges_and_ttfts_are_unknown_not_numbers() -> None:
    """A NaN gauge or TTFT would make every total it enters NaN (never picked, never tied)."""
    rep = replicas(1)[0]
    rep.set_engine_load(math.nan, math.inf, math.nan)
    assert (rep.engine_running, rep.engine_waiting, rep.kv_usage, rep.engine_queue) == (None, None, None, 0.0)
    rep.set_engine_load(2.0, 1.0, 0.5)
    assert (rep.engine_running, rep.engine_waiting, rep.kv_usage, rep.engine_queue) == (2.0, 1.0, 0.5, 3.0)
    rep.observe_ttft(0.5, 4096)
    rep.observe_ttft(math.inf, 4096)
    rep.observe_ttft(math.nan, 4096)
    assert rep.ttfts == [0.5] and rep.tail_ttft() == 0.5 and rep.prefill_tps == 4096 / 0.5


def test_data_parallel_ranks_keep_their_servers_role() -> None:
    reg = ReplicaRegistry(PrefixIndex(100))
    parent = reg.add(ReplicaSpec(url="http://d0:8000", name="d0", role="decode"))
    assert reg.add_rank(parent, 1).spec.role == "decode"
