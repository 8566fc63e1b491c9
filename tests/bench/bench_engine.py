"""Requests per second of wall time for one engine in virtual time (not collected by pytest).

A Mooncake-shaped synthetic workload on the h100-llama3-8b profile with 512-token blocks (the
trace's hash unit), driven like the offline simulator drives a replica: ``run_until(arrival)``
then ``add_request``. Prompts share a head block and come in multi-turn chains so that the
prefix cache, eviction and chunked prefill are all exercised.

    .venv/bin/python tests/bench/bench_engine.py [num_requests] [rate_per_s]
"""

from __future__ import annotations

import math
import random
import sys
import time

from engines.sim.model.engine import EngineModel
from engines.sim.model.profiles import H100_LLAMA3_8B
from engines.sim.model.structs import EngineConfig, SimRequest


def workload(n: int, rate: float, seed: int = 0) -> list[SimRequest]:
    rng = random.Random(seed)
    t = 0.0
    out: list[SimRequest] = []
    sessions: list[list[int]] = []
    next_id = 1
    for i in range(n):
        t += rng.expovariate(rate)
        if sessions and rng.random() < 0.4:
            base = rng.choice(sessions)  # next turn: previous prompt + new blocks
        else:
            base = [0]  # the shared 512-token head
            sessions.append(base)
        extra = max(1, int(rng.lognormvariate(2.0, 1.0)))
        blocks = base + list(range(next_id, next_id + extra))
        next_id += extra
        blocks = blocks[:160]
        sessions[sessions.index(base)] = blocks
        prompt_len = len(blocks) * 512 - rng.randrange(0, 512)
        out.append(
            SimRequest(
                f"r{i}",
                max_tokens=max(1, int(rng.lognormvariate(5.5, 0.7))),
                prompt_len=prompt_len,
                block_hashes=blocks[: prompt_len // 512],
                arrival=t,
            )
        )
    return out


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    rate = float(sys.argv[2]) if len(sys.argv) > 2 else 0.5
    reqs = workload(n, rate)
    cfg = EngineConfig.from_profile(H100_LLAMA3_8B, block_size=512, emit_events=False)
    e = EngineModel(cfg)
    t0 = time.perf_counter()
    done = 0
    steps = 0
    for r in reqs:
        adv = e.run_until(r.arrival)
        done += len(adv.finished)
        steps += adv.steps
        e.add_request(r)
    adv = e.run_until(math.inf)
    done += len(adv.finished)
    steps += adv.steps
    wall = time.perf_counter() - t0
    snap = e.snapshot()
    print(
        f"{n} requests ({done} finished), {steps} engine steps, virtual {e.now:.0f} s, wall {wall:.2f} s: "
        f"{n / wall:,.0f} requests/s, {steps / wall:,.0f} steps/s; "
        f"prefix hit {snap.prefix_cache_hits / max(1, snap.prefix_cache_queries):.1%}, "
        f"preemptions {snap.num_preemptions}"
    )


if __name__ == "__main__":
    main()
