"""Offline simulator benchmark and the cache_aware weight sweep (``make bench-sim``).

Default: requests/s of wall time for 16 and 256 simulated H100 replicas on the full Mooncake
conversation trace (12,031 requests; per-replica load held equal to 8 replicas at speedup 1, so
16 replicas run at speedup 2 and 256 at speedup 32), for round robin and cache_aware, plus the
full-trace time per policy. Targets: < 60 s per policy at 16 replicas, >= 5,000 req/s.

``--sweep``: the measurement behind DEFAULT_WEIGHTS (docs/policy-tuning.md). Each variant of the
cache_aware weights / load_factor runs on every scenario (trace x load); the table reports hit
ratio as a fraction of the oracle and mean / p99 TTFT relative to round robin, per scenario, and
the geometric mean over scenarios. ``--jobs`` runs scenarios in parallel processes.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from traces.loaders import load_trace
from traces.model import Trace
from traces.simulate import SimConfig, oracle, run_policy

# The bundled copies (traces/data/README.md); KVROUTER_SHARED_TRACES points elsewhere.
SHARED = os.environ.get(
    "KVROUTER_SHARED_TRACES", os.path.join(os.path.dirname(__file__), "..", "..", "traces", "data")
)
CONV = os.path.join(SHARED, "mooncake", "conversation_trace.jsonl")
SYNTH = os.path.join(SHARED, "mooncake", "synthetic_trace.jsonl")

_TRACES: dict[str, Trace] = {}


def _trace(path: str) -> Trace:
    if path not in _TRACES:
        if path == "gen:shared-prompt":
            from traces.generators import generate

            _TRACES[path] = generate(
                "shared-prompt", seed=1, requests=4000, rate=40.0, users=2000, system_prompts=1,
                system_tokens=6144, user_tokens_mean=600.0, output_tokens_mean=300.0, block_tokens=512,
            )  # fmt: skip
        else:
            _TRACES[path], _ = load_trace(path)
    return _TRACES[path]


def bench(policies: list[str]) -> None:
    trace = _trace(CONV)
    print(f"trace {trace.name}: {len(trace):,} requests (full), profile h100-llama3-8b")
    print(
        f"{'replicas':>8} {'speedup':>7} {'policy':<20} {'wall s':>7} {'req/s wall':>10} {'ttft mean':>9} {'hit':>6}"
    )
    for replicas, speedup in ((16, 2.0), (256, 32.0)):
        for name in policies:
            cfg = SimConfig(replicas=replicas, speedup=speedup)
            run = run_policy(trace, cfg, name)
            rps = len(run.records) / run.wall_s
            s = run.summary
            print(
                f"{replicas:>8} {speedup:>7g} {name:<20} {run.wall_s:>7.2f} {rps:>10,.0f} "
                f"{s['ttft_mean_s']:>9.3f} {s['hit_ratio']:>6.1%}",
                flush=True,
            )


# ---- sweep --------------------------------------------------------------------------------------

# (label, trace path, replicas, speedup). The conversation trace at three loads (round robin's p99
# TTFT is above 2 s at all of them: long prompts alone take seconds), the synthetic trace at two.
SCENARIOS: list[tuple[str, str, int, float]] = [
    ("conv x1", CONV, 8, 1.0),
    ("conv x2", CONV, 8, 2.0),
    ("conv x3", CONV, 8, 3.0),
    ("synth x1", SYNTH, 8, 1.0),
    ("synth x2", SYNTH, 8, 2.0),
]
# A hot-spot check for the second round: one long system prompt shared by every request, so pure
# affinity would send everything to one replica; what keeps it spread is the load terms and guard.
HOTSPOT = ("hotspot", "gen:shared-prompt", 8, 1.0)

BASE: dict[str, float] = {
    "estimated-ttft": 3.0,
    "prefix-cache": 1.0,
    "queue-depth": 1.0,
    "kv-usage": 0.5,
    "tail-latency": 0.5,
}
OFF = 1e9  # load_factor that never filters


def variants() -> list[tuple[str, dict[str, float], float | None]]:
    """One-at-a-time moves from the first-guess defaults, then the combinations they suggest."""
    out: list[tuple[str, dict[str, float], float | None]] = [("base (first guess)", dict(BASE), 1.5)]
    for lf in (1.25, 2.0, 3.0, OFF):
        out.append((f"load_factor={'off' if lf == OFF else lf}", dict(BASE), lf))
    moves = {
        "estimated-ttft": (0.0, 1.0, 6.0),
        "prefix-cache": (0.0, 3.0),
        "queue-depth": (0.0, 0.25, 3.0),
        "kv-usage": (0.0, 2.0),
        "tail-latency": (0.0, 2.0),
    }
    for key, values in moves.items():
        for v in values:
            out.append((f"{key}={v:g}", {**BASE, key: v}, 1.5))
    return out


def combos() -> list[tuple[str, dict[str, float], float | None]]:
    """Second round, chosen after reading the one-at-a-time table (docs/policy-tuning.md): the
    bounded-load factor is the one lever that matters; the weights are refined around it."""
    out: list[tuple[str, dict[str, float], float | None]] = [("base (first guess)", dict(BASE), 1.5)]
    for lf in (3.0, 4.0, OFF):
        out.append((f"base lf={'off' if lf == OFF else lf}", dict(BASE), lf))
    t0 = {**BASE, "tail-latency": 0.0}
    for lf in (3.0, OFF):
        out.append((f"tail0 lf={'off' if lf == OFF else lf}", dict(t0), lf))
    for lf in (3.0, OFF):
        out.append((f"prefix2 tail0 lf={'off' if lf == OFF else lf}", {**t0, "prefix-cache": 2.0}, lf))
    out.append(("prefix2 q.5 tail0 lf=3", {**t0, "prefix-cache": 2.0, "queue-depth": 0.5}, 3.0))
    out.append(("ttft4 prefix2 tail0 lf=3", {**t0, "prefix-cache": 2.0, "estimated-ttft": 4.0}, 3.0))
    return out


def _run_scenario(
    args: tuple[str, str, int, float, list[tuple[str, dict[str, float], float | None]]],
) -> dict[str, Any]:
    label, path, replicas, speedup, vs = args
    trace = _trace(path)
    cfg = SimConfig(replicas=replicas, speedup=speedup)
    res: dict[str, Any] = {"oracle": oracle(trace, cfg)["token_hit_lru"], "runs": {}}
    for name in ("round_robin", "sglang_cache_aware", "vllm_consistent_hash", "llmd_default"):
        res["runs"][name] = run_policy(trace, cfg, name).summary
    for vname, weights, lf in vs:
        c = SimConfig(replicas=replicas, speedup=speedup, weights=weights, load_factor=lf)
        res["runs"][vname] = run_policy(trace, c, "cache_aware").summary
    return {"label": label, **res}


def sweep(vs: list[tuple[str, dict[str, float], float | None]], jobs: int, hotspot: bool = False) -> None:
    t0 = time.perf_counter()
    scenarios = [*SCENARIOS, HOTSPOT] if hotspot else SCENARIOS
    tasks = [(label, path, n, sp, vs) for label, path, n, sp in scenarios]
    with ProcessPoolExecutor(max_workers=jobs) as ex:
        results = list(ex.map(_run_scenario, tasks))
    names = ["round_robin", "sglang_cache_aware", "vllm_consistent_hash", "llmd_default", *[v[0] for v in vs]]
    print("cells: hit/oracle  mean TTFT/RR  p99 TTFT/RR  (lower TTFT ratios are better)")
    print(
        "tpot p99 (s) per scenario, for hot-spotting: "
        + ", ".join(
            f"{r['label']}: " + " ".join(f"{n}={r['runs'][n]['tpot_p99_s']:.3f}" for n in r["runs"])
            for r in results
        )
    )
    head = f"{'variant':<34}" + "".join(f" {r['label']:>20}" for r in results) + f" {'geomean':>20}"
    print(head)
    for r in results:
        rr = r["runs"]["round_robin"]
        print(
            f"  {r['label']}: oracle {r['oracle']:.1%}; round robin hit {rr['hit_ratio']:.1%} "
            f"mean {rr['ttft_mean_s']:.3f}s p99 {rr['ttft_p99_s']:.2f}s"
        )
    for n in names:
        cells = []
        logs = [0.0, 0.0, 0.0]
        for r in results:
            s = r["runs"][n]
            rr = r["runs"]["round_robin"]
            h = s["hit_ratio"] / r["oracle"]
            m = s["ttft_mean_s"] / rr["ttft_mean_s"]
            p = s["ttft_p99_s"] / rr["ttft_p99_s"]
            cells.append(f"{h:5.0%} {m:5.2f} {p:5.2f}")
            for i, v in enumerate((h, m, p)):
                logs[i] += math.log(max(v, 1e-9))
        g = [math.exp(x / len(results)) for x in logs]
        print(
            f"{n:<34}" + "".join(f" {c:>20}" for c in cells) + f" {g[0]:5.0%} {g[1]:5.2f} {g[2]:5.2f}",
            flush=True,
        )
    print(f"sweep wall time {time.perf_counter() - t0:.0f} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--sweep",
        choices=["oat", "combos", "defaults"],
        default=None,
        help="run a weight sweep instead (defaults: the shipped defaults only, a regression check)",
    )
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--policy", action="append", default=None)
    args = ap.parse_args()
    if not os.path.exists(CONV):
        print(f"bench_sim: {CONV} not found (set KVROUTER_SHARED_TRACES)", file=sys.stderr)
        return 2
    if args.sweep == "oat":
        sweep(variants(), args.jobs)
    elif args.sweep == "combos":
        sweep(combos(), args.jobs, hotspot=True)
    elif args.sweep == "defaults":
        sweep([("defaults", {}, None)], args.jobs, hotspot=True)
    else:
        bench(args.policy or ["round_robin", "cache_aware"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
