"""The agent-session benchmark of docs/sessions.md: kvrouter's session-aware cache_aware against the
peers' session-feature emulations, 2 loads x 3 pause presets, in the offline simulator.

    PYTHONPATH=. python tools/session_bench.py [--closed-loop] [--jobs N] [--seed 7] [--replicas 8]
                                               [--cell LOAD/PAUSE] [--json out.json]

Same cells, trace generator and fleet as tools/agentic_baseline.py (docs/traces.md). Policies:
``cache_aware`` is the default (session-affinity on), ``cache_aware_plain`` the same pipeline with
the session-affinity weight at 0 (the baseline table's ``cache_aware``), then the peers.
``--closed-loop``: a session's turn is sent when its previous turn finished plus its tool pause
(traces/closed_loop.py), so session completion time differs between policies; without it every
request is sent at its trace time. ``--jobs``: runs (cell x policy) in that many processes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from router.scoring.policies import Policy, build_policy
from tools.agentic_baseline import LOADS, sessions_alive
from traces.agentic import PAUSE_PRESETS
from traces.generators import generate
from traces.loaders import dump_mooncake, parse_trace
from traces.model import Trace
from traces.simulate import PolicyFactory, SimConfig, build_report, run_policy, select_requests

POLICIES = (
    "cache_aware",
    "cache_aware_plain",
    "sglang_cache_aware",
    "vllm_sticky_least_loaded",
    "sglang_sticky",
    "llmd_session_affinity",
)
KVROUTER = ("cache_aware", "cache_aware_plain")  # the rest are peer emulations


def _plain(rng: random.Random, clock: Callable[[], float]) -> Policy:
    return build_policy("cache_aware", rng=rng, weights={"session-affinity": 0.0})


FACTORIES: dict[str, PolicyFactory] = {"cache_aware_plain": _plain}


def cell_trace(load: str, pause: str, seed: int) -> Trace:
    rate, sessions = LOADS[load]
    trace, _ = parse_trace(
        dump_mooncake(generate("agentic", sessions=sessions, rate=rate, pause=pause, seed=seed))
    )
    return trace


def _run(job: tuple[str, str, int, SimConfig, str, str | None]) -> tuple[str, str, dict[str, Any]]:
    load, pause, seed, cfg, name, log = job
    run = run_policy(cell_trace(load, pause, seed), cfg, name, FACTORIES.get(name))
    report = run.report()
    print(f"{load} {pause} {name} done ({run.wall_s:.0f} s)", file=sys.stderr, flush=True)
    if log is not None:  # one line per finished run, so a long benchmark keeps what it measured
        with open(log, "a") as f:
            f.write(json.dumps({"load": load, "pause": pause, "policy": name, "report": report}, default=str))
            f.write("\n")
    return load, pause, report


def _mark(v: float, others: list[float], fmt: str) -> str:
    s = fmt.format(v)
    return f"**{s}**" if others and v <= min(others) else s


def table(cells: list[dict[str, Any]]) -> str:
    """Bold: kvrouter's ``cache_aware`` at or below every peer emulation in that column."""
    out = [
        "| load | pauses | sessions alive | policy | hit | TTFT mean s | TTFT p99 s "
        "| session mean s | session p99 s | preemptions |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    cols = (
        ("ttft_mean_s", "{:.3f}"),
        ("ttft_p99_s", "{:.2f}"),
        ("session_completion_mean_s", "{:.0f}"),
        ("session_completion_p99_s", "{:.0f}"),
    )
    for c in cells:
        pols = c["report"]["policies"]
        peers = [p for n, p in pols.items() if n not in KVROUTER]
        for k, (name, p) in enumerate(pols.items()):
            head = [c["load"], c["pause"], f"{c['alive']:.0f}"] if k == 0 else ["", "", ""]
            vals = []
            for key, fmt in cols:
                v = p.get(key, float("nan"))
                if name == "cache_aware":
                    vals.append(_mark(v, [q.get(key, float("nan")) for q in peers], fmt))
                else:
                    vals.append(fmt.format(v))
            row = [*head, name, f"{p['hit_ratio']:.1%}", *vals, str(p["preemptions"])]
            out.append("| " + " | ".join(row) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--replicas", type=int, default=8)
    ap.add_argument("--closed-loop", action="store_true", help="closed-loop replay (traces/closed_loop.py)")
    ap.add_argument("--jobs", type=int, default=1, help="parallel runs (processes)")
    ap.add_argument("--policy", action="append", default=None, help="only these (repeatable)")
    ap.add_argument("--json", default=None, help="also write every report here")
    ap.add_argument("--log", default=None, help="append each run's report here as it finishes (JSONL)")
    ap.add_argument(
        "--cell", action="append", default=None, help="LOAD/PAUSE, e.g. loaded/medium (repeatable)"
    )
    args = ap.parse_args(argv)
    cfg = SimConfig(replicas=args.replicas, closed_loop=args.closed_loop)
    policies = args.policy or list(POLICIES)
    cells = [
        (load, pause)
        for load in LOADS
        for pause in PAUSE_PRESETS
        if not args.cell or f"{load}/{pause}" in args.cell
    ]
    # The longest runs first, so a parallel pool does not end on one of them.
    by_size = sorted(cells, key=lambda c: -LOADS[c[0]][1]) if args.jobs > 1 else cells
    jobs = [(load, pause, args.seed, cfg, name, args.log) for load, pause in by_size for name in policies]
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as ex:
            results = list(ex.map(_run, jobs))
    else:
        results = [_run(j) for j in jobs]
    out: list[dict[str, Any]] = []
    for load, pause in cells:
        trace = cell_trace(load, pause, args.seed)
        report = build_report(trace, cfg, select_requests(trace, cfg), [])
        report["policies"] = {
            name: rep
            for (ld, ps, rep), (_, _, _, _, name, _) in zip(results, jobs, strict=True)
            if (ld, ps) == (load, pause)
        }
        out.append({"load": load, "pause": pause, "alive": sessions_alive(trace), "report": report})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, default=str)
    print(table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
