"""The fused cache_aware kernel equals the plugin-by-plugin pipeline, bit for bit.

Random fleets (load, engine metrics, rates, TTFT windows, churn, capacities known or not) and
random requests (GPU/CPU-tier matches, uncertain replicas, sessions new, homed and homeless):
the kernel's filter keeps the same replicas, its totals are the same floats the pipeline sums
from the scorers (NaN ones included: an engine gauge set to NaN directly), and with the same
rng both pick the same replica.
"""

from __future__ import annotations

import math
import random

import pytest

from router.index import PrefixIndex
from router.replicas.registry import Replica, ReplicaRegistry
from router.scoring.fused import CacheAwareKernel, kernel_for
from router.scoring.pipeline import Explanation, Pipeline
from router.scoring.policies import build_policy
from router.scoring.prefix import PrefixCacheScorer
from router.scoring.queue import QueueDepthScorer
from router.scoring.session import SessionBoundedLoadFilter
from router.types import BlockHash, KeyMode, ReplicaSpec, RequestInfo


def random_fleet(rng: random.Random, n: int, nan: bool = False) -> list[Replica]:
    reg = ReplicaRegistry(PrefixIndex(100))
    reps = [reg.add(ReplicaSpec(url=f"http://r{i}:8000", name=f"r{i}")) for i in range(n)]
    for r in reps:
        r.in_flight = rng.choice([0, 0, 1, 2, 5, 30])
        r.pending_prefill_tokens = rng.choice([0, 0, 500, 20_000])
        if rng.random() < 0.7:
            running, waiting = rng.choice([0.0, 1.0, 4.0, 40.0]), rng.choice([None, 0.0, 3.0])
            r.set_engine_load(running, waiting, rng.choice([None, 0.0, 0.3, 0.95, 1.2]))
        r.prefill_tps = rng.choice([0.0, 0.0, 8_000.0, 21_000.0])
        r.cpu_load_tps = rng.choice([0.0, 50_000.0])
        for _ in range(rng.choice([0, 3, 70])):
            r.observe_ttft(rng.uniform(0.01, 2.0), 100)
        if rng.random() < 0.6:
            r.add_churn(rng.randrange(1, 50_000), rng.uniform(0, 100), 30.0)
        r.num_gpu_blocks = rng.choice([None, 1_000, 30_000])
        r.block_size = rng.choice([None, 16])
        if nan and rng.random() < 0.3:  # set directly: set_engine_load drops non-finite gauges
            r.kv_usage = math.nan
        if nan and rng.random() < 0.2:
            r.engine_running = math.nan
    return reps


