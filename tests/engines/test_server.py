"""The simulated vLLM replica over real loopback HTTP and ZMQ: API shapes, timing, events, faults."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator

import aiohttp
import msgspec
import pytest
import zmq
import zmq.asyncio
from prometheus_client.parser import text_string_to_metric_families

from engines.sim.fleet import Fleet, FleetConfig, start_fleet
from engines.sim.model.block_hash import XxhBlockHasher
from engines.sim.replica.faults import FaultConfig
from engines.sim.replica.publisher import END_SEQ
from engines.sim.replica.vllm_hashes import block_hash_chain, external_hash
from router.kv.wire import BlockStored, KVEventBatch, LegacyKVEventBatch

WAIT = aiohttp.ClientTimeout(total=5)
PROMPT = "the quick brown fox jumps over the lazy dog " * 12  # 108 tokens with the sim tokenizer


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    async with start_fleet(FleetConfig(1, "tiny", time_scale=0.5, seed=3)) as f:
        yield f


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=WAIT) as s:
        yield s


def _sse(text: str) -> list[str]:
    assert text.endswith("data: [DONE]\n\n")
    return [e[len("data: ") :] for e in text.split("\n\n") if e]


async def _sub(ctx: zmq.asyncio.Context, endpoint: str) -> zmq.asyncio.Socket:
    s = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SUBSCRIBE, b"")
    s.connect(endpoint)
    await asyncio.sleep(0.1)  # PUB/SUB slow joiner: let the subscription reach the publisher
    return s


async def _frames(sock: zmq.asyncio.Socket, idle_ms: int = 150, cap: int = 1000) -> list[list[bytes]]:
    out: list[list[bytes]] = []
    while len(out) < cap and await sock.poll(idle_ms, zmq.POLLIN):
        out.append(await sock.recv_multipart())
    return out


async def test_completion_usage_and_cached_tokens_on_repeat(
    fleet: Fleet, http: aiohttp.ClientSession
) -> None:
    url = fleet[0].url
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "ignore_eos": True}
    async with http.post(url + "/v1/completions", json=body) as r:
        first = await r.json()
    async with http.post(url + "/v1/completions", json=body) as r:
        second = await r.json()
    n = first["usage"]["prompt_tokens"]
    assert first["object"] == "text_completion" and first["choices"][0]["finish_reason"] == "length"
    assert first["usage"]["completion_tokens"] == 4 and first["usage"]["total_tokens"] == n + 4
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    # Whole blocks of 16, never the last prompt token (vLLM recomputes it).
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == (n - 1) // 16 * 16
    async with http.post(url + "/tokenize", json={"prompt": PROMPT}) as r:
        tok = await r.json()
    assert tok["count"] == n == len(tok["tokens"]) and tok["max_model_len"] == 2048
    # Token-id prompts and batches work too; the token-id prompt hits the same cache.
    async with http.post(url + "/v1/completions", json={"prompt": tok["tokens"], "max_tokens": 2}) as r:
        assert (await r.json())["usage"]["prompt_tokens_details"]["cached_tokens"] == (n - 1) // 16 * 16
    async with http.post(url + "/v1/completions", json={"prompt": ["a b c", "d e"], "max_tokens": 2}) as r:
        batch = await r.json()
    assert [c["index"] for c in batch["choices"]] == [0, 1] and batch["usage"]["completion_tokens"] == 4


async def test_chat_stream_timing_and_usage(fleet: Fleet, http: aiohttp.ClientSession) -> None:
    body = {
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    arrivals: list[float] = []
    chunks: list[str] = []
    async with http.post(fleet[0].url + "/v1/chat/completions", json=body) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        async for line in r.content:
            if line.startswith(b"data: "):
                arrivals.append(time.monotonic())
                chunks.append(line.decode())
    assert chunks[-1].strip() == "data: [DONE]"
    events = [json.loads(c[len("data: ") :]) for c in chunks[:-1]]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [e for e in events if e["choices"] and "content" in e["choices"][0]["delta"]][1:]
    assert len(content) == 6 and content[-1]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 6
    # Tokens come one per decode step, so they are spaced by the step time (time_scale 0.5 makes a
    # tiny decode step ~0.04 ms x 2); they must not all arrive in one burst.
    gaps = [b - a for a, b in itertools.pairwise(arrivals[1:])]
    assert all(g > 0 for g in gaps)
    assert fleet[0].steps >= 6


async def test_stream_spacing_follows_step_time(http: aiohttp.ClientSession) -> None:
    # time_scale 0.01: each tiny decode step takes ~2-3 ms of wall time.
    async with start_fleet(FleetConfig(1, "tiny", time_scale=0.01, events_port=None)) as f:
        body = {"prompt": "hi there", "max_tokens": 8, "stream": True}
        t: list[float] = []
        t0 = time.monotonic()
        async with http.post(f[0].url + "/v1/completions", json=body) as r:
            async for line in r.content:
                if line.startswith(b"data: {"):
                    t.append(time.monotonic())
        assert len(t) == 8
        step = f[0].model.step_model.step_ms(0, 0.0, 1, 10) / 1000 / 0.01
        # The loop schedules against a deadline (a late step is paid back by the next ones), so
        # the whole stream, not each gap, keeps the model's pace: 1 prefill + 7 decode steps.
        span = t[-1] - t0
        assert span >= 8 * step * 0.8  # never faster than the model says
        assert span < 8 * step * 5 + 0.2  # and not wildly slower
        assert t[-1] - t[3] > 3 * step * 0.5  # spread out, not one burst


async def _stream_texts(
    http: aiohttp.ClientSession, url: str, body: dict[str, object]
) -> tuple[list[str], int]:
    """The text of each content chunk of a streamed completion, and its usage's completion_tokens."""
    texts: list[str] = []
    usage = -1
    async with http.post(url + "/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()
        for event in _sse(await r.text())[:-1]:
            obj = json.loads(event)
            if obj["choices"]:
                texts.append(obj["choices"][0]["text"])
            if obj.get("usage"):
                usage = obj["usage"]["completion_tokens"]
    return texts, usage


async def test_stream_interval_batches_tokens_as_vllm(http: aiohttp.ClientSession) -> None:
    # vLLM 0.32 (OutputProcessor with --stream-interval N): the first token goes at once, then one
    # chunk per N new tokens, then whatever is left when the request finishes.
    async with start_fleet(FleetConfig(1, "tiny", time_scale=0.01, events_port=None, stream_interval=4)) as f:
        url = f[0].url
        body: dict[str, object] = {
            "prompt": "hi there", "max_tokens": 10, "stream": True, "stream_options": {"include_usage": True},
        }  # fmt: skip
        texts, usage = await _stream_texts(http, url, body)
        words = [len(t.split()) for t in texts]
        assert usage == 10 and words == [1, 4, 4, 1], words
        # A request may raise the server's interval, never lower it.
        texts, _ = await _stream_texts(http, url, {**body, "stream_interval": 6})
        assert [len(t.split()) for t in texts] == [1, 6, 3]
        texts, _ = await _stream_texts(http, url, {**body, "stream_interval": 2})
        assert [len(t.split()) for t in texts] == [1, 4, 4, 1]
        # Non-streamed responses are whole either way.
        async with http.post(url + "/v1/completions", json={**body, "stream": False}) as r:
            assert len((await r.json())["choices"][0]["text"].split()) == 10
        for bad in (0, -1, "2", 1.5, True):
            async with http.post(url + "/v1/completions", json={**body, "stream_interval": bad}) as r:
                assert r.status == 400
                err = (await r.json())["error"]
                assert err["param"] == "stream_interval" and "stream_interval" in err["message"]


async def test_errors_are_openai_shaped(fleet: Fleet, http: aiohttp.ClientSession) -> None:
    url = fleet[0].url
    for body, status in (
        ({"prompt": 5}, 400),
        ({"prompt": "x", "max_tokens": 0}, 400),
        ({"prompt": "x", "model": "other"}, 404),
        ({"prompt": "x " * 3000}, 400),
        ({"messages": []}, 400),
    ):
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        async with http.post(url + path, json=body) as r:
            assert r.status == status, body
            err = (await r.json())["error"]
            assert err["code"] == status and err["message"] and err["type"]


async def test_models_health_sources_metrics(fleet: Fleet, http: aiohttp.ClientSession) -> None:
    url = fleet[0].url
    async with http.get(url + "/health") as r:
        assert r.status == 200
    async with http.get(url + "/v1/models") as r:
        assert (await r.json())["data"][0]["id"] == "tiny"
    async with http.get(url + "/kv_event_sources") as r:
        src = (await r.json())["0"]
    port = fleet[0].events_endpoint.rsplit(":", 1)[1] if fleet[0].events_endpoint else ""
    assert src["endpoint"] == f"tcp://*:{port}" and src["topic"] == "kv-events"
    assert src["replay_endpoint"].startswith("tcp://*:")
    async with http.post(url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 3}) as r:
        assert r.status == 200
    async with http.get(url + "/metrics") as r:
        fams = {f.name: f for f in text_string_to_metric_families(await r.text())}
    gen = next(s for s in fams["vllm:generation_tokens"].samples if s.name.endswith("_total"))
    assert gen.value == 3 and gen.labels == {"engine": "0", "model_name": "tiny"}
    assert fams["vllm:time_to_first_token_seconds"].type == "histogram"
    assert "kvrouter_sim_lag_seconds" in fams


