"""Router: keys -> match -> select -> dispatch accounting, with a frozen clock."""

from __future__ import annotations

import random

import pytest

from router.errors import ModelNotFound, NoReplicaAvailable, Overloaded
from router.hashing import hash_token_blocks, model_seed
from router.index import PrefixIndex
from router.replicas.registry import ReplicaRegistry
from router.routing import Router, RouterLimits
from router.scoring.policies import build_policy
from router.types import KeyMode, ReplicaId, ReplicaSpec


class Clock:
    t = 100.0

    def __call__(self) -> float:
        return self.t


def make(
    policy: str = "cache_aware", n: int = 2, limits: RouterLimits = RouterLimits()
) -> tuple[Router, Clock]:
    clock = Clock()
    index = PrefixIndex(1000, speculative_ttl_s=10, clock=clock)
    reg = ReplicaRegistry(index)
    for i in range(n):
        reg.add(ReplicaSpec(url=f"http://r{i}", name=f"r{i}", models=("m",)))
    router = Router(
        index, reg, build_policy(policy, rng=random.Random(0)), block_size=16, clock=clock, limits=limits
    )
    return router, clock


def test_token_mode_keys_and_predicted_hits() -> None:
    router, _ = make()
    toks = list(range(100))
    req = router.request_info("m", token_ids=toks)
    assert req.key_mode is KeyMode.TOKENS
    assert req.block_hashes == hash_token_blocks(toks, 16, model_seed("m"))
    assert req.prompt_tokens == 100
    first = router.select(req)
    ticket = router.dispatch(req, first)
    assert ticket.predicted_cached_tokens == 0
    assert first.in_flight == 1 and first.pending_prefill_tokens == 100
    router.first_token(ticket, 0.05)
    router.finish(ticket)
    assert first.in_flight == 0 and first.pending_prefill_tokens == 0
    # the same prompt again: the speculative insert makes the first replica win, predicting
    # 96 cached tokens (6 full blocks; vLLM never reuses the block holding the last token)
    req2 = router.request_info("m", token_ids=toks)
    again = router.select(req2)
    assert again is first
    assert router.dispatch(req2, again).predicted_cached_tokens == 96


def test_full_prompt_hit_is_capped_below_the_last_token() -> None:
    router, _ = make()
    toks = list(range(64))  # exactly 4 blocks
    req = router.request_info("m", token_ids=toks)
    rep = router.select(req)
    router.finish(router.dispatch(req, rep))
    req = router.request_info("m", token_ids=toks)
    assert router.dispatch(req, router.select(req)).predicted_cached_tokens == 48


def test_speculation_expires() -> None:
    router, clock = make()
    toks = list(range(64))
    req = router.request_info("m", token_ids=toks)
    rep = router.select(req)
    router.finish(router.dispatch(req, rep))
    clock.t += 301  # approximate TTL (no KV events) is 300 s
    req = router.request_info("m", token_ids=toks)
    router.select(req)
    assert max(req.gpu_blocks) == 0


def test_byte_mode_and_chat() -> None:
    router, _ = make()
    req = router.request_info("m", text="x" * 1000)
    assert req.key_mode is KeyMode.BYTES
    assert len(req.block_hashes) == 1000 // 64
    chat = router.request_info("m", messages=[{"role": "user", "content": "hello " * 50}])
    assert chat.key_mode is KeyMode.BYTES and chat.block_hashes


def test_simple_policies_skip_hashing() -> None:
    router, _ = make("round_robin")
    req = router.request_info("m", token_ids=list(range(1000)))
    assert req.block_hashes == [] and req.prompt_tokens == 1000


def test_candidates_errors() -> None:
    router, _ = make(limits=RouterLimits(max_in_flight_per_replica=1))
    with pytest.raises(ModelNotFound):
        router.candidates("other")
    with pytest.raises(NoReplicaAvailable):
        router.candidates("m", exclude=[ReplicaId("r0"), ReplicaId("r1")])
    for r in router.registry:
        r.in_flight = 1
    with pytest.raises(Overloaded):
        router.candidates("m")
    for r in router.registry:
        router.registry.set_healthy(r, False)
    with pytest.raises(NoReplicaAvailable):
        router.candidates("m")


def test_burst_spreads_because_load_counts_at_dispatch() -> None:
    """Regression for vllm-project/router #179 / sglang #14305: a burst of identical prompts
    must not pile onto one replica between two metric scrapes."""
    router, _ = make(n=4)
    toks = list(range(2048))
    chosen = []
    for _ in range(40):
        req = router.request_info("m", token_ids=toks)
        rep = router.select(req)
        router.dispatch(req, rep)
        chosen.append(rep.id)
    counts = {rid: chosen.count(rid) for rid in set(chosen)}
    assert len(counts) == 4, counts
    assert max(counts.values()) <= 16, counts  # bounded-load guard: <= 1.5 x fair share + 1
