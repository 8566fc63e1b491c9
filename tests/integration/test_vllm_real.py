"""The router against two real vLLM 0.32 CPU replicas.

    make vllm-env tiny-model test-vllm        # or: KVROUTER_VLLM_VENV=.venv-vllm pytest -m vllm tests/integration

Skipped unless KVROUTER_VLLM_VENV names a venv where vllm imports (engines/vllm/install_cpu.sh).
Two replicas of the tiny local Llama (engines/vllm/make_tiny_model.py), one per core, with a 96-block
(3072-token) prefix cache so that a handful of prompts forces eviction: the `vllm_pair` of
tests/integration/conftest.py, shared with the other modules that need plain replicas and reset for this
one. Start-up is ~30-45 s; the tests themselves take a few seconds.

The first group checks the engine contract the router relies on, straight from vLLM: BlockStored
carries the prompt's full blocks, a repeat is a prefix hit (metrics and usage.cached_tokens agree),
filling the cache publishes BlockRemoved. The second group runs `kvrouter serve` in front of the
replicas. Prompts there are sent *directly* to one replica first, so the only way the router can
know where they are cached is the KV-event stream.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import zmq

from router.kv.wire import BlockRemoved, BlockStored, KVEventBatch
from tests.integration.vllm_fixtures import (
    BLOCK_SIZE,
    CACHE_BLOCKS,
    FIRST_PLAIN_TOKEN,
    VOCAB,
    EventCollector,
    Replica,
    cached_tokens,
    complete,
    http,
    kvrouter,
    metric_samples,
    metric_sum,
    metric_totals,
    reset_prefix_cache,
    text_prompt,
    token_prompt,
)
from tests.support.procs import SimFleet, wait_for

pytestmark = pytest.mark.vllm

# 20 full blocks plus a partial one: vLLM never serves the last prompt token from cache, so a prompt
# that is an exact multiple of the block size would hit one block less than it stores.
PROMPT_TOKENS = 20 * BLOCK_SIZE + 10
PROMPT_BLOCKS = PROMPT_TOKENS // BLOCK_SIZE
HITS = "vllm:prefix_cache_hits_total"


def expected_hit(prompt_tokens: int) -> int:
    return (prompt_tokens - 1) // BLOCK_SIZE * BLOCK_SIZE


@pytest.fixture(scope="module")
def replicas(vllm_pair: list[Replica]) -> list[Replica]:
    return vllm_pair


@pytest.fixture(scope="module")
def events(replicas: list[Replica]) -> Iterator[EventCollector]:
    collector = EventCollector(replicas)
    collector.settle()
    yield collector
    collector.close()
    assert not collector.errors, collector.errors


def prompt_blocks_stored(events: EventCollector, name: str, prompt: list[int]) -> BlockStored:
    """Wait for the BlockStored that carries `prompt`'s full blocks from the start of the sequence."""
    full = prompt[: len(prompt) // BLOCK_SIZE * BLOCK_SIZE]
    found: list[BlockStored] = []

    def seen() -> bool:
        found[:] = [ev for ev in events.snapshot(name).stored if ev.token_ids == full]
        return bool(found)

    wait_for(seen, 10, f"BlockStored for a {len(prompt)}-token prompt on {name}")
    return found[0]


# --- the engine contract ---------------------------------------------------------------------------


def test_kv_event_sources_and_cache_config(replicas: list[Replica]) -> None:
    for r in replicas:
        sources = http("GET", f"{r.url}/kv_event_sources").body
        assert sources["0"]["endpoint"] == f"tcp://*:{r.zmq_port}"
        assert sources["0"]["replay_endpoint"] == f"tcp://*:{r.replay_port}"
        info = metric_samples(r.url, "vllm:cache_config_info")
        assert info and info[0][0]["block_size"] == str(BLOCK_SIZE)
        assert info[0][0]["enable_prefix_caching"] == "True"


def test_prompt_blocks_arrive_as_block_stored(replicas: list[Replica], events: EventCollector) -> None:
    r0, r1 = replicas
    prompt = token_prompt(1, PROMPT_TOKENS)
    complete(r0.url, prompt)
    ev = prompt_blocks_stored(events, r0.name, prompt)
    assert ev.parent_block_hash is None
    assert ev.block_size == BLOCK_SIZE
    assert len(ev.block_hashes) == PROMPT_BLOCKS
    assert len(set(ev.block_hashes)) == PROMPT_BLOCKS
    # The other replica never saw the prompt.
    assert not set(ev.block_hashes) & set(events.snapshot(r1.name).stored_hashes())
    seqs = events.snapshot(r0.name).seqs
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "gap in the event sequence"


def test_repeat_is_a_prefix_hit(replicas: list[Replica]) -> None:
    r0 = replicas[0]
    for prompt in (token_prompt(2, PROMPT_TOKENS), text_prompt(2, 300)):
        first = complete(r0.url, prompt)
        n = first.body["usage"]["prompt_tokens"]
        assert n > 2 * BLOCK_SIZE
        assert cached_tokens(first) == 0
        hits_before = metric_sum(r0.url, HITS)
        second = complete(r0.url, prompt)
        assert cached_tokens(second) == expected_hit(n)
        assert metric_sum(r0.url, HITS) - hits_before == expected_hit(n)


def test_filling_the_cache_publishes_block_removed(replicas: list[Replica], events: EventCollector) -> None:
    r0 = replicas[0]
    victim = token_prompt(4, PROMPT_TOKENS)
    complete(r0.url, victim)
    victim_hashes = set(prompt_blocks_stored(events, r0.name, victim).block_hashes)
    # More blocks than the cache holds, all newer than the victim: LRU must evict all of it.
    for seed in range(100, 100 + CACHE_BLOCKS // PROMPT_BLOCKS + 2):
        complete(r0.url, token_prompt(seed, PROMPT_TOKENS))
    wait_for(
        lambda: victim_hashes <= events.snapshot(r0.name).removed_hashes(),
        10,
        "BlockRemoved for every block of the evicted prompt",
    )
    assert len(events.snapshot(r0.name).live) <= CACHE_BLOCKS
    assert cached_tokens(complete(r0.url, victim)) == 0


def test_reset_publishes_all_blocks_cleared(replicas: list[Replica], events: EventCollector) -> None:
    r0 = replicas[0]
    assert events.snapshot(r0.name).live, "earlier tests should have left blocks cached"
    cleared_before = events.snapshot(r0.name).cleared
    reset_prefix_cache(r0.url)
    wait_for(lambda: events.snapshot(r0.name).cleared > cleared_before, 10, "AllBlocksCleared")
    assert not events.snapshot(r0.name).live


# --- the router in front of them -------------------------------------------------------------------


@pytest.fixture(scope="module")
def router(
    replicas: list[Replica],
    events: EventCollector,
    vllm_setup: tuple[Path, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    for r in replicas:  # a clean slate: earlier tests left blocks behind
        reset_prefix_cache(r.url)
    log_dir = tmp_path_factory.mktemp("kvrouter")
    with kvrouter([r.url for r in replicas], tokenizer=vllm_setup[1], log_dir=log_dir) as url:
        # The router subscribes when it discovers /kv_event_sources; give the SUB time to join.
        events.settle(1.5)
        yield url


def index_blocks(router_url: str, replica: Replica) -> float:
    """kvrouter_index_blocks summed over tiers for `replica` (its label names the backend URL)."""
    samples = metric_samples(router_url, "kvrouter_index_blocks")
    return sum(v for labels, v in samples if f":{replica.port}" in labels.get("replica", ""))


def routed_to(reply_headers: dict[str, str], replicas: list[Replica]) -> Replica:
    value = reply_headers.get("x-kvrouter-replica", "")
    matches = [r for r in replicas if f":{r.port}" in value or value == r.name]
    assert len(matches) == 1, f"x-kvrouter-replica {value!r} names none of {[r.url for r in replicas]}"
    return matches[0]


def test_router_index_fills_from_kv_events(router: str, replicas: list[Replica]) -> None:
    # Sent around the router: only the KV events can tell it about these blocks.
    for r, prompt in zip(replicas, (token_prompt(10, PROMPT_TOKENS), text_prompt(10, 300)), strict=True):
        before = index_blocks(router, r)
        n = complete(r.url, prompt).body["usage"]["prompt_tokens"]
        wait_for(
            lambda r=r, before=before, n=n: index_blocks(router, r) >= before + n // BLOCK_SIZE,
            10,
            f"kvrouter_index_blocks for {r.url} to grow by {n // BLOCK_SIZE}",
        )
    counted = [
        (name, value)
        for name, value in metric_totals(router, prefix="kvrouter_kv_events_")
        if name.endswith("_total")
    ]
    assert sum(v for _, v in counted) > 0, f"no kvrouter_kv_events_*_total counter moved: {counted}"


def test_router_sends_a_repeat_to_the_replica_that_holds_it(router: str, replicas: list[Replica]) -> None:
    for holder, prompt in (
        (replicas[1], token_prompt(11, PROMPT_TOKENS)),
        (replicas[0], text_prompt(11, 300)),
    ):
        before = index_blocks(router, holder)
        n = complete(holder.url, prompt).body["usage"]["prompt_tokens"]
        wait_for(lambda h=holder, b=before, n=n: index_blocks(router, h) >= b + n // BLOCK_SIZE, 10, "index")
        hits_before = metric_sum(holder.url, HITS)
        reply = complete(router, prompt)
        assert routed_to(reply.headers, replicas) == holder
        assert cached_tokens(reply) == expected_hit(n)
        assert metric_sum(holder.url, HITS) - hits_before == expected_hit(n)


def test_router_index_applies_block_removed(
    router: str, replicas: list[Replica], events: EventCollector
) -> None:
    target = replicas[1]
    before = events.snapshot(target.name)
    stored_before, removed_before = len(before.stored_hashes()), len(before.removed)
    # Straight to the replica: well over its 96-block cache, so vLLM evicts and publishes BlockRemoved.
    for seed in range(200, 200 + CACHE_BLOCKS // PROMPT_BLOCKS + 3):
        complete(target.url, token_prompt(seed, PROMPT_TOKENS))

    # Events trail the responses, and earlier tests may already have evicted on this replica: wait for
    # this flood's own stores and removals rather than for the first removal on record.
    def flooded() -> bool:
        now = events.snapshot(target.name)
        stored = len(now.stored_hashes()) - stored_before
        return stored > CACHE_BLOCKS + PROMPT_BLOCKS and len(now.removed) > removed_before

    wait_for(flooded, 10, "this flood's BlockStored and BlockRemoved from vLLM")
    # Without BlockRemoved applied the index would hold every stored block; with it, at most what the
    # engine holds plus one prompt's worth of speculative entries from routing decisions.
    wait_for(
        lambda: index_blocks(router, target) <= CACHE_BLOCKS + PROMPT_BLOCKS,
        10,
        f"kvrouter_index_blocks for {target.url} to stay within the engine's {CACHE_BLOCKS} blocks",
    )
    assert metric_sum(router, "kvrouter_kv_events_blocks_removed_total") > 0
    assert metric_sum(router, "kvrouter_kv_events_decode_errors_total") == 0
    # And AllBlocksCleared empties it: the count drops to (nearly) nothing.
    assert index_blocks(router, target) > PROMPT_BLOCKS
    reset_prefix_cache(target.url)
    wait_for(
        lambda: index_blocks(router, target) <= PROMPT_BLOCKS, 10, "index to drop after AllBlocksCleared"
    )


# --- simulator fidelity ------------------------------------------------------------------------------


class _OpLog:
    """Every KV event of one publisher as a flat list of per-block operations, in order."""

    def __init__(self, endpoint: str) -> None:
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.connect(endpoint)
        self._decoder = msgspec.msgpack.Decoder(KVEventBatch)
        self.ops: list[tuple[str, object]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(100):
                continue
            _topic, _seq, payload = self._sock.recv_multipart()
            for ev in self._decoder.decode(payload).events:
                if isinstance(ev, BlockStored):
                    self.ops.extend(("stored", h) for h in ev.block_hashes)
                elif isinstance(ev, BlockRemoved):
                    self.ops.extend(("removed", h) for h in ev.block_hashes)
                else:
                    self.ops.append(("cleared", None))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close(linger=0)
        self._ctx.term()


def _normalised(ops: list[tuple[str, object]]) -> list[tuple[str, int]]:
    """Replace each hash by the order of its first appearance: equal 'modulo the hash function'."""
    ids: dict[object, int] = {}
    return [(kind, ids.setdefault(h, len(ids))) for kind, h in ops]


def test_simulator_matches_real_vllm_prefix_cache(replicas: list[Replica], tmp_path: Path) -> None:
    """Fidelity: the same token-id request sequence, the same number of blocks and block
    size -> the same prefix-cache hit tokens and the same BlockStored/BlockRemoved sequence."""
    real = replicas[1]
    reset_prefix_cache(real.url)
    sim = SimFleet(
        tmp_path,
        1,
        "--block-size",
        str(BLOCK_SIZE),
        "--num-gpu-blocks",
        str(CACHE_BLOCKS),
        "--max-model-len",
        "2048",
        "--model",
        "tiny",
        name="sim-fidelity",
    )
    sim_events = sim.replicas[0].events
    logs = {"vllm": _OpLog(real.events_endpoint), "sim": _OpLog(sim_events)}
    try:
        time.sleep(1.0)  # slow joiner
        rng = random.Random(7)
        base = [rng.randrange(FIRST_PLAIN_TOKEN, VOCAB) for _ in range(BLOCK_SIZE * 12)]
        prompts = []
        for i in range(12):  # shared 12- or 5-block heads, distinct tails (~105 blocks): overflows 95
            tail = [rng.randrange(FIRST_PLAIN_TOKEN, VOCAB) for _ in range(BLOCK_SIZE * (6 + i % 5) + 7)]
            prompts.append((base if i % 2 else base[: BLOCK_SIZE * 5]) + tail)
        prompts += [prompts[1], prompts[4], prompts[1]]
        hits_before = {"vllm": metric_sum(real.url, HITS), "sim": metric_sum(sim.urls[0], HITS)}
        cached: dict[str, list[int]] = {"vllm": [], "sim": []}
        for p in prompts:
            cached["vllm"].append(cached_tokens(complete(real.url, p, max_tokens=1)))
            cached["sim"].append(cached_tokens(complete(sim.urls[0], p, max_tokens=1)))
        time.sleep(1.0)
        hits = {
            k: metric_sum(u, HITS) - hits_before[k] for k, u in (("vllm", real.url), ("sim", sim.urls[0]))
        }
        assert cached["sim"] == cached["vllm"]
        assert hits["sim"] == hits["vllm"] > 0
        ops = {k: [op for op in log.ops if op[0] != "cleared"] for k, log in logs.items()}
        assert ops["vllm"], "no KV events arrived from vLLM"
        assert any(kind == "removed" for kind, _ in ops["vllm"]), "the cache never overflowed"
        assert _normalised(ops["sim"]) == _normalised(ops["vllm"])
        # the simulator even uses vLLM's default sha256 block hash, so the raw values agree too
        assert ops["sim"] == ops["vllm"]
    finally:
        for log in logs.values():
            log.close()
        sim.proc.stop()


def test_router_refuses_an_oversize_prompt_with_vllms_own_400(router: str, replicas: list[Replica]) -> None:
    """Issue 21 (F3/F9): a prompt longer than max_model_len gets, from the router and without an
    engine round trip, the same 400 body vLLM itself answers."""
    card = http("GET", replicas[0].url + "/v1/models").body["data"][0]
    max_len = int(card["max_model_len"])
    body = {"model": card["id"], "prompt": token_prompt(21, max_len + 5), "max_tokens": 1}
    direct = http("POST", replicas[0].url + "/v1/completions", body)
    wait_for(lambda: "max_model_len" in json.dumps(http("GET", router + "/v1/models").body), 10, "cards")
    time.sleep(2.1)  # the router's view of the cards refreshes every 2 s
    routed = http("POST", router + "/v1/completions", body)
    assert direct.status == routed.status == 400
    assert routed.body == direct.body
    assert "x-kvrouter-replica" not in routed.headers  # answered by the router itself
