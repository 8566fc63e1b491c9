"""Base-model keys (audit #11): vLLM's block keys carry no model name for the base model, an
adapter's name for LoRA requests. The router seeds base-model events and requests with the base
model's first served name, so adapters sorting first and served-name aliases stay correct."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry

from router.index import PrefixIndex
from router.kv.metrics import KVEventMetrics
from router.kv.stream import ReplicaEvents
from router.replicas.registry import ReplicaRegistry
from router.routing import Router
from router.scoring.policies import build_policy
from router.types import ReplicaSpec
from tests.support.kv_fixtures import payload, stored

TOKENS = list(range(100, 132))


def test_aliases_and_adapters_key_like_vllm() -> None:
    index = PrefixIndex(1000)
    reg = ReplicaRegistry(index)
    rep = reg.add(ReplicaSpec(url="http://r0", name="r0"))
    # vLLM --served-model-name llama-main llama, plus an adapter "aaa-lora" that sorts first
    reg.set_models(rep, ["llama-main", "llama", "aaa-lora"], base=["llama-main", "llama"])
    assert rep.base_model == "llama-main"
    router = Router(index, reg, build_policy("cache_aware", rng=random.Random(0)), block_size=4)
    events = ReplicaEvents(
        rep.id, index, model=rep.base_model, block_size=4, metrics=KVEventMetrics(CollectorRegistry())
    )
    events.on_message(0, payload([stored(list(range(1, 9)), TOKENS)]))  # base-model blocks
    for name in ("llama-main", "llama"):  # the alias matches the confirmed base blocks
        req = router.request_info(name, token_ids=TOKENS)
        router.select(req)
        assert req.gpu_blocks[rep.slot] == 8
    req = router.request_info("aaa-lora", token_ids=TOKENS)  # adapter traffic: no false hits
    router.select(req)
    assert req.gpu_blocks[rep.slot] == 0