async def test_kv_events_match_vllm_hashes_and_replay(fleet: Fleet, http: aiohttp.ClientSession) -> None:
    ctx = zmq.asyncio.Context()
    try:
        rep = fleet[0]
        assert rep.events_endpoint and rep.replay_endpoint
        sub = await _sub(ctx, rep.events_endpoint)
        async with http.post(rep.url + "/tokenize", json={"prompt": PROMPT}) as r:
            tokens = (await r.json())["tokens"]
        async with http.post(rep.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}) as r:
            assert r.status == 200
        frames = await _frames(sub)
        assert frames and all(f[0] == b"kv-events" for f in frames)
        seqs = [int.from_bytes(f[1], "big") for f in frames]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        dec = msgspec.msgpack.Decoder(KVEventBatch)
        stored = [e for f in frames for e in dec.decode(f[2]).events if isinstance(e, BlockStored)]
        hashes = [h for e in stored for h in e.block_hashes]
        # Exactly vLLM's sha256 ints for these tokens (what a real replica would publish).
        want = [external_hash(d) for d in block_hash_chain(tokens, 16)]
        assert hashes[: len(want)] == want
        assert stored[0].parent_block_hash is None and stored[0].token_ids == tokens[: len(want) * 16]
        # Replay from the first seq returns the same payloads, then vLLM's end marker.
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(rep.replay_endpoint)
        await dealer.send_multipart([b"", seqs[0].to_bytes(8, "big")])
        got = await _frames(dealer)
        assert [g[2] for g in got[:-1]] == [f[2] for f in frames]
        assert got[-1] == [b"", END_SEQ, b""]
        # reset_prefix_cache publishes AllBlocksCleared.
        async with http.post(rep.url + "/reset_prefix_cache") as r:
            assert r.status == 200
        (cleared,) = await _frames(sub)
        assert msgspec.msgpack.decode(cleared[2])[1] == [{"type": "AllBlocksCleared"}]
    finally:
        ctx.destroy(linger=0)


