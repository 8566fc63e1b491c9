"""LMCache lookup mode, shared tiers and the load-rate credit, without engines (the real-engine
test is tests/integration/test_vllm_lmcache_router.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from router.hashing import hash_token_blocks, model_seed
from router.index import PrefixIndex
from router.kv.lmcache_lookup import AiohttpTransport, CoordinatorLookup, held_prefix_chunks
from router.kv.lmcache_tier import SharedTierSink, parse_instances
from router.replicas.registry import Replica
from router.scoring.ttft import EstimatedTTFTScorer, cpu_tier_credit
from router.types import KeyMode, ReplicaId, ReplicaSpec, RequestInfo, Tier

GOLDEN = Path(__file__).parent / "golden" / "lmcache-0.5.6-directory-lookup.json"
R0, R1, R2 = ReplicaId("http://r0"), ReplicaId("http://r1"), ReplicaId("http://r2")
BS = 32
MODEL = "tiny"


def _req(tokens: list[int]) -> RequestInfo:
    return RequestInfo(
        model=MODEL,
        prompt_tokens=len(tokens),
        block_size=BS,
        block_hashes=hash_token_blocks(tokens, BS, model_seed(MODEL)),
        key_mode=KeyMode.TOKENS,
        token_ids=tokens,
    )


def _answer(placements: list[list[str]]) -> bytes:
    return json.dumps(
        {
            "chunks": len(placements),
            "results": [{"placements": [{"instance_id": i, "tier": "l1"} for i in p]} for p in placements],
        }
    ).encode()


class FakeTransport:
    def __init__(self, answer: Callable[[dict[str, object]], bytes] | None = None) -> None:
        self.calls: list[dict[str, object]] = []
        self.answer = answer
        self.fail: BaseException | None = None
        self.delay = 0.0

    async def post(self, url: str, body: bytes, timeout_s: float) -> bytes:
        self.calls.append(json.loads(body))
        if self.delay:
            await asyncio.wait_for(asyncio.sleep(self.delay), timeout_s)
        if self.fail is not None:
            raise self.fail
        assert self.answer is not None
        return self.answer(self.calls[-1])


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _lookup(
    transport: FakeTransport, clock: Clock, index: PrefixIndex | None = None
) -> tuple[CoordinatorLookup, PrefixIndex]:
    index = index or PrefixIndex(clock=clock)
    for r in (R0, R1, R2):
        index.add_replica(r)
    lk = CoordinatorLookup(
        index,
        transport,
        "http://coord",
        "/models/tiny",
        parse_instances([f"mp0={R0}", f"mp0={R1}", f"mp1={R2}"]),
        timeout_s=0.05,
        cache_s=2.0,
        breaker_failures=2,
        breaker_open_s=10.0,
        registry=CollectorRegistry(),
        clock=clock,
    )
    return lk, index


def test_held_prefix_stops_at_each_instances_first_miss() -> None:
    from router.kv.lmcache_lookup import _DECODER

    resp = _DECODER.decode(_answer([["mp0", "mp1"], ["mp1"], ["mp0", "mp1"]]))
    assert held_prefix_chunks(resp.results) == {"mp0": 1, "mp1": 3}
    golden = json.loads(GOLDEN.read_text())
    hit = _DECODER.decode(json.dumps(golden["hit"]["response"]).encode())
    assert held_prefix_chunks(hit.results) == {"mp0": 2}
    assert held_prefix_chunks(_DECODER.decode(json.dumps(golden["miss"]["response"]).encode()).results) == {}


async def test_lookup_credits_every_replica_of_the_instance_and_withdraws_evictions() -> None:
    clock = Clock()
    held = {"answer": [["mp0"], ["mp0"], ["mp0"]]}
    t = FakeTransport(lambda _body: _answer(held["answer"]))
    lk, index = _lookup(t, clock)
    tokens = list(range(100, 100 + 800))  # 3 whole chunks + 32 tokens
    req = _req(tokens)
    await lk.refresh(req, tokens)
    assert t.calls[0]["token_ids"] == tokens[:768] and t.calls[0]["model_name"] == "/models/tiny"
    gpu, usable = index.match(req.block_hashes)
    s0, s1, s2 = (index.add_replica(r) for r in (R0, R1, R2))
    assert (usable[s0], usable[s1], usable[s2]) == (24, 24, 0)  # mp0 is shared by r0 and r1
    assert gpu[s0] == 0
    await lk.refresh(req, tokens)  # answered 0 s ago: served from the index, no call
    assert len(t.calls) == 1
    clock.t += 3.0  # answer expired; LMCache evicted the second chunk meanwhile
    held["answer"] = [["mp0"], [], ["mp0"]]
    await lk.refresh(req, tokens)
    _gpu, usable = index.match(req.block_hashes)
    assert (usable[s0], usable[s1]) == (8, 8)
    assert not index.holds(R0, req.block_hashes[20], Tier.CPU)  # the chunk after the gap is not credited
    index.check_invariants()


async def test_lookup_skips_short_prompts_and_gpu_covered_prefixes() -> None:
    clock = Clock()
    t = FakeTransport(lambda _b: _answer([["mp0"]]))
    lk, index = _lookup(t, clock)
    short = list(range(200))
    await lk.refresh(_req(short), short)
    tokens = list(range(300))
    req = _req(tokens)
    index.store(R2, req.block_hashes)  # r2's GPU holds the whole chunk already
    await lk.refresh(req, tokens)
    assert t.calls == []


async def test_breaker_opens_after_failures_and_a_probe_closes_it() -> None:
    clock = Clock()
    t = FakeTransport(lambda _b: _answer([["mp0"]]))
    t.fail = aiohttp.ClientConnectionError("refused")
    lk, index = _lookup(t, clock)
    prompts = [list(range(i * 1000, i * 1000 + 256)) for i in range(5)]
    for p in prompts[:2]:
        await lk.refresh(_req(p), p)  # two failures: the breaker opens
    assert lk.breaker_open and len(t.calls) == 2
    await lk.refresh(_req(prompts[2]), prompts[2])  # open: no call, the request routes anyway
    assert len(t.calls) == 2
    t.fail = None
    clock.t += 11.0  # half-open: one probe
    await lk.refresh(_req(prompts[3]), prompts[3])
    assert len(t.calls) == 3 and not lk.breaker_open
    assert index.holds(R0, _req(prompts[3]).block_hashes[7], Tier.CPU)


async def test_a_slow_coordinator_costs_at_most_the_timeout() -> None:
    clock = Clock()
    t = FakeTransport(lambda _b: _answer([["mp0"]]))
    t.delay = 5.0
    lk, _index = _lookup(t, clock)
    p = list(range(256))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await lk.refresh(_req(p), p)
    assert loop.time() - t0 < 1.0
    assert lk.metrics.lookups.labels("timeout")._value.get() == 1


async def test_concurrent_requests_for_one_prefix_share_one_call() -> None:
    clock = Clock()
    t = FakeTransport(lambda _b: _answer([["mp1"]]))
    t.delay = 0.01
    lk, index = _lookup(t, clock)
    p = list(range(256))
    await asyncio.gather(*(lk.refresh(_req(p), p) for _ in range(5)))
    assert len(t.calls) == 1
    assert index.holds(R2, _req(p).block_hashes[0], Tier.CPU)


async def test_aiohttp_transport_against_a_loopback_coordinator() -> None:
    golden = json.loads(GOLDEN.read_text())
    seen: list[dict[str, object]] = []

    async def lookup(request: web.Request) -> web.Response:
        seen.append(await request.json())
        return web.json_response(golden["hit"]["response"])

    app = web.Application()
    app.router.add_post("/directory/lookup", lookup)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as session:
            index = PrefixIndex()
            index.add_replica(R0)
            lk = CoordinatorLookup(
                index,
                AiohttpTransport(session),
                f"http://127.0.0.1:{port}",
                golden["hit"]["request"]["model_name"],
                {"mp0": [R0]},
                registry=CollectorRegistry(),
                timeout_s=2.0,
            )
            tokens = golden["hit"]["request"]["token_ids"]
            req = _req(tokens)
            await lk.refresh(req, tokens)
            assert seen[0]["token_ids"] == tokens[: len(tokens) // 256 * 256]  # whole chunks only
            _gpu, usable = index.match(req.block_hashes)
            assert usable[0] == len(tokens) // 256 * (256 // BS)
    finally:
        await runner.cleanup()


def test_shared_tier_counts_each_block_once_per_server() -> None:
    index = PrefixIndex()
    for r in (R0, R1, R2):
        index.add_replica(r)
    sink = SharedTierSink(index, parse_instances([f"mp0={R0}", f"mp0={R1}", f"mp1={R2}"]))
    hs = [11, 12, 13]
    sink.store(R0, hs, Tier.CPU)  # both members republish the tier's store
    sink.store(R1, hs, Tier.CPU)
    assert all(index.holds(r, h, Tier.CPU) for r in (R0, R1) for h in hs)
    assert not index.holds(R2, 11, Tier.CPU)
    sink.remove(R0, [12], Tier.CPU)  # r0's stream saw the eviction first
    assert index.holds(R1, 12, Tier.CPU)
    sink.remove(R1, [12], Tier.CPU)  # and r1's: the block leaves both
    assert not index.holds(R0, 12, Tier.CPU) and not index.holds(R1, 12, Tier.CPU)
    sink.clear(R1)  # r1 restarted: r0 still announces 11 and 13
    assert index.holds(R1, 11, Tier.CPU) and index.holds(R1, 13, Tier.CPU)
    sink.clear(R0)
    assert index.replica_blocks(R0, Tier.CPU) == index.replica_blocks(R1, Tier.CPU) == 0
    sink.store(R0, [21], Tier.CPU)
    index.remove_replica(R1)
    index.add_replica(R1)
    sink.attach(R1)  # a member that re-joins gets the tier's content
    assert index.holds(R1, 21, Tier.CPU)
    sink.store(R1, [21], Tier.CPU)
    sink.detach(R0)  # the router stopped following r0's stream: r1's stream still announces 21
    assert index.holds(R0, 21, Tier.CPU) and index.holds(R1, 21, Tier.CPU)
    sink.detach(R1)
    assert not index.holds(R1, 21, Tier.CPU)
    sink.store(R0, [31], Tier.GPU)  # GPU blocks stay the replica's own
    assert not index.holds(R1, 31, Tier.GPU)
    index.check_invariants()


def test_parse_instances_refuses_a_pair_without_id() -> None:
    with pytest.raises(ValueError):
        parse_instances(["http://r0"])
    assert parse_instances(["mp0=http://r0/", "mp0=http://r0"]) == {"mp0": [ReplicaId("http://r0")]}


def _replica(slot: int, prefill_tps: float, load_tps: float) -> Replica:
    spec = ReplicaSpec(url=f"http://r{slot}")
    rep = Replica(spec=spec, id=spec.id, url=spec.url, slot=slot)
    rep.prefill_tps = prefill_tps
    rep.cpu_load_tps = load_tps
    return rep


def test_credit_is_what_the_load_saves_against_recompute() -> None:
    assert cpu_tier_credit(10_000, 100_000, 0.8) == pytest.approx(0.9)
    assert cpu_tier_credit(10_000, 5_000, 0.8) == 0.0  # loading slower than recomputing saves nothing
    assert cpu_tier_credit(10_000, 0, 0.8) == 0.8  # unknown load rate: the configured credit
    # r0: 1000 tokens on GPU; r1: 2000 tokens on CPU. Fast load: r1 is quicker; slow load: r0.
    req = RequestInfo(model=MODEL, prompt_tokens=2048, block_size=BS, key_mode=KeyMode.TOKENS)
    req.block_hashes = list(range(64))
    req.gpu_blocks = [32, 0]
    req.any_tier_blocks = [32, 64]
    scorer = EstimatedTTFTScorer()
    fast = scorer.estimates(req, [_replica(0, 10_000, 1e6), _replica(1, 10_000, 1e6)])
    slow = scorer.estimates(req, [_replica(0, 10_000, 12_000), _replica(1, 10_000, 12_000)])
    assert fast[1] < fast[0] and slow[0] < slow[1]


def test_replica_learns_the_load_rate_from_cpu_hit_ttfts() -> None:
    rep = _replica(0, 10_000, 0)
    for _ in range(20):
        rep.observe_cpu_load(
            ttft_s=0.1 + 0.01, recompute_tokens=1000, loaded_tokens=1000
        )  # 0.1 s compute + 0.01 s load
    assert rep.cpu_load_tps == pytest.approx(100_000, rel=0.01)
    assert rep.prefill_tps == 10_000  # a CPU-hit TTFT does not teach the prefill rate


def test_gpu_only_sink_drops_the_cpu_tier() -> None:
    from router.config import LMCacheSettings
    from router.kv.lmcache_tier import event_sink

    index = PrefixIndex()
    index.add_replica(R0)
    sink = event_sink(index, LMCacheSettings(credit_cpu_tier=False))
    sink.store(R0, [1, 2], Tier.CPU)
    sink.store(R0, [1], Tier.GPU)
    assert index.replica_blocks(R0, Tier.CPU) == 0 and index.holds(R0, 1, Tier.GPU)
    assert event_sink(index, LMCacheSettings()) is index
