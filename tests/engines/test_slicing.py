"""A long prompt's own work (JSON decode, token-id check, block-hash chain) runs in slices that
yield to the loop, with the same body value and errors and the same hashes as one-shot, and no
engine loop waits for it: the engine keeps stepping and the request arrives when it is ready."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import aiohttp
import msgspec
import pytest

from engines.sim.fleet import FleetConfig, start_fleet
from engines.sim.model.block_hash import XxhBlockHasher
from engines.sim.replica.openai_format import HTTPError
from engines.sim.replica.prep import decode_json, decode_json_sliced
from engines.sim.replica.streams import Chan

WAIT = aiohttp.ClientTimeout(total=20)


def _one_shot(data: bytes) -> Any:
    try:
        return ("ok", decode_json(data))
    except HTTPError as exc:
        return ("error", exc.status, str(exc))


async def _sliced(data: bytes) -> Any:
    try:
        body, ids = await decode_json_sliced(data)
    except HTTPError as exc:
        return ("error", exc.status, str(exc))
    if ids is not None:
        assert body["prompt"] is ids
    return ("ok", body)


def _bodies() -> list[bytes]:
    rng = random.Random(7)
    ids = [rng.randrange(0, 130_000) for _ in range(20_000)]
    arr = msgspec.json.encode(ids)
    spaced = b"[ " + b" ,\n ".join(str(i).encode() for i in ids) + b" ]"
    big = b"[" + b",".join(str(1 << 70 if i % 997 == 0 else -i).encode() for i in ids) + b"]"
    long_text = msgspec.json.encode(" ".join(["word"] * 20_000))
    out = [
        b'{"model":"tiny","prompt":' + arr + b',"max_tokens":3,"stream":true}',
        b'{"prompt" :\n ' + spaced + b"}",
        b'{"max_tokens":3,"prompt":' + big + b"}",
        b'{"prompt":' + arr[:-1] + b",]}",  # trailing comma: invalid JSON
        b'{"prompt":' + arr[:-1] + b", ]}",
        b'{"prompt":' + arr[:-1] + b",true]}",  # a bool
        b'{"prompt":' + arr[:-1] + b",1.0]}",  # a float
        b'{"prompt":' + arr[:-1] + b',"x"]}',  # a string
        b'{"prompt":[' + arr + b"," + arr + b"]}",  # a batch of id lists
        b'{"prompt":' + msgspec.json.encode([str(i) for i in ids[:5000]]) + b"}",  # a batch of strings
        b'{"opts":{"prompt":[1,2]},"prompt":' + arr + b"}",  # the first "prompt" is nested
        b'{"prompt":' + arr + b',"prompt":[5]}',  # repeated key: the last one wins
        b'{"prompt":[5],"prompt":' + arr + b"}",
        b'{"prompt":' + arr + b',"x":"\\u0000"}',
        b'{"prompt":' + arr + b',"max_tokens":}',  # invalid after the array
        b'{"prompt":' + arr,  # truncated
        b'["prompt",' + arr + b"]",  # not an object
        b'{"prompt":' + long_text + b"}",
        b'{"prompt":' + b"[" * 40_000 + b"]" * 40_000 + b"}",  # nested past msgspec's limit
        b'{"prompt":[],"pad":"' + b"x" * 40_000 + b'"}',
        b'{"pad":"' + b"x" * 40_000 + b'","prompt"  :  ' + arr + b"}",
    ]
    return out


@pytest.mark.parametrize("i", range(len(_bodies())))
async def test_sliced_decode_gives_exactly_the_one_shot_result(i: int) -> None:
    data = _bodies()[i]
    assert len(data) > 32 * 1024
    assert await _sliced(data) == _one_shot(data)


async def test_sliced_decode_returns_the_ids_of_a_plain_id_prompt() -> None:
    ids = list(range(50_000))
    body, got = await decode_json_sliced(msgspec.json.encode({"prompt": ids, "max_tokens": 1}))
    assert got == ids and body == {"prompt": ids, "max_tokens": 1}
    _, none = await decode_json_sliced(msgspec.json.encode({"prompt": [], "pad": "x" * 40_000}))
    assert none is None


@pytest.mark.parametrize("n_tokens", [0, 15, 16, 31 * 16 + 3, 32 * 16, 33 * 16, 5000 * 16 + 7])
async def test_hash_prompt_in_slices_equals_the_chain(n_tokens: int) -> None:
    rng = random.Random(n_tokens)
    ids = [rng.randrange(32000) for _ in range(n_tokens)]
    async with start_fleet(FleetConfig(1, "tiny", events_port=None)) as fleet:
        rep = fleet[0]
        got = await rep.hash_prompt(ids)
    assert got == XxhBlockHasher().chain(None, ids, 16)


async def test_the_engine_keeps_stepping_while_a_request_is_prepared() -> None:
    """A request's API-server side (here held behind the fleet's preparation lock) never stops
    the engine loop: the running request keeps getting steps, and the held one enters the
    engine when its preparation ends, with that wait in kvrouter_sim_prepare_seconds."""
    async with (
        start_fleet(FleetConfig(1, "tiny", time_scale=0.005, events_port=None)) as fleet,  # 400 steps: ~1.7 s
        aiohttp.ClientSession(timeout=WAIT) as http,
    ):
        rep = fleet[0]
        running = asyncio.create_task(
            http.post(rep.url + "/v1/completions", json={"prompt": [7] * 40, "max_tokens": 400})
        )
        while rep.steps < 5:
            await asyncio.sleep(0.001)
        # over 32 KB of body: its decode takes the fleet's preparation lock
        body = {"prompt": list(range(256, 256 + 1500)), "max_tokens": 2, "user": "u" * 40_000}
        async with rep.prep_lock:
            held = asyncio.create_task(http.post(rep.url + "/v1/completions", json=body))
            await asyncio.sleep(0.05)
            steps = rep.steps
            await asyncio.sleep(0.2)
            assert not held.done()
            assert rep.steps > steps  # stepping on while the request waits
            assert rep.model.num_waiting + rep.model.num_running == 1  # only the running one
        async with await held as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["usage"]["prompt_tokens"] == 1500
        async with await running as r:
            assert r.status == 200
        prep = {
            s.name: s.value
            for m in rep.metrics.registry.collect()
            for s in m.samples
            if s.name.startswith("kvrouter_sim_prepare_seconds")
        }
        assert prep["kvrouter_sim_prepare_seconds_count"] == 2
        assert prep["kvrouter_sim_prepare_seconds_sum"] >= 0.2  # the held one waited ~0.25 s


async def test_a_request_arriving_while_the_loop_is_late_joins_its_next_step() -> None:
    """Arrivals are stamped on the engine's clock: while the loop is late, that is the start of
    the step it is about to compute, so an arrival never pushes the engine's clock past it."""
    async with start_fleet(FleetConfig(1, "tiny", events_port=None)) as fleet:
        rep = fleet[0]
        assert rep._next_step_at is None  # idle: the wall clock
        before = time.monotonic()
        assert before <= rep.engine_now() <= time.monotonic()
        rep._next_step_at = before - 0.02  # a step due 20 ms ago, not computed yet
        assert rep.engine_now() == before - 0.02
        rep._next_step_at = time.monotonic() + 1.0  # on time: the step ends in the future
        assert rep.engine_now() <= time.monotonic()
        rep._next_step_at = time.monotonic() - 0.3  # a 300 ms stall: the loop drops all but 50 ms
        assert time.monotonic() - 0.05 - 0.01 <= rep.engine_now() <= time.monotonic() - 0.05
        # The engine gets the stamp; the server's latency metrics count from the wall clock.
        tr = rep.submit([7] * 40, 2, Chan(), 0)
        assert time.monotonic() - tr.arrival < 0.01
        assert rep.model._reqs[tr.rid].arrival <= tr.arrival - 0.04
        rep._next_step_at = None


async def test_long_id_prompt_end_to_end_same_hashes_and_cache_hit() -> None:
    """A 40k-token id prompt (decoded and hashed in slices) is cached under vLLM's hashes and
    hits on repeat, exactly as the one-shot path did."""
    rng = random.Random(3)
    ids = [rng.randrange(256, 32000) for _ in range(40_000)]
    async with (
        start_fleet(FleetConfig(1, "h100-llama3-8b", time_scale=1000.0, events_port=None)) as fleet,
        aiohttp.ClientSession(timeout=WAIT) as http,
    ):
        rep = fleet[0]
        for want_cached in (0, (len(ids) - 1) // 16 * 16):
            async with http.post(rep.url + "/v1/completions", json={"prompt": ids, "max_tokens": 2}) as r:
                assert r.status == 200, await r.text()
                usage = (await r.json())["usage"]
            assert usage["prompt_tokens"] == len(ids)
            assert usage["prompt_tokens_details"]["cached_tokens"] == want_cached
        want = XxhBlockHasher().chain(None, ids, 16)
        assert [rep.model.pool.get_cached_block(h) is not None for h in want] == [True] * len(want)