async def test_legacy_and_bytes_hash_events(http: aiohttp.ClientSession) -> None:
    ctx = zmq.asyncio.Context()
    try:
        async with start_fleet(FleetConfig(1, "tiny", legacy_events=True, int_block_hashes=False)) as f:
            sub = await _sub(ctx, f[0].events_endpoint or "")
            async with http.post(f[0].url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 1}) as r:
                assert r.status == 200
            frames = await _frames(sub)
            batch = msgspec.msgpack.Decoder(LegacyKVEventBatch).decode(frames[0][2])
            ev = batch.events[0]
            assert isinstance(msgspec.msgpack.decode(frames[0][2])[1][0], list)  # positional shape
            assert ev.block_hashes[0] == block_hash_chain(ev.token_ids[:16], 16)[0]  # raw digest
    finally:
        ctx.destroy(linger=0)


@pytest.mark.parametrize("int_hashes", [True, False])
async def test_engine_hash_events(http: aiohttp.ClientSession, int_hashes: bool) -> None:
    """--kv-event-hashes engine: the events carry the engine's xxh3 chain (ints, or their 8
    bytes), chained like vLLM's, and /metrics says the hash is none of vLLM's."""
    ctx = zmq.asyncio.Context()
    try:
        async with start_fleet(
            FleetConfig(1, "tiny", kv_event_hashes="engine", int_block_hashes=int_hashes)
        ) as f:
            sub = await _sub(ctx, f[0].events_endpoint or "")
            for _ in range(2):  # the repeat is a cache hit: no second BlockStored for the prompt
                body = {"prompt": PROMPT, "max_tokens": 1}
                async with http.post(f[0].url + "/v1/completions", json=body) as r:
                    assert r.status == 200
            frames = await _frames(sub)
            async with http.get(f[0].url + "/metrics") as r:
                page = await r.text()
        (batch,) = [msgspec.msgpack.Decoder(KVEventBatch).decode(fr[2]) for fr in frames]
        (ev,) = batch.events
        assert isinstance(ev, BlockStored) and ev.parent_block_hash is None
        want = XxhBlockHasher().chain(None, ev.token_ids, 16)
        assert len(want) == len(ev.token_ids) // 16 >= 2
        assert ev.block_hashes == (want if int_hashes else [h.to_bytes(8, "big") for h in want])
        assert 'prefix_caching_hash_algo="kvrouter-xxh3"' in page
    finally:
        ctx.destroy(linger=0)
    with pytest.raises(ValueError, match="kv_event_hashes"):
        async with start_fleet(FleetConfig(1, "tiny", kv_event_hashes="md5")):
            pass


