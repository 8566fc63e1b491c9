"""One A/B leg of tools/lmcache_ab.sh: empty both tiers, play a trace through a router, report hits.

    PYTHONPATH=. python tools/lmcache_ab_client.py --trace T --router URL --replica URL... --lmcache URL...

Open loop at trace time / --speedup, non-streaming /v1/completions with token prompts (traces.synth), so
``usage.prompt_tokens_details.cached_tokens`` (vLLM: local + external hits) is read per request. Before the
run: every replica's GPU cache is flushed with unrelated prompts (/reset_prefix_cache takes an LMCacheMPConnector
replica down), then POST /cache/clear empties every LMCache MP server. Prints one JSON
object: hit ratio over all prompt tokens, and the replicas' own counters (local vs LMCache hits) over the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import aiohttp

from router.replicas.engine_metrics import samples
from traces.loaders import load_trace
from traces.synth import PromptSynth

COUNTERS = (
    "vllm:prefix_cache_hits_total",
    "vllm:external_prefix_cache_hits_total",
    "vllm:prompt_tokens_total",
)


async def counters(session: aiohttp.ClientSession, urls: list[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for u in urls:
        async with session.get(u + "/metrics") as r:
            text = await r.text()
        got = dict.fromkeys(COUNTERS, 0.0)
        for name, _labels, value in samples(text):
            if name in got:
                got[name] += value
        out[u] = got
    return out


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--trace", required=True)
    p.add_argument("--router", required=True)
    p.add_argument("--replica", action="append", required=True)
    p.add_argument("--lmcache", action="append", default=[])
    p.add_argument("--speedup", type=float, default=1.0)
    p.add_argument("--max-tokens-cap", type=int, default=32)
    p.add_argument("--vocab", type=int, default=4096)  # the tiny model's
    p.add_argument("--flush-tokens", type=int, default=4000)  # > a replica's GPU cache
    a = p.parse_args()
    trace, _report = load_trace(a.trace)
    synth = PromptSynth(block_tokens=max(trace.block_tokens, 1), vocab_size=a.vocab)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:
        nonce = int(time.time())
        for u in a.replica:
            for i in range(a.flush_tokens // 1000):
                flush = [(nonce * 7919 + i * 104729 + j * 31) % (a.vocab - 300) + 300 for j in range(1000)]
                async with s.post(
                    u + "/v1/completions", json={"model": "tiny", "prompt": flush, "max_tokens": 1}
                ) as r:
                    assert r.status == 200, await r.text()
        await asyncio.sleep(1.0)
        for u in a.lmcache:
            async with s.post(u + "/cache/clear") as r:
                assert r.status == 200, await r.text()
        before = await counters(s, a.replica)
        results: list[dict[str, Any]] = []
        t0 = time.monotonic()

        async def one(req: Any) -> None:
            await asyncio.sleep(max(0.0, req.timestamp_s / a.speedup - (time.monotonic() - t0)))
            body = {
                "model": "tiny",
                "prompt": synth.token_ids(req),
                "max_tokens": max(1, min(req.output_length, a.max_tokens_cap)),
                "ignore_eos": True,
                "temperature": 0.0,
            }
            sent = time.monotonic()
            async with s.post(a.router + "/v1/completions", json=body) as r:
                data = await r.json() if r.status == 200 else {}
                usage = data.get("usage") or {}
                results.append(
                    {
                        "status": r.status,
                        "replica": r.headers.get("x-kvrouter-replica"),
                        "prompt": usage.get("prompt_tokens", 0),
                        "cached": (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0,
                        "e2e": time.monotonic() - sent,
                    }
                )

        await asyncio.gather(*(one(r) for r in trace.requests))
        after = await counters(s, a.replica)
    ok = [r for r in results if r["status"] == 200]
    prompt = sum(r["prompt"] for r in ok)
    delta = {k: sum(after[u][k] - before[u][k] for u in a.replica) for k in COUNTERS}
    per_replica = {u: sum(1 for r in ok if (r["replica"] or "").rstrip("/") == u) for u in a.replica}
    print(
        json.dumps(
            {
                "requests": len(results),
                "ok": len(ok),
                "hit_ratio": sum(r["cached"] for r in ok) / prompt if prompt else None,
                "gpu_hit_tokens": delta["vllm:prefix_cache_hits_total"],
                "lmcache_hit_tokens": delta["vllm:external_prefix_cache_hits_total"],
                "prompt_tokens": delta["vllm:prompt_tokens_total"],
                "e2e_mean_s": sum(r["e2e"] for r in ok) / len(ok) if ok else None,
                "requests_per_replica": per_replica,
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
