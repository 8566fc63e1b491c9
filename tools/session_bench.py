"""The agent-session benchmark of docs/sessions.md: kvrouter's session-aware cache_aware against the
peers' session-feature emulations, 2 loads x 3 pause presets, in the offline simulator.

    PYTHONPATH=. python tools/session_bench.py [--seed 7] [--replicas 8] [--json out.json]

Same cells, trace generator and fleet as tools/agentic_baseline.py (docs/traces.md). Policies:
``cache_aware`` is the default (session-affinity on), ``cache_aware_plain`` the same pipeline with
the session-affinity weight at 0 (the baseline table's ``cache_aware``), then the peers.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from typing import Any

from router.scoring.policies import Policy, build_policy
from tools.agentic_baseline import LOADS, sessions_alive
from traces.agentic import PAUSE_PRESETS
from traces.generators import generate
from traces.loaders import dump_mooncake, parse_trace
from traces.simulate import PolicyFactory, SimConfig, simulate

POLICIES = (
    "cache_aware",
    "cache_aware_plain",
    "sglang_cache_aware",
    "vllm_sticky_least_loaded",
    "sglang_sticky",
    "llmd_session_affinity",
)


def _plain(rng: random.Random, clock: Callable[[], float]) -> Policy:
    return build_policy("cache_aware", rng=rng, weights={"session-affinity": 0.0})


FACTORIES: dict[str, PolicyFactory] = {"cache_aware_plain": _plain}


def table(cells: list[dict[str, Any]]) -> str:
    out = [
        "| load | pauses | sessions alive | policy | hit | TTFT mean s | TTFT p99 s | preemptions |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        pols = c["report"]["policies"]
        peers = {n: p for n, p in pols.items() if n != "cache_aware"}
        for k, (name, p) in enumerate(pols.items()):
            head = [c["load"], c["pause"], f"{c['alive']:.0f}"] if k == 0 else ["", "", ""]
            mean = f"{p['ttft_mean_s']:.3f}"
            p99 = f"{p['ttft_p99_s']:.2f}"
            if name == "cache_aware":
                if p["ttft_mean_s"] <= min(q["ttft_mean_s"] for q in peers.values()):
                    mean = f"**{mean}**"
                if p["ttft_p99_s"] <= min(q["ttft_p99_s"] for q in peers.values()):
                    p99 = f"**{p99}**"
            row = [*head, name, f"{p['hit_ratio']:.1%}", mean, p99, str(p["preemptions"])]
            out.append("| " + " | ".join(row) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--replicas", type=int, default=8)
    ap.add_argument("--json", default=None, help="also write every report here")
    ap.add_argument(
        "--cell", action="append", default=None, help="LOAD/PAUSE, e.g. loaded/medium (repeatable)"
    )
    args = ap.parse_args(argv)
    cells: list[dict[str, Any]] = []
    for load, (rate, sessions) in LOADS.items():
        for pause in PAUSE_PRESETS:
            if args.cell and f"{load}/{pause}" not in args.cell:
                continue
            trace, _ = parse_trace(
                dump_mooncake(generate("agentic", sessions=sessions, rate=rate, pause=pause, seed=args.seed))
            )
            report = simulate(trace, SimConfig(replicas=args.replicas), POLICIES, FACTORIES)
            cells.append({"load": load, "pause": pause, "alive": sessions_alive(trace), "report": report})
            print(f"{load} {pause} done", file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(cells, f, default=str)
    print(table(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