async def test_fault_error_rate_and_control_endpoint(fleet: Fleet, http: aiohttp.ClientSession) -> None:
    url = fleet[0].url
    async with http.post(url + "/sim/faults", json={"error_rate": 1.0}) as r:
        assert r.status == 200
    async with http.post(url + "/v1/completions", json={"prompt": "x"}) as r:
        assert r.status == 500 and (await r.json())["error"]["type"] == "InternalServerError"
    async with http.get(url + "/sim/faults") as r:
        state = await r.json()
    assert state["config"]["error_rate"] == 1.0 and state["injected"]["error"] == 1
    async with http.post(url + "/sim/faults", json={"error_rate": 7}) as r:
        assert r.status == 400
    async with http.post(url + "/sim/faults", json={}) as r:
        assert r.status == 200
    async with http.post(url + "/v1/completions", json={"prompt": "x"}) as r:
        assert r.status == 200


async def test_fault_stall_before_first_byte(fleet: Fleet, http: aiohttp.ClientSession) -> None:
    await fleet[0].set_faults(FaultConfig(stall_s=0.3))
    t0 = time.monotonic()
    async with http.post(fleet[0].url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}) as r:
        assert r.status == 200
    assert time.monotonic() - t0 >= 0.29
    await fleet[0].set_faults(FaultConfig(stall_forever=True))
    with pytest.raises(asyncio.TimeoutError):
        async with http.post(
            fleet[0].url + "/v1/completions", json={"prompt": "x"}, timeout=aiohttp.ClientTimeout(total=0.3)
        ) as r:
            await r.read()
    await fleet[0].set_faults(FaultConfig())


async def test_fault_die_mid_stream(fleet: Fleet, http: aiohttp.ClientSession) -> None:
    await fleet[0].set_faults(FaultConfig(die_after_chunks=2))
    got: list[bytes] = []
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.post(
            fleet[0].url + "/v1/completions", json={"prompt": "x", "max_tokens": 10, "stream": True}
        ) as r:
            async for line in r.content:
                if line.startswith(b"data: "):
                    got.append(line)
    assert len(got) == 2 and all(b"[DONE]" not in g for g in got)
    await fleet[0].set_faults(FaultConfig())
    await asyncio.sleep(0.05)
    assert not fleet[0].model.has_unfinished_requests()  # the cut request was aborted in the engine


async def test_fault_refuse_connections_and_relisten(fleet: Fleet) -> None:
    rep = fleet[0]
    port = rep.port
    await rep.set_faults(FaultConfig(refuse_connections=True))
    async with aiohttp.ClientSession(timeout=WAIT) as s:
        with pytest.raises(aiohttp.ClientConnectorError):
            await s.get(rep.url + "/health")
    await rep.set_faults(FaultConfig())
    assert rep.port == port
    async with aiohttp.ClientSession(timeout=WAIT) as s, s.get(rep.url + "/health") as r:
        assert r.status == 200
    # Timed refusal clears itself.
    await rep.set_faults(FaultConfig(refuse_connections=True, refuse_for_s=0.1))
    assert not rep.listening
    await asyncio.sleep(0.25)
    assert rep.listening


