"""Offline simulator: determinism, accounting, report shape, KV events on/off, peer emulations.

Small slices and few replicas keep the whole file to a few seconds.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from router.cli import main
from router.index import PrefixIndex
from router.replicas.registry import ReplicaRegistry
from router.types import BlockHash, ReplicaSpec, RequestInfo
from traces.generators import generate
from traces.loaders import load_trace
from traces.model import Trace
from traces.peer_policies import PEER_POLICIES, ApproxTreeCacheAware, ConsistentHash
from traces.simulate import SimConfig, VirtualClock, known_policies, run_policy, select_requests, simulate

SLICE = Path(__file__).resolve().parents[2] / "traces" / "data" / "mooncake_conv_slice.jsonl"


@pytest.fixture(scope="module")
def mooncake() -> Trace:
    trace, _ = load_trace(str(SLICE))
    return trace


@pytest.fixture(scope="module")
def shared() -> Trace:
    # 60 users, each with a 2k-token personal context after one of 4 system prompts: the working
    # set (~120k tokens of contexts) is twice one tiny replica's 64k-token cache, so spreading a
    # user's requests over every replica (round robin) evicts what keeping them together reuses.
    return generate(
        "shared-prompt", seed=3, requests=600, rate=20.0, users=60, user_context_tokens=2000,
        system_tokens=1000, block_tokens=16,
    )  # fmt: skip


def test_same_seed_same_records(mooncake: Trace) -> None:
    cfg = SimConfig(replicas=3, speedup=2.0, max_requests=120, seed=7)
    a = run_policy(mooncake, cfg, "cache_aware")
    b = run_policy(mooncake, cfg, "cache_aware")
    assert a.records == b.records
    assert a.summary == b.summary


def test_every_request_accounted_for(mooncake: Trace) -> None:
    cfg = SimConfig(replicas=2, speedup=3.0, max_requests=150)
    run = run_policy(mooncake, cfg, "cache_aware")
    reqs = select_requests(mooncake, cfg)
    assert [r.request_id for r in run.records] == [r.request_id for r in reqs]
    for rec, req in zip(run.records, reqs, strict=True):
        assert rec.ok, rec
        assert rec.ttft_s is not None and rec.e2e_s is not None
        assert 0 < rec.ttft_s <= rec.e2e_s
        assert rec.output_tokens == max(1, req.output_length)
        assert rec.cached_tokens is not None
        # whole trace blocks only, never the last prompt token (vLLM)
        assert 0 <= rec.cached_tokens <= rec.prompt_tokens - 1
        assert rec.cached_tokens % mooncake.block_tokens == 0
    assert run.summary["requests"] == run.summary["ok"] == len(reqs)


def test_duration_and_max_requests_select_a_prefix(mooncake: Trace) -> None:
    cfg = SimConfig(replicas=1, speedup=10.0, duration_s=5.0)
    reqs = select_requests(mooncake, cfg)
    assert reqs and all(r.timestamp_s < 50.0 for r in reqs)
    assert len(select_requests(mooncake, SimConfig(max_requests=9))) == 9


def test_cache_aware_beats_round_robin_on_shared_prefixes(shared: Trace) -> None:
    cfg = SimConfig(replicas=4, profile="tiny")
    report = simulate(shared, cfg, ["round_robin", "cache_aware"])
    rr = report["policies"]["round_robin"]["hit_ratio"]
    ca = report["policies"]["cache_aware"]["hit_ratio"]
    assert ca > rr + 0.05, (rr, ca)
    assert ca <= report["oracle_hit_ratio"] + 1e-9


@pytest.mark.parametrize("kv_events", [True, False])
def test_kv_events_on_and_off(shared: Trace, kv_events: bool) -> None:
    cfg = SimConfig(replicas=3, profile="tiny", kv_events=kv_events, max_requests=300)
    run = run_policy(shared, cfg, "cache_aware")
    assert run.summary["ok"] == 300
    assert run.summary["hit_ratio"] > 0.2
    assert (run.kv_events_applied > 0) is kv_events


def test_round_robin_needs_no_events(shared: Trace) -> None:
    run = run_policy(shared, SimConfig(replicas=3, profile="tiny", max_requests=60), "round_robin")
    assert run.kv_events_applied == 0
    assert run.summary["load_spread"]["max"] == run.summary["load_spread"]["min"] == 20


@pytest.mark.parametrize("name", sorted(PEER_POLICIES))
def test_peer_emulations_run(mooncake: Trace, name: str) -> None:
    run = run_policy(mooncake, SimConfig(replicas=3, speedup=2.0, max_requests=100), name)
    assert run.summary["ok"] == 100
    assert name in known_policies()


def test_cli_json_is_one_object(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc = main(
        [
            "simulate", "--trace", str(SLICE), "--replicas", "2", "--max-requests", "40", "--speedup", "2",
            "--policy", "round_robin", "--policy", "sglang_cache_aware", "--json", "--out", str(tmp_path),
        ]
    )  # fmt: skip
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["policies"]) == {"round_robin", "sglang_cache_aware"}
    assert 0.0 <= out["oracle_hit_ratio"] <= 1.0
    for p in out["policies"].values():
        for key in (
            "ttft_mean_s",
            "ttft_p50_s",
            "ttft_p99_s",
            "hit_ratio",
            "throughput_rps",
            "wall_s",
            "wall_rps",
        ):
            assert isinstance(p[key], float), key
        assert p["requests"] == 40
    assert (tmp_path / "records-round_robin.jsonl").read_text().count("\n") == 40
    assert (tmp_path / "summary.json").exists()


def test_cli_rejects_unknown_policy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--trace", str(SLICE), "--policy", "nope", "--max-requests", "5"]) == 2
    assert "unknown policy 'nope'" in capsys.readouterr().err


# ---- SGLang cache_aware emulation: the decision table of peers.md §2 -----------------------------


def _fleet(n: int) -> tuple[ReplicaRegistry, list]:  # type: ignore[type-arg]
    reg = ReplicaRegistry(PrefixIndex())
    reps = [reg.add(ReplicaSpec(url=f"http://w{i}", name=f"w{i}")) for i in range(n)]
    return reg, reps


def _req(hashes: list[int], tokens: int | None = None, bs: int = 4) -> RequestInfo:
    hs = [BlockHash(h) for h in hashes]
    return RequestInfo(model="m", prompt_tokens=tokens or len(hs) * bs, block_size=bs, block_hashes=hs)


def test_sglang_routes_to_matching_worker_above_threshold() -> None:
    _, reps = _fleet(3)
    p = ApproxTreeCacheAware(random.Random(0), VirtualClock())
    first = p.select(_req([1, 2, 3, 4]), reps)  # empty tree: min load, first of equal loads
    assert first is reps[0]
    reps[0].in_flight = 5  # loaded, but not imbalanced (5 - 0 <= 64)
    assert p.select(_req([1, 2, 3, 9]), reps) is reps[0]  # 3/4 matched > 0.3


def test_sglang_min_load_below_threshold_and_when_imbalanced() -> None:
    _, reps = _fleet(3)
    p = ApproxTreeCacheAware(random.Random(0), VirtualClock())
    p.select(_req([1, 2, 3, 4]), reps)
    reps[0].in_flight, reps[1].in_flight, reps[2].in_flight = 3, 2, 1
    assert p.select(_req([1, 7, 8, 9]), reps) is reps[2]  # 1/4 matched <= 0.3 -> min load
    reps[0].in_flight, reps[1].in_flight, reps[2].in_flight = 100, 30, 31
    # imbalanced (100 - 30 > 64 and 100 > 1.5 * 30): min load even with a full match
    assert p.select(_req([1, 2, 3, 4]), reps) is reps[1]


def test_sglang_tree_eviction_forgets_least_recent() -> None:
    _, reps = _fleet(1)
    clock = VirtualClock()
    # 2 blocks per worker: 4 chars/token * 4 tokens/block * 2
    p = ApproxTreeCacheAware(random.Random(0), clock, eviction_interval_s=10.0, max_tree_size=32)
    p.select(_req([1, 2, 3]), reps)
    clock.t = 11.0
    p.select(_req([5]), reps)  # eviction runs first, then [5] is inserted
    assert p.tree.replica_blocks(reps[0].id) == 3
    assert not p.tree.holds(reps[0].id, BlockHash(3))
    assert p.tree.holds(reps[0].id, BlockHash(1))


def test_consistent_hash_is_sticky_per_session() -> None:
    _, reps = _fleet(4)
    p = ConsistentHash(random.Random(0), VirtualClock())
    p.set_session("s1")
    picks = {p.select(_req([i]), reps).id for i in range(20)}
    assert len(picks) == 1
    p.set_session(None)
    assert len({p.select(_req([i, i + 1]), reps).id for i in range(40)}) > 1
