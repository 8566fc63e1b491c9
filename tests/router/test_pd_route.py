"""router/pd/route.py planning (no I/O): decode first, prefill by cache and queue, version pairing,
and the decode ticket of a split request carrying no prefill."""

from __future__ import annotations

from typing import Any, cast

from prometheus_client import CollectorRegistry

from router.config import PDSettings
from router.index import PrefixIndex
from router.pd.route import PDRouter
from router.replicas.registry import ReplicaRegistry
from router.routing import Router
from router.scoring.policies import build_policy
from router.types import ReplicaSpec


def _setup(**settings: Any) -> tuple[PDRouter, Router, ReplicaRegistry]:
    index = PrefixIndex(1 << 16, 30.0)
    reg = ReplicaRegistry(index)
    router = Router(index, reg, build_policy("cache_aware"), block_size=16)
    pd = PDRouter(PDSettings(**settings), router, reg, cast(Any, None), cast(Any, None), CollectorRegistry())
    for url, role in (
        ("http://p1", "prefill"),
        ("http://p2", "prefill"),
        ("http://d1", "decode"),
        ("http://d2", "decode"),
    ):
        reg.add(ReplicaSpec(url=url, role=role))
    for rid in ("http://d1", "http://d2"):
        rep = reg.get(rid)
        assert rep is not None
        rep.set_engine_load(32, 0, 0.2)  # a busy decode batch
    return pd, router, reg


def test_long_prompt_splits_to_the_prefill_replica_holding_its_prefix() -> None:
    pd, router, _ = _setup()
    assert pd.active("m")
    tokens = list(range(7, 7 + 4096))
    req = router.request_info("m", token_ids=tokens)
    router.index.store("http://p2", req.block_hashes[:200], speculative=False)  # p2 holds 3200 tokens
    plan = pd.plan(req)
    assert plan.decision.split and plan.prefill is not None and plan.prefill.id == "http://p2"
    assert plan.decision.uncached_prefill == 4096 - 3200


def test_prompt_cached_on_one_decode_replica_goes_there_locally() -> None:
    pd, router, _ = _setup()
    tokens = list(range(7, 7 + 4096))
    req = router.request_info("m", token_ids=tokens)
    router.index.store("http://d2", req.block_hashes, speculative=False)
    plan = pd.plan(req)
    assert plan.decode.id == "http://d2" and plan.decision.outcome == "local_cached"


def test_versions_that_differ_are_never_paired() -> None:
    pd, router, _ = _setup()
    pd.versions.update(
        {"http://p1": "0.31.0", "http://p2": "0.31.0", "http://d1": "0.32.0", "http://d2": "0.32.0"}
    )
    req = router.request_info("m", token_ids=list(range(7, 7 + 4096)))
    plan = pd.plan(req)
    assert plan.decision.outcome == "local_version_mismatch" and not plan.decision.split
    pd.versions["http://p1"] = "0.32.0"
    plan = pd.plan(router.request_info("m", token_ids=list(range(7, 7 + 4096))))
    assert plan.decision.split and plan.prefill is not None and plan.prefill.id == "http://p1"
    unknown, router2, _ = _setup()
    unknown.versions["http://p1"] = "0.31.0"  # the other side unknown: not held against the pair
    assert unknown.plan(router2.request_info("m", token_ids=list(range(7, 7 + 4096)))).decision.split


def test_split_decode_ticket_has_no_pending_prefill() -> None:
    _, router, reg = _setup()
    d = reg.get("http://d1")
    assert d is not None
    req = router.request_info("m", token_ids=list(range(7, 7 + 4096)))
    req.remote_prefill = True
    ticket = router.dispatch(req, d)
    assert ticket.pending_tokens == 0 and d.pending_prefill_tokens == 0
    router.first_token(ticket, 0.001)
    assert d.prefill_tps == 0.0  # no rate learned from a first token that needed no prefill
    router.finish(ticket)


def test_aggregated_fleet_is_not_pd() -> None:
    index = PrefixIndex(1024, 30.0)
    reg = ReplicaRegistry(index)
    router = Router(index, reg, build_policy("round_robin"))
    pd = PDRouter(PDSettings(), router, reg, cast(Any, None), cast(Any, None), CollectorRegistry())
    reg.add(ReplicaSpec(url="http://a"))
    assert not pd.active("m")
    reg.add(ReplicaSpec(url="http://p", role="prefill"))
    assert pd.active("m")
    reg.remove(reg.get("http://p").id)  # type: ignore[union-attr]
    assert not pd.active("m")
