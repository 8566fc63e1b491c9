"""The agentic baseline of docs/traces.md: 2 loads x 3 pause presets, cache_aware beside the peers'
session-feature emulations, in the offline simulator. Prints the markdown table.

    PYTHONPATH=. python tools/agentic_baseline.py [--seed 7] [--replicas 8] [--json out.json]

Each cell generates ``kvrouter trace generate agentic --sessions N --rate R --pause P --seed S``
(the same prompts for every pause preset of a load) and runs ``kvrouter simulate`` with every
policy on a fresh fleet. Load = root-session arrival rate; a session brings ~38 requests.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from traces.agentic import PAUSE_PRESETS
from traces.generators import generate
from traces.loaders import dump_mooncake, parse_trace
from traces.model import Trace
from traces.simulate import SimConfig, simulate

LOADS: dict[str, tuple[float, int]] = {"light": (0.1, 300), "loaded": (0.3, 900)}  # sessions/s, sessions
POLICIES = (
    "round_robin",
    "cache_aware",
    "sglang_cache_aware",
    "vllm_sticky_least_loaded",
    "sglang_sticky",
    "llmd_session_affinity",
)


def sessions_alive(trace: Trace) -> float:
    """Mean number of sessions between their first and last request, over the trace's span."""
    spans: dict[str | None, list[float]] = {}
    for r in trace.requests:
        s = spans.setdefault(r.session_id, [r.timestamp_s, r.timestamp_s])
        s[1] = max(s[1], r.timestamp_s)
    return sum(b - a for a, b in spans.values()) / max(trace.duration_s, 1e-9)


def table(cells: list[dict[str, Any]]) -> str:
    out = [
        "| load | pauses | requests (span) | sessions alive (mean) | policy | hit | TTFT mean s | TTFT p99 s | preemptions |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        pols = c["report"]["policies"]
        best = min(p["ttft_mean_s"] for n, p in pols.items() if n != "round_robin")
        for k, (name, p) in enumerate(pols.items()):
            head = (
                [
                    c["load"],
                    c["pause"],
                    f"{c['report']['requests']:,} ({c['span_s'] / 60:.0f} min)",
                    f"{c['alive']:.0f}",
                ]
                if k == 0
                else ["", "", "", ""]
            )
            mean = f"{p['ttft_mean_s']:.3f}"
            if p["ttft_mean_s"] == best:
                mean = f"**{mean}**"
            out.append(
                "| "
                + " | ".join(
                    [
                        *head,
                        name,
                        f"{p['hit_ratio']:.1%}",
                        mean,
                        f"{p['ttft_p99_s']:.2f}",
                        str(p["preemptions"]),
                    ]
                )
                + " |"
            )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--replicas", type=int, default=8)
    ap.add_argument("--json", default=None, help="also write every report here")
    args = ap.parse_args(argv)
    cells: list[dict[str, Any]] = []
    for load, (rate, sessions) in LOADS.items():
        for pause in PAUSE_PRESETS:
            # Through Mooncake JSONL (ms timestamps), exactly as the CLI commands in the docs see it.
            trace, _ = parse_trace(
                dump_mooncake(generate("agentic", sessions=sessions, rate=rate, pause=pause, seed=args.seed))
            )
            report = simulate(trace, SimConfig(replicas=args.replicas), POLICIES)
            cells.append(
                {
                    "load": load,
                    "pause": pause,
                    "span_s": trace.duration_s,
                    "alive": sessions_alive(trace),
                    "report": report,
                }
            )
            print(f"{load} {pause} done", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(cells, f, default=str)
    print(table(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