def random_request(rng: random.Random, reps: list[Replica]) -> RequestInfo:
    blocks = rng.choice([0, 1, 4, 60])
    req = RequestInfo(model="m", prompt_tokens=blocks * 16 + rng.randrange(16), block_size=16)
    req.key_mode = KeyMode.TOKENS
    req.now = rng.uniform(50, 200)
    req.block_hashes = [BlockHash(i) for i in range(blocks)]
    slots = max(r.slot for r in reps) + 1 - rng.choice([0, 0, 1])  # a replica newer than the match
    req.gpu_blocks = [rng.choice([0, blocks // 2, blocks]) for _ in range(slots)]
    req.any_tier_blocks = [g + rng.choice([0, 0, blocks - g]) for g in req.gpu_blocks]
    req.uncertain_slots = frozenset(r.slot for r in reps if rng.random() < 0.1)
    kind = rng.choice(["none", "new", "home", "homeless"])
    if kind != "none":
        req.session_id = f"s{rng.randrange(1000)}"
        req.session_home = {"new": -1, "homeless": -2, "home": rng.choice(reps).slot}[kind]
        req.session_keep = rng.choice([0.0, 0.4, 1.0])
        req.session_overlap = rng.choice([0.0, 0.7, 1.0])
    return req


def reference_totals(pipeline: Pipeline, req: RequestInfo, kept: list[Replica]) -> list[float]:
    """What Pipeline.select sums: each scorer clamped to [0, 1], weighted, in order."""
    totals = [0.0] * len(kept)
    for scorer, weight in pipeline.scorers:
        values = scorer.score(req, kept)
        totals = [
            t + weight * (0.0 if v < 0.0 else 1.0 if v > 1.0 else v)  # Pipeline.select's clamp
            for t, v in zip(totals, values, strict=True)
        ]
    return totals


def cache_aware(seed: int, **kw: object) -> Pipeline:
    policy = build_policy("cache_aware", rng=random.Random(seed), **kw)  # type: ignore[arg-type]
    assert isinstance(policy, Pipeline)
    return policy


@pytest.mark.parametrize("weights", [{}, {"kv-usage": 0.1, "prefix-cache": 2.5}, {"estimated-ttft": 0.5}])
def test_kernel_matches_pipeline_on_random_fleets(weights: dict[str, float]) -> None:
    rng = random.Random(7)
    pipeline = cache_aware(0, weights=weights)
    kernel = pipeline.kernel
    assert isinstance(kernel, CacheAwareKernel)
    bounded = pipeline.filters[0]
    for trial in range(600):
        reps = random_fleet(rng, rng.choice([1, 2, 3, 8, 16]), nan=trial >= 400)
        req = random_request(rng, reps)
        kept, queues = kernel._filter(req, reps)
        assert [r.id for r in kept] == [r.id for r in bounded.filter(req, reps)], trial
        assert queues == [r.queue_depth for r in kept]
        fused_totals = kernel._totals(req, kept, queues)
        plain_totals = reference_totals(pipeline, req, list(kept))
        assert [repr(t) for t in fused_totals] == [repr(t) for t in plain_totals], trial  # NaN == NaN
        fused_rng, plain_rng = random.Random(trial), random.Random(trial)
        pipeline.rng = fused_rng
        fused = pipeline.select(req, reps)
        pipeline.kernel = None
        pipeline.rng = plain_rng
        plain = pipeline.select(req, reps)
        pipeline.kernel = kernel
        assert fused is plain, trial
        assert fused_rng.random() == plain_rng.random()  # the same draws from the rng


def test_kernel_only_for_the_cache_aware_plugin_set() -> None:
    pipeline = cache_aware(0)
    assert pipeline.kernel is not None
    picker = pipeline.picker
    prefix, queue = PrefixCacheScorer(), QueueDepthScorer()
    bounded = SessionBoundedLoadFilter(4.0)
    assert kernel_for([bounded], pipeline.scorers, picker) is not None
    assert kernel_for([bounded], pipeline.scorers[::-1], picker) is None  # another sum order
    assert kernel_for([bounded], [(prefix, 1.0), (queue, 1.0)], picker) is None  # a subset
    assert kernel_for([], [(prefix, 1.0)], picker) is None  # prefix_only has no filter
    assert build_policy("prefix_only").kernel is None  # type: ignore[attr-defined]
    # a weight that turns a scorer off: the plugin-by-plugin pipeline (0 x NaN is not 0)
    assert cache_aware(0, weights={"kv-usage": 0.0}).kernel is None


def test_explained_decisions_run_the_plugins() -> None:
    """/debug/route shows per-scorer values: an explained decision takes the plugin path and
    still picks what the kernel picks."""
    rng = random.Random(3)
    pipeline = cache_aware(1)
    for trial in range(50):
        reps = random_fleet(rng, 4)
        req = random_request(rng, reps)
        pipeline.rng = random.Random(trial)
        fused = pipeline.select(req, reps)
        pipeline.rng = random.Random(trial)
        explain = Explanation("cache_aware", len(req.block_hashes), 16, "tokens")
        assert pipeline.select(req, reps, explain) is fused
        assert explain.chosen == fused.id
        assert all(row.scores for row in explain.replicas if not row.filtered_out)