async def test_fault_restart_resets_seq_and_cache(fleet: Fleet, http: aiohttp.ClientSession) -> None:
    ctx = zmq.asyncio.Context()
    try:
        rep = fleet[0]
        sub = await _sub(ctx, rep.events_endpoint or "")
        body = {"prompt": PROMPT, "max_tokens": 2}
        for prompt in ("other " + PROMPT, PROMPT):
            async with http.post(rep.url + "/v1/completions", json={**body, "prompt": prompt}) as r:
                assert r.status == 200
        before = await _frames(sub)
        assert int.from_bytes(before[-1][1], "big") > 0
        await rep.set_faults(FaultConfig(restart=True))
        async with http.post(rep.url + "/v1/completions", json=body) as r:
            assert (await r.json())["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # cache gone
        after = await _frames(sub)
        assert int.from_bytes(after[0][1], "big") == 0
        kinds = [e["type"] for f in after for e in msgspec.msgpack.decode(f[2])[1]]
        assert "AllBlocksCleared" not in kinds
    finally:
        ctx.destroy(linger=0)


async def test_fault_malformed_and_reordered_events(http: aiohttp.ClientSession) -> None:
    ctx = zmq.asyncio.Context()
    try:
        async with start_fleet(FleetConfig(1, "tiny", faults=FaultConfig(reorder_event_rate=1.0))) as f:
            sub = await _sub(ctx, f[0].events_endpoint or "")
            for i in range(2):
                async with http.post(f[0].url + "/v1/completions", json={"prompt": f"{i} {PROMPT}"}) as r:
                    assert r.status == 200
            seqs = [int.from_bytes(fr[1], "big") for fr in await _frames(sub)]
            assert sorted(seqs) == list(range(len(seqs))) and seqs != sorted(seqs)
            await f[0].set_faults(FaultConfig(malformed_event_rate=1.0))
            async with http.post(f[0].url + "/v1/completions", json={"prompt": "new " + PROMPT}) as r:
                assert r.status == 200
            frames = await _frames(sub)
            assert frames
            for fr in frames:
                with pytest.raises(msgspec.DecodeError):
                    msgspec.msgpack.decode(fr[2])
    finally:
        ctx.destroy(linger=0)


async def test_client_disconnect_aborts_in_engine(http: aiohttp.ClientSession) -> None:
    async with start_fleet(FleetConfig(1, "tiny", time_scale=0.01, events_port=None)) as f:
        with pytest.raises(asyncio.TimeoutError):
            async with http.post(
                f[0].url + "/v1/completions",
                json={"prompt": "x", "max_tokens": 500},
                timeout=aiohttp.ClientTimeout(total=0.1),
            ) as r:
                await r.read()
        deadline = time.monotonic() + 2
        while f[0].model.has_unfinished_requests() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert not f[0].model.has_unfinished_requests()


async def test_deeply_nested_json_is_a_400_not_a_500() -> None:
    """Regression: a body nested past msgspec's depth limit raised RecursionError -> HTTP 500."""
    async with start_fleet(FleetConfig(1, "tiny", events_port=None)) as fleet:
        body = b'{"model":"tiny","prompt":' + b"[" * 5000 + b"]" * 5000 + b"}"
        async with (
            aiohttp.ClientSession() as s,
            s.post(fleet.replicas[0].url + "/v1/completions", data=body) as r,
        ):
            assert r.status == 400


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("include_usage", [False, True])
def test_sse_templates_equal_encoded_chunks(chat: bool, include_usage: bool) -> None:
    """sse_chunks (pre-encoded templates) sends exactly the encoded chunk objects."""
    import random

    from engines.sim.replica.openai_format import ResponseFormatter, json_encoder
    from engines.sim.replica.streams import Delta
    from engines.sim.replica.tokenizer import SimTokenizer

    tok = SimTokenizer()
    rng = random.Random(0)
    ref, fast = ResponseFormatter('m"odel', chat, 3, tok), ResponseFormatter('m"odel', chat, 3, tok)
    fast.id, fast.created = ref.id, ref.created
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(0, 3))]
        d = Delta(rng.randrange(3), ids, rng.choice([None, None, "length"]))
        want = [b"data: " + json_encoder.encode(c) + b"\n\n" for c in ref.chunks(d, include_usage)]
        assert fast.sse_chunks(d, include_usage) == want


