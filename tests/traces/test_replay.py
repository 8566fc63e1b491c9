"""Live replay: open-loop timing, limits, every request recorded (errors too), grace cancellation,
engine counters, and a real run against the in-process simulated fleet."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from engines.sim.fleet import FleetConfig, start_fleet
from traces.model import Trace, TraceRequest
from traces.records import read_records
from traces.replay import (
    ReplayConfig,
    Target,
    engine_delta,
    fleet_cache_tokens,
    parse_cache_config,
    parse_prometheus,
    plan,
    replay,
    run_target,
    select_requests,
    write_outputs,
)


def _trace(n: int, gap_s: float, *, block: int = 16, shared: bool = True, out_len: int = 4) -> Trace:
    reqs = []
    for i in range(n):
        # Every request starts with block 0 (a shared "system prompt") when shared.
        ids = ((0,) if shared else ()) + (1000 + i,)
        reqs.append(
            TraceRequest(
                timestamp_s=i * gap_s,
                input_length=len(ids) * block,
                output_length=out_len,
                hash_ids=ids,
                request_id=str(i),
            )
        )
    return Trace(requests=tuple(reqs), block_tokens=block, name="t")


class Fake:
    """A streaming completions server: ``delay`` before the first token, HTTP 500 for every
    ``fail_every``-th request, requests with ``stall`` in their id set never answered, and with
    ``bad_usage`` a usage block whose token count is not a number."""

    def __init__(
        self,
        delay: float = 0.0,
        fail_every: int = 0,
        stall_ids: frozenset[int] = frozenset(),
        bad_usage: bool = False,
    ) -> None:
        self.delay, self.fail_every, self.stall_ids = delay, fail_every, stall_ids
        self.bad_usage = bad_usage
        self.arrivals: list[float] = []
        self.n = 0

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.arrivals.append(time.perf_counter())
        self.n += 1
        if self.fail_every and self.n % self.fail_every == 0:
            return web.json_response({"error": {"message": "boom"}}, status=500)
        if body["prompt"][-1] in self.stall_ids:
            await asyncio.sleep(3600)
        await asyncio.sleep(self.delay)
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "x-kvrouter-replica": "r-fake"}
        )
        await resp.prepare(request)
        for i in range(body["max_tokens"]):
            chunk = {"choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}], "usage": None}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await asyncio.sleep(0.002)
        usage = {
            "prompt_tokens": len(body["prompt"]),
            "completion_tokens": "many" if self.bad_usage else body["max_tokens"],
            "prompt_tokens_details": {"cached_tokens": 16},
        }
        await resp.write(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp


@pytest.fixture
async def fake_factory() -> AsyncIterator[object]:
    runners: list[web.AppRunner] = []

    async def make(fake: Fake) -> str:
        app = web.Application()
        app.router.add_post("/v1/completions", fake.completions)
        # handler_cancellation: a stalled handler ends when the client gives up; short shutdown either way.
        runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    yield make
    for r in runners:
        await r.cleanup()


def _last_token(trace: Trace, i: int) -> int:
    """The stall marker: the last prompt token of request i (unique per request here)."""
    from traces.synth import PromptSynth

    return PromptSynth(trace.block_tokens).token_ids(trace.requests[i])[-1]


async def test_open_loop_sends_do_not_wait_for_responses(fake_factory) -> None:  # type: ignore[no-untyped-def]
    fake = Fake(delay=0.5)
    url = await fake_factory(fake)
    trace = _trace(10, gap_s=0.03)
    cfg = ReplayConfig(speedup=1.0, model="m", grace_s=5)
    run = await run_target(Target("fake", url), plan(trace, cfg, "m"), cfg)
    assert len(run.records) == 10
    # Every send happened on the trace clock, long before the first response (0.5 s) came back.
    for rec, req in zip(run.records, trace.requests, strict=True):
        assert abs(rec.send_s - req.timestamp_s) < 0.15
    assert fake.arrivals[-1] - fake.arrivals[0] < 0.45
    assert run.lateness_max_s < 0.15
    for rec in run.records:
        assert rec.ok and rec.ttft_s is not None and rec.ttft_s >= 0.5
        assert rec.output_tokens == 4 and len(rec.itl_s) == 3
        assert rec.cached_tokens == 16 and rec.replica == "r-fake" and rec.status == 200
        assert rec.e2e_s is not None and rec.e2e_s >= rec.ttft_s


async def test_errors_are_recorded(fake_factory) -> None:  # type: ignore[no-untyped-def]
    url = await fake_factory(Fake(fail_every=3))
    trace = _trace(9, gap_s=0.0)
    cfg = ReplayConfig(model="m", grace_s=5)
    run = await run_target(Target("fake", url), plan(trace, cfg, "m"), cfg)
    bad = [r for r in run.records if r.error]
    assert len(run.records) == 9 and len(bad) == 3
    assert all(r.status == 500 and "boom" in (r.error or "") and r.e2e_s is None for r in bad)


async def test_unreachable_target_records_connection_errors() -> None:
    from traces.fleetproc import free_port

    trace = _trace(3, gap_s=0.0)
    cfg = ReplayConfig(model="m", grace_s=2)
    run = await run_target(Target("gone", f"http://127.0.0.1:{free_port()}"), plan(trace, cfg, "m"), cfg)
    assert len(run.records) == 3 and all(r.error and r.status is None for r in run.records)


async def test_grace_period_cancels_pending_and_records_them(fake_factory) -> None:  # type: ignore[no-untyped-def]
    trace = _trace(4, gap_s=0.0)
    url = await fake_factory(Fake(stall_ids=frozenset({_last_token(trace, 1), _last_token(trace, 3)})))
    cfg = ReplayConfig(model="m", grace_s=0.5)
    t = time.perf_counter()
    run = await run_target(Target("fake", url), plan(trace, cfg, "m"), cfg)
    assert time.perf_counter() - t < 3.0
    assert run.cancelled == 2
    stalled = [r for r in run.records if r.error]
    assert [r.request_id for r in stalled] == ["1", "3"]
    assert all((r.error or "").startswith("cancelled") for r in stalled)


async def test_request_timeout_is_an_error(fake_factory) -> None:  # type: ignore[no-untyped-def]
    url = await fake_factory(Fake(delay=2.0))
    cfg = ReplayConfig(model="m", request_timeout_s=0.2, grace_s=5)
    run = await run_target(Target("fake", url), plan(_trace(2, 0.0), cfg, "m"), cfg)
    assert all((r.error or "").startswith("timeout") for r in run.records)


def test_max_requests_and_duration_bound_the_run() -> None:
    trace = _trace(100, gap_s=0.01)
    assert len(select_requests(trace, ReplayConfig(max_requests=7))) == 7
    # duration is wall time: trace time / speedup; 0.2 s at 2x covers trace times up to 0.4 s.
    assert len(select_requests(trace, ReplayConfig(duration_s=0.2, speedup=2.0))) == 41
    assert len(select_requests(trace, ReplayConfig(duration_s=0.2, max_requests=5))) == 5
    with pytest.raises(ValueError):
        plan(trace, ReplayConfig(speedup=0), "m")


def test_plan_bodies_stream_exact_lengths_and_shared_prefixes() -> None:
    trace = _trace(2, gap_s=1.0)
    p = plan(trace, ReplayConfig(speedup=4.0), "m")
    b0, b1 = (json.loads(x.body) for x in p)
    assert p[1].at_s == 0.25
    assert b0["stream"] and b0["stream_options"] == {"include_usage": True} and b0["ignore_eos"]
    assert b0["max_tokens"] == 4 and len(b0["prompt"]) == 32
    assert b0["prompt"][:16] == b1["prompt"][:16] and b0["prompt"][16:] != b1["prompt"][16:]
    text = json.loads(plan(trace, ReplayConfig(prompt="text"), "m")[0].body)["prompt"]
    assert isinstance(text, str) and len(text.split()) == 32


def test_target_parse() -> None:
    assert Target.parse("rr=http://127.0.0.1:1/") == Target("rr", "http://127.0.0.1:1")
    assert Target.parse("http://127.0.0.1:5").name == "127.0.0.1_5"
    with pytest.raises(ValueError):
        Target.parse("rr=localhost:1")


METRICS = """# HELP vllm:prefix_cache_hits_total x
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 30.0
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 100.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 3.0
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 1.0
vllm:cache_config_info{block_size="16",cache_dtype="auto",num_gpu_blocks="101",sliding_window="None"} 1.0
"""


def test_prometheus_parsing_and_deltas() -> None:
    m = parse_prometheus(METRICS)
    assert m["vllm:prefix_cache_hits_total"] == 30 and m["vllm:request_success_total"] == 4
    assert parse_cache_config(METRICS)["num_gpu_blocks"] == "101"
    assert fleet_cache_tokens({"a": METRICS, "b": METRICS}) == 2 * 16 * 100
    d = engine_delta({"http://a": ""}, {"http://a/metrics": METRICS})
    assert d["hit_ratio"] == 0.3 and d["requests_per_replica"] == {"http://a": 4}
    assert math.isnan(engine_delta({}, {"u": ""})["hit_ratio"])


async def test_replay_against_sim_fleet_counts_cache_hits(tmp_path) -> None:  # type: ignore[no-untyped-def]
    trace = _trace(12, gap_s=0.01, out_len=3)
    async with start_fleet(FleetConfig(2, "tiny", events_port=None, replay_port=None)) as fleet:
        urls = [r.url for r in fleet.replicas]
        targets = [Target("r0", urls[0]), Target("r1", urls[1])]
        cfg = ReplayConfig(speedup=2.0, grace_s=10)  # model detected from /v1/models
        result = await replay(trace, targets, cfg, engine_urls=urls, reset_between=True)
    s = result["summary"]
    assert s["model"] == "tiny" and s["fleet_cache_tokens"] and s["requests"] == 12
    for name in ("r0", "r1"):
        t = s["targets"][name]
        assert t["ok"] == 12 and t["errors"] == 0
        # Block 0 is shared: every request after the first hits it on this single replica.
        assert t["cached_tokens"] == 11 * 16
        assert t["engine_hit_ratio"] == pytest.approx(t["hit_ratio"], abs=0.01)
        assert t["engine"]["requests_per_replica"][urls[int(name[1])]] == 12
    files = write_outputs(str(tmp_path), trace, result, plots=False)
    assert len(read_records(str(tmp_path / "r0.jsonl"))) == 12
    assert (tmp_path / "summary.json").exists() and "r1" in Path(files["markdown"]).read_text()
