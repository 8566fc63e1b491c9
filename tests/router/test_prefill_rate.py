"""The measured prefill rate is the rate estimated-ttft divides by: (work ahead + own) / TTFT."""

from __future__ import annotations

import random

from router.index import PrefixIndex
from router.replicas.registry import ReplicaRegistry
from router.routing import Router
from router.scoring.policies import build_policy
from router.types import ReplicaSpec


def _router() -> tuple[Router, ReplicaRegistry]:
    index = PrefixIndex(10_000, speculative_ttl_s=10, clock=lambda: 0.0)
    reg = ReplicaRegistry(index)
    reg.add(ReplicaSpec(url="http://r0", name="r0", models=("m",)))
    return Router(
        index, reg, build_policy("cache_aware", rng=random.Random(0)), block_size=16, clock=lambda: 0.0
    ), reg


def test_rate_counts_the_prefill_queued_ahead() -> None:
    router, reg = _router()
    rep = next(iter(reg))
    a = router.dispatch(router.request_info("m", token_ids=list(range(4000))), rep)
    b = router.dispatch(router.request_info("m", token_ids=list(range(10_000, 10_500))), rep)
    assert a.backlog_tokens == 0 and b.backlog_tokens == 4000
    router.first_token(a, 0.1)  # 4,000 tokens in 0.1 s
    assert rep.prefill_tps == 40_000
    # b's work is its own 500 tokens plus half the 4,000 pending when it was dispatched (the head
    # of the queue is half done on average): 2,500 tokens in 0.0625 s is still 40k tokens/s. On
    # b's own tokens only it would read 8k tokens/s, five times slower, and a session's follow-ups
    # (small uncached, queued) would look expensive to keep where they are.
    router.first_token(b, 0.0625)
    assert abs(rep.prefill_tps - 40_000) < 1e-6


def test_a_short_prefill_alone_is_not_a_rate_sample() -> None:
    router, reg = _router()
    rep = next(iter(reg))
    t = router.dispatch(router.request_info("m", token_ids=list(range(100))), rep)
    router.first_token(t, 0.05)
    assert rep.prefill_tps == 0.0
