"""``make eval`` / ``make tune``: cache_aware against round robin and the peer emulations over the scenario suite.

    PYTHONPATH=. python tools/eval_suite.py eval [--jobs 2] [--seed 0] [--scenarios chat,rag] [--loads light]
    PYTHONPATH=. python tools/eval_suite.py tune [--jobs 2] ...

``eval`` prints one markdown table (per scenario x load: hit ratio, mean and p99 TTFT, goodput
under the 2 s TTFT / 0.1 s TPOT SLO, every policy) and cache_aware's TTFT over the best peer
emulation's per cell, with the geometric means. ``tune`` runs the peers once, then cache_aware
with each candidate setting of ``CANDIDATES`` (bounded: one move at a time from the defaults),
and prints the candidates ranked by the geometric mean of their mean and p99 ratios, those whose
worst cell is within ``BOUND`` of the best peer first (the suite's bar: no cell lost by more than
5 %), and the best one's per-cell ratios. The suite, its loads and its calibration: traces/scenarios.py,
docs/scenarios.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from typing import Any

from traces.scenarios import (
    BASELINE,
    KVROUTER,
    LOADS,
    PEERS,
    SCENARIOS,
    CellResult,
    format_table,
    geomean,
    ratio_table,
    run_suite,
)

# name -> (weight overrides, load_factor or None). One move at a time from the defaults.
CANDIDATES: dict[str, tuple[dict[str, float], float | None]] = {
    "defaults": ({}, None),
    "estimated-ttft=1": ({"estimated-ttft": 1.0}, None),
    "estimated-ttft=6": ({"estimated-ttft": 6.0}, None),
    "prefix-cache=0": ({"prefix-cache": 0.0}, None),
    "prefix-cache=3": ({"prefix-cache": 3.0}, None),
    "queue-depth=0.25": ({"queue-depth": 0.25}, None),
    "queue-depth=3": ({"queue-depth": 3.0}, None),
    "cache-churn=0": ({"cache-churn": 0.0}, None),
    "load_factor=2": ({}, 2.0),
    "load_factor=8": ({}, 8.0),
}

BOUND = 1.05  # a candidate must keep every cell's mean and p99 within 5 % of the best peer's


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("mode", choices=("eval", "tune"))
    ap.add_argument("--jobs", type=int, default=2, help="processes (cells run in parallel)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset")
    ap.add_argument("--loads", default=",".join(LOADS), help="comma-separated subset")
    ap.add_argument("--json", default=None, help="also write the results here")
    return ap.parse_args(argv)


def _dump(path: str | None, obj: Any) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(obj, f, indent=1, default=str)


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    scenarios = [s for s in a.scenarios.split(",") if s]
    loads = [x for x in a.loads.split(",") if x]
    for s in scenarios:
        if s not in SCENARIOS:
            _log(f"unknown scenario {s!r}; known: {', '.join(SCENARIOS)}")
            return 2
    for x in loads:
        if x not in LOADS:
            _log(f"unknown load {x!r}; known: {', '.join(LOADS)}")
            return 2
    t0 = time.monotonic()
    common: dict[str, Any] = dict(scenarios=scenarios, loads=loads, seed=a.seed, jobs=a.jobs, progress=_log)
    if a.mode == "eval":
        policies = [KVROUTER, BASELINE, *PEERS]
        results = run_suite(policies, **common)
        print(format_table(results, policies))
        _dump(a.json, [dataclasses.asdict(r) for r in results])
        _log(f"eval done in {time.monotonic() - t0:.0f} s")
        return 0
    peers = run_suite(list(PEERS), **common)
    ranked: list[tuple[bool, float, float, str, str, list[CellResult]]] = []
    for name, (weights, lf) in CANDIDATES.items():
        mine = run_suite([KVROUTER], weights=weights, load_factor=lf, **common)
        for m, p in zip(mine, peers, strict=True):
            m.policies.update(p.policies)
        ratios = [r.ratios() for r in mine]
        score = geomean([x for pair in ratios for x in pair])
        worst, cell = max((max(pair), f"{r.scenario} {r.load}") for r, pair in zip(mine, ratios, strict=True))
        ranked.append((worst > BOUND, score if math.isfinite(score) else math.inf, worst, cell, name, mine))
        _log(f"candidate {name}: geomean(mean, p99 ratios) {score:.3f}, worst cell {cell} {worst:.2f}")
    ranked.sort(key=lambda x: x[:2])
    print("| candidate | geomean of mean and p99 TTFT ratios to the best peer | worst cell (ratio) |")
    print("|---|---|---|")
    for over, score, worst, cell, name, _ in ranked:
        print(f"| {name} | {score:.3f} | {cell} ({worst:.2f}){' > bound' if over else ''} |")
    best = ranked[0]
    print(f"\nbest candidate: {best[4]}\n")
    print(ratio_table(best[5]))
    _dump(
        a.json,
        {name: {"geomean": score, "worst": worst, "cell": cell} for _, score, worst, cell, name, _ in ranked},
    )
    _log(f"tune done in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
