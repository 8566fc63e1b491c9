"""Check a peer emulation against the real peer router: hit ratio and placement spread, same trace, same fleet shape.

    PYTHONPATH=. python tools/peer_fidelity.py --peers-venv .venv-peers [--targets sglang-router,vllm-router]
        [--max-requests 300] [--replicas 4] [--out reports/fidelity]

1. **Live**: ``python -m traces.compare`` replays the bundled trace slice through the real router
   binary (pip ``sglang-router`` / ``vllm-router``) against ``kvrouter sim`` replicas (text prompts,
   KV capacity set to the ``h100-llama3-8b`` profile's 420,900 tokens, 16-token blocks).
2. **Offline**: the same requests, load (speed-up 3, time scale speed-up / 1.4 as ``compare``) and
   fleet in the offline simulator, routed by the emulation (``traces/peer_policies.py``), the trace
   re-blocked to 16-token blocks so that both sides hash the same block size.
3. The table: engine-reported hit ratio, load spread (max/mean requests per replica) and the
   per-replica request shares, sorted, for each; the verdict against ``--hit-tol`` (absolute
   points) and ``--spread-tol`` (max/mean).

Differences that remain by construction (docs/offline-simulator.md, peer emulations): the real SGLang
router matches raw characters of the rendered prompt, the emulation block ids; the live fleet runs in
wall time on a shared machine, the offline one in virtual time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from traces.demo import BUNDLED_TRACE
from traces.loaders import load_trace
from traces.simulate import SimConfig, run_policy, select_requests
from traces.synth import reblock

EMULATION = {"sglang-router": "sglang_cache_aware", "vllm-router": "vllm_cache_aware"}
KV_TOKENS = 420_900  # h100-llama3-8b profile
BLOCK = 16
SPEEDUP = 3.0
LOAD = 1.4


def _shares(per_replica: dict[str, int]) -> list[float]:
    total = sum(per_replica.values()) or 1
    return sorted((v / total for v in per_replica.values()), reverse=True)


def _spread(per_replica: dict[str, int]) -> float:
    vals = list(per_replica.values())
    mean = sum(vals) / len(vals) if vals else 0
    return max(vals) / mean if mean else float("nan")


def live(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "traces.compare",
        "--out",
        str(out),
        "--targets",
        args.targets,
        "--no-install",
        "--peers-venv",
        args.peers_venv,
        "--max-requests",
        str(args.max_requests),
        "--replicas",
        str(args.replicas),
        "--kv-tokens",
        str(KV_TOKENS),
        "--block-size",
        str(BLOCK),
        "--speedup",
        str(args.speedup),
        "--load",
        str(LOAD),
        "--no-plots",
        "--trace",
        args.trace,
    ]
    subprocess.run(cmd, check=True, timeout=1800)
    with open(out / "summary.json") as f:
        summary: dict[str, Any] = json.load(f)
    return summary


def offline(args: argparse.Namespace, policy: str) -> dict[str, Any]:
    trace, _ = load_trace(args.trace)
    cfg = SimConfig(
        replicas=args.replicas,
        speedup=args.speedup,
        time_scale=args.speedup / LOAD,
        max_requests=args.max_requests,
    )
    sub = reblock(trace, BLOCK)
    run = run_policy(sub, cfg, policy, reqs=select_requests(sub, cfg))
    return run.summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--peers-venv", required=True)
    ap.add_argument("--targets", default="sglang-router")
    ap.add_argument("--max-requests", type=int, default=300)
    ap.add_argument("--trace", default=str(BUNDLED_TRACE), help="trace file (default: the bundled slice)")
    ap.add_argument("--speedup", type=float, default=SPEEDUP)
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--out", default="reports/fidelity")
    ap.add_argument(
        "--hit-tol", type=float, default=0.05, help="absolute hit-ratio tolerance (default 5 points)"
    )
    ap.add_argument("--spread-tol", type=float, default=0.25, help="max/mean tolerance (default 0.25)")
    ap.add_argument("--live-summary", default=None, help="reuse a compare summary.json instead of replaying")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.live_summary:
        with open(args.live_summary) as f:
            summary = json.load(f)
    else:
        summary = live(args, out / "live")
    rows = [
        "| router | live hit | emulation hit | live max/mean | emulation max/mean | live shares | emulation shares | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ok = True
    for target in [t for t in args.targets.split(",") if t]:
        real = summary["targets"].get(target)
        if real is None:
            rows.append(f"| {target} | not run (see {out / 'live'}/report.md notes) | | | | | | |")
            continue
        emu = offline(args, EMULATION[target])
        # Peers send no x-kvrouter-replica header: their placement is the engines' request counters.
        rp = real["load_spread"].get("per_replica") or real["engine"]["requests_per_replica"]
        real_hit = real.get("engine_hit_ratio", real["hit_ratio"])
        ep = emu["load_spread"].get("per_replica", {})
        dh = abs(real_hit - emu["hit_ratio"])
        ds = abs(_spread(rp) - _spread(ep))
        good = dh <= args.hit_tol and ds <= args.spread_tol
        ok &= good
        rows.append(
            f"| {target} | {real_hit:.1%} | {emu['hit_ratio']:.1%} | {_spread(rp):.2f} | {_spread(ep):.2f} | "
            f"{' '.join(f'{s:.2f}' for s in _shares(rp))} | {' '.join(f'{s:.2f}' for s in _shares(ep))} | "
            f"{'within' if good else 'OUTSIDE'} (hit {dh * 100:.1f} pts, spread {ds:.2f}) |"
        )
    print("\n".join(rows))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
