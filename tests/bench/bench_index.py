"""make bench-index: select() latency, index memory per block, index ingest rate.

Builds an index of 1M blocks spread over 8 and over 64 replicas (chains of shared-prefix prompts,
like a fleet serving many conversations), then measures, for prompts of 1k / 8k / 32k tokens at
block size 16 with a realistic partial hit: hashing time, ``Router.select`` time (index match +
cache_aware scoring + pick) and both together, p50/p99 over many requests. Targets:
p99 select < 200 us for an 8k prompt at 64 replicas, <= 200 bytes per indexed block, ingest
>= 200k blocks/s (KV-event decode + apply is measured by bench_kv_events.py, also run here).
"""

from __future__ import annotations

import gc
import os
import random
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

from router.hashing import hash_token_blocks, model_seed
from router.index import PrefixIndex
from router.replicas.registry import ReplicaRegistry
from router.routing import Router
from router.scoring.policies import build_policy
from router.types import ReplicaSpec

BLOCK = 16
TOTAL_BLOCKS = 1_000_000
SEED = model_seed("bench-model")


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def build(n_replicas: int, rng: random.Random) -> tuple[Router, list[list[int]]]:
    index = PrefixIndex(capacity_per_replica=TOTAL_BLOCKS // n_replicas + 1024)
    reg = ReplicaRegistry(index)
    reps = [
        reg.add(ReplicaSpec(url=f"http://r{i}", name=f"r{i}", models=("bench-model",)))
        for i in range(n_replicas)
    ]
    router = Router(index, reg, build_policy("cache_aware", rng=rng), block_size=BLOCK)
    # 1M blocks: 64-block (1k-token) documents; each stored on one replica, half of them
    # extending a shared 512-block system-prompt family so prefixes overlap.
    heads = [[rng.getrandbits(64) for _ in range(512)] for _ in range(16)]
    stored = 0
    chains: list[list[int]] = []
    while stored < TOTAL_BLOCKS:
        head = heads[rng.randrange(16)][: rng.randrange(1, 512)] if rng.random() < 0.5 else []
        chain = head + [rng.getrandbits(64) for _ in range(64)]
        rep = reps[rng.randrange(n_replicas)]
        index.store(rep.id, chain)  # type: ignore[arg-type]
        stored += len(chain)
        if len(chains) < 2000:
            chains.append(chain)
    return router, chains


def measure_select(router: Router, tokens: int, rng: random.Random, n: int) -> dict[str, float]:
    """Wall time and CPU time (thread_time: excludes time the OS gave the core to another
    process, which dominates p99 on a shared 2-core box) of hashing and of select()."""
    hash_us, select_us, select_cpu_us = [], [], []
    for _ in range(n):
        toks = [rng.randrange(50_000) for _ in range(tokens)]
        t0 = time.perf_counter()
        req = router.request_info("bench-model", token_ids=toks)
        t1 = time.perf_counter()
        c1 = time.thread_time()
        router.select(req)
        c2 = time.thread_time()
        t2 = time.perf_counter()
        hash_us.append((t1 - t0) * 1e6)
        select_us.append((t2 - t1) * 1e6)
        select_cpu_us.append((c2 - c1) * 1e6)
    return {
        "hash_p50": pct(hash_us, 50),
        "hash_p99": pct(hash_us, 99),
        "select_p50": pct(select_us, 50),
        "select_p99": pct(select_us, 99),
        "select_cpu_p99": pct(select_cpu_us, 99),
    }


def measure_select_with_hits(
    router: Router, blocks: int, chains: list[list[int]], rng: random.Random, n: int
) -> dict[str, float]:
    """Precomputed hashes whose prefix is in the index: match walks far before stopping."""
    times = []
    for _ in range(n):
        base = chains[rng.randrange(len(chains))]
        hashes = (base + [rng.getrandbits(64) for _ in range(blocks)])[:blocks]
        req = router.request_info("bench-model", block_hashes=hashes, prompt_tokens=blocks * BLOCK)  # type: ignore[arg-type]
        t0 = time.perf_counter()
        router.select(req)
        times.append((time.perf_counter() - t0) * 1e6)
    return {"p50": pct(times, 50), "p99": pct(times, 99)}


def memory_per_block() -> tuple[float, int]:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    rng = random.Random(1)
    index = PrefixIndex(capacity_per_replica=TOTAL_BLOCKS)
    for i in range(8):
        index.add_replica(f"r{i}")  # type: ignore[arg-type]
    n = 0
    while n < TOTAL_BLOCKS:
        chain = hash_token_blocks([rng.randrange(50_000) for _ in range(64 * BLOCK)], BLOCK, SEED)
        index.store(f"r{n % 8}", chain)  # type: ignore[arg-type]
        n += len(chain)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (after - before) / n, n


def ingest_rate() -> float:
    index = PrefixIndex(capacity_per_replica=TOTAL_BLOCKS)
    index.add_replica("r0")  # type: ignore[arg-type]
    rng = random.Random(2)
    chains = [[rng.getrandbits(64) for _ in range(16)] for _ in range(20_000)]
    t0 = time.perf_counter()
    for c in chains:
        index.store("r0", c)  # type: ignore[arg-type]
    for c in chains:
        index.remove("r0", c)  # type: ignore[arg-type]
    return 2 * 16 * len(chains) / (time.perf_counter() - t0)


def churn_stalls(
    replicas: int = 16, capacity: int = 26_000, batches: int = 4_000
) -> tuple[float, float, int]:
    """A full fleet's steady state: every replica at ``capacity`` blocks (an H100 Llama-3-8B pool),
    each batch one replica storing a 512-block chunk and removing its oldest (vLLM's BlockStored and
    the BlockRemoved of the blocks it evicted). Returns (mean ms, worst ms, batches over 5 ms): the
    worst is a stall of the router's event loop, every request in flight waits through it (one dict
    of all replicas' blocks rebuilt at once was 30-38 ms, about every million stores)."""
    rng = random.Random(1)
    index = PrefixIndex(capacity_per_replica=capacity)
    held: list[list[list[int]]] = []
    for r in range(replicas):
        index.add_replica(f"r{r}")  # type: ignore[arg-type]
        held.append([])
    per = capacity // 512
    times: list[float] = []
    for i in range(batches + replicas * per):  # the first replicas * per fill the pools
        r = i % replicas
        chunk = [rng.getrandbits(64) for _ in range(512)]
        t0 = time.perf_counter()
        index.store(f"r{r}", chunk)  # type: ignore[arg-type]
        if len(held[r]) >= per:
            index.remove(f"r{r}", held[r].pop(0))  # type: ignore[arg-type]
        dt = time.perf_counter() - t0
        held[r].append(chunk)
        if i >= replicas * per:
            times.append(dt)
    return 1e3 * sum(times) / len(times), 1e3 * max(times), sum(t > 0.005 for t in times)


def main() -> None:
    rng = random.Random(0)
    print("kvrouter bench-index (block size 16; times in microseconds)\n")
    print(f"load average: {os.getloadavg()[0]:.2f} (wall p99 includes preemption; CPU p99 does not)\n")
    print(
        "| replicas | prompt tokens | hash p50 | hash p99 | select p50 | select p99 | select CPU p99 | total p99 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    hit_rows = []
    for n_rep in (8, 64):
        t0 = time.perf_counter()
        router, chains = build(n_rep, rng)
        build_s = time.perf_counter() - t0
        for tokens in (1024, 8192, 32768):
            n = 300 if tokens < 32768 else 100
            r = measure_select(router, tokens, rng, n)
            total = r["hash_p99"] + r["select_p99"]
            print(
                f"| {n_rep} | {tokens} | {r['hash_p50']:.0f} | {r['hash_p99']:.0f} | {r['select_p50']:.0f} "
                f"| {r['select_p99']:.0f} | {r['select_cpu_p99']:.0f} | {total:.0f} |"
            )
        h = measure_select_with_hits(router, 512, chains, rng, 300)
        hit_rows.append((n_rep, h, build_s, len(router.index)))
    print("\nselect() with a long cached prefix (8k tokens = 512 blocks, prefix from the index):")
    for n_rep, h, build_s, keys in hit_rows:
        print(
            f"  {n_rep} replicas: p50 {h['p50']:.0f} us, p99 {h['p99']:.0f} us (index {keys} keys, built in {build_s:.1f}s)"
        )
    per_block, n = memory_per_block()
    print(f"\nindex memory: {per_block:.0f} bytes per indexed block ({n} blocks, tracemalloc)")
    print(f"index ingest (store + remove, no decode): {ingest_rate() / 1e3:.0f}k blocks/s")
    mean, worst, over = churn_stalls()
    print(
        f"index under churn (16 replicas x 26,000 blocks, 4,000 batches of 512 stored + 512 removed): "
        f"mean {mean:.2f} ms, worst {worst:.1f} ms, {over} batches over 5 ms"
    )
    kv = Path(__file__).with_name("bench_kv_events.py")
    if kv.exists():
        print("\nKV-event decode + apply (bench_kv_events.py):")
        sys.stdout.flush()
        subprocess.run([sys.executable, str(kv)], check=False)


if __name__ == "__main__":
    main()
