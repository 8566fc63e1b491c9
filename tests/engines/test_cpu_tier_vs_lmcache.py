"""The simulator's CPU tier against the real LMCache tier on the same sequence: the golden capture
(tests/router/golden/vllm-0.32-lmcache-0.5.6-kv-events.json: vLLM 0.32 CPU, 96 blocks of 32,
LMCache 0.5.6 MP, chunks of 256) replayed on EngineModel gives the same cached tokens per request."""

from __future__ import annotations

import json
from pathlib import Path

from engines.sim.model.engine import EngineModel
from engines.sim.model.structs import EngineConfig, SimRequest
from router.kv.wire import BlockStored

GOLDEN = Path(__file__).parents[1] / "router" / "golden" / "vllm-0.32-lmcache-0.5.6-kv-events.json"


def test_sim_cpu_tier_hits_equal_the_real_lmcache_tier() -> None:
    data = json.loads(GOLDEN.read_text())
    bs, chunk = data["vllm_block_size"], data["lmcache_chunk_size"]
    cfg = EngineConfig(
        num_gpu_blocks=data["vllm_cache_blocks"],
        block_size=bs,
        max_num_batched_tokens=2048,
        cpu_tier_tokens=1 << 22,
        cpu_chunk_tokens=chunk,
        emit_cpu_events=True,
    )
    e = EngineModel(cfg)
    got: list[int] = []
    cpu_chunks = 0
    t = 0.0
    for i, r in enumerate(data["requests"]):
        n = r["prompt_tokens"]
        salt = 1 if r["what"].startswith("prompt A") else 100 + i  # A twice, each flood its own prefix
        e.add_request(
            SimRequest(
                f"q{i}",
                max_tokens=1,
                prompt_len=n,
                block_hashes=[salt * 1_000_003 + j for j in range(n // bs)],
                arrival=t,
            ),
            t,
        )
        cached = None
        while e.has_work():
            o = e.step(max(t, e.next_event_time() or t))
            t = o.end
            cpu_chunks += sum(1 for ev in o.events if isinstance(ev, BlockStored) and ev.medium == "CPU")
            if f"q{i}" in o.cached_tokens:
                c = o.cached_tokens[f"q{i}"]
                cached = c.local + c.external
        got.append(cached or 0)
    want = [r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in data["requests"]]
    assert got == want  # [0, 0, 0, 0, 0, 512]: A comes back from the CPU tier as 2 whole chunks
    assert cpu_chunks == 2 + 3 * (len(want) - 2)  # whole chunks only: 600 -> 2, 1000 -> 3