async def test_cpu_tier_hit_waits_for_its_load_then_streams(http: aiohttp.ClientSession) -> None:
    """A prompt evicted from the GPU but kept by the CPU tier is loaded, not recomputed: the
    engine loop waits for the load (no step can run meanwhile) and then serves it."""
    async with start_fleet(
        FleetConfig(1, "tiny", num_gpu_blocks=1 + 20, cpu_tier_tokens=4096, events_port=None)
    ) as f:
        url = f[0].url + "/v1/completions"
        a = [300 + i for i in range(320)]  # 20 blocks: the whole GPU pool
        b = [900 + i for i in range(320)]  # evicts a from the GPU; the CPU tier keeps its whole chunk
        cached = []
        for prompt in (a, b, a):
            async with http.post(url, json={"prompt": prompt, "max_tokens": 1}) as r:
                assert r.status == 200, await r.text()
                cached.append((await r.json())["usage"]["prompt_tokens_details"]["cached_tokens"])
        assert cached == [0, 0, 256]  # one whole 256-token chunk; the partial rest is not kept
        assert f[0].model.snapshot().external_prefix_cache_hits == 256
        assert not f[0].model.has_unfinished_requests()


async def test_delivery_lag_is_observed_per_stream_write(http: aiohttp.ClientSession) -> None:
    """kvrouter_sim_delivery_lag_seconds: one observation per SSE write, none for a unary reply."""
    async with start_fleet(FleetConfig(1, "tiny", time_scale=0.5, events_port=None)) as f:
        url = f[0].url + "/v1/completions"

        async def count() -> float:
            async with http.get(f[0].url + "/metrics") as r:
                fams = {fam.name: fam for fam in text_string_to_metric_families(await r.text())}
            samples = {s.name: s.value for s in fams["kvrouter_sim_delivery_lag_seconds"].samples}
            return samples["kvrouter_sim_delivery_lag_seconds_count"]

        async with http.post(url, json={"prompt": [5] * 40, "max_tokens": 2}) as r:
            assert r.status == 200
        assert await count() == 0
        async with http.post(url, json={"prompt": [5] * 40, "max_tokens": 6, "stream": True}) as r:
            assert r.status == 200 and (await r.text()).endswith("data: [DONE]\n\n")
        assert 1 <= await count() <= 6


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="Linux per-thread nice levels")
async def test_zmq_threads_run_below_the_engine_loop() -> None:
    # The fleet lowers its ZMQ I/O thread so a KV-event send does not preempt the engine loop.
    def nice_of(tid: str) -> int:
        with open(f"/proc/self/task/{tid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[16])  # field 19: nice

    def comm(tid: str) -> str:
        with open(f"/proc/self/task/{tid}/comm") as f:
            return f.read().strip()

    async with (
        start_fleet(FleetConfig(1, "tiny", events_port=0)) as f,
        start_fleet(FleetConfig(1, "tiny", events_port=0)) as g,
    ):
        assert f[0].events_endpoint and g[0].events_endpoint
        own = nice_of(str(threading.get_native_id()))
        levels = [nice_of(t) for t in os.listdir("/proc/self/task") if comm(t).startswith("ZMQbg/IO")]
        # Both fleets' I/O threads (other tests' contexts may have more), each lowered once:
        # the second fleet does not push the first one's further down.
        assert levels.count(min(19, own + 10)) >= 2 and max(levels) <= min(19, own + 10)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--replicas", "0"], "invalid n"),
        (["--stream-interval", "0"], "invalid stream_interval"),
        (["--time-scale", "0"], "invalid time_scale"),
        (["--fault-error-rate", "2"], "invalid fault error_rate"),
    ],
)
def test_sim_cli_refuses_bad_values_cleanly(flags: list[str], message: str) -> None:
    # One message and exit status 2, no traceback, whichever layer rejects the value.
    out = subprocess.run(
        [sys.executable, "-m", "router", "sim", "--port", "0", "--events-port", "0", *flags],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("kvrouter sim: ") and message in out.stderr
    assert "Traceback" not in out.stderr
