"""``make demo``: round robin vs cache-aware kvrouter in front of a simulated H100 fleet, on a real trace slice.

    python -m traces.demo --out reports/demo [--replicas 4] [--max-requests 750] [--speedup 6] ...

What it does, every process on loopback and stopped at the end (also on Ctrl-C or failure):

1. ``kvrouter sim``: N replicas of the ``h100-llama3-8b`` profile, ``--time-scale`` times faster
   than real time so the trace fits in about a minute per policy;
2. one ``kvrouter serve`` per policy (round_robin, cache_aware), both up at once on their own ports;
3. the bundled Mooncake conversation slice replayed open loop against each router in turn, with
   ``POST /reset_prefix_cache`` on every replica in between so each policy starts cold;
4. the comparison table on stdout, the report (markdown, PNGs, JSON) and records in ``--out``.

Why these defaults: the slice reuses prefixes across long gaps (docs/traces.md), so a fleet
needs roughly 5k-10k blocks of 512 tokens in total before caching shows. Each replica gets
1,000,000 tokens of KV (62,500 blocks of 16), 4M tokens for 4 replicas = 7,812 trace blocks, where one LRU cache
of that size would hit ~16% of prompt tokens on the slice (the real profile's 420,900 tokens per
replica, 3.3k trace blocks in all, would leave under 10%). ``--speedup`` / ``--time-scale`` is the
load relative to the trace on real H100s; the default ``--load 1.4`` (time scale 5 / 1.4 = 3.6)
loads the fleet enough that prefill queueing, and so what routing does to it, shows, without
overload (at 2x the slow tail outlives any grace period; at 1x the differences drown in CPU
noise), and ``--speedup 5`` makes 750 requests take ~50 s per policy. The machine's CPU adds
to the load: every token is an SSE event through the sim, the router and the client, all Python,
so on a small shared machine the simulated engines run late (the report's "sim step lag") and
queues are longer than real H100s would have (docs/results.md).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from .fleetproc import ProcGroup, start_kvrouter, start_sim

BUNDLED_TRACE = Path(__file__).resolve().parent / "data" / "mooncake_conv_slice.jsonl"
DEMO_MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def fleet_arguments(p: argparse.ArgumentParser, *, speedup: float, max_requests: int) -> None:
    """Flags the demo and the comparison share (fleet shape, trace, load)."""
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--trace", default=str(BUNDLED_TRACE), help="trace file (default: the bundled slice)")
    p.add_argument("--replicas", type=int, default=4, help="simulated replicas (default 4)")
    p.add_argument("--profile", default="h100-llama3-8b", help="sim engine profile")
    p.add_argument(
        "--kv-tokens",
        type=int,
        default=1_000_000,
        help="KV capacity per replica in tokens (default 1,000,000; see the module doc)",
    )
    p.add_argument("--block-size", type=int, default=16, help="engine KV block size (default 16, vLLM's)")
    p.add_argument("--speedup", type=float, default=speedup, help=f"trace speed-up (default {speedup:g})")
    p.add_argument(
        "--load",
        type=float,
        default=1.4,
        help="offered load relative to the trace on real H100s (default 1.4): time scale = speedup / load",
    )
    p.add_argument(
        "--time-scale",
        type=float,
        default=None,
        help="sim speed-up against real H100 time (overrides --load)",
    )
    p.add_argument("--max-requests", type=int, default=max_requests, help=f"default {max_requests}")
    p.add_argument("--duration", type=float, default=None, help="stop sending after S seconds per target")
    p.add_argument(
        "--grace", type=float, default=20.0, help="seconds pending requests may finish after the last send"
    )
    p.add_argument("--prompt", choices=["tokens", "text"], default="tokens", help="token-id or text prompts")
    p.add_argument("--slo-ttft", type=float, default=2.0)
    p.add_argument("--slo-tpot", type=float, default=0.1)
    p.add_argument("--no-plots", action="store_true")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # same path as Ctrl-C: unwind, stop every process in `finally`


def effective_time_scale(args: argparse.Namespace) -> float:
    return float(args.time_scale) if args.time_scale is not None else float(args.speedup) / float(args.load)


def start_fleet(group: ProcGroup, args: argparse.Namespace, sim_extra: Sequence[str] = ()) -> list[str]:
    time_scale = effective_time_scale(args)
    blocks = args.kv_tokens // args.block_size + 1  # +1: vLLM's reserved null block
    log(
        f"starting {args.replicas} simulated {args.profile} replicas (time scale {time_scale:.3g}x, "
        f"{args.kv_tokens:,} KV tokens each) ..."
    )
    _, urls = start_sim(
        group,
        replicas=args.replicas,
        profile=args.profile,
        model=DEMO_MODEL,
        time_scale=time_scale,
        num_gpu_blocks=blocks,
        block_size=args.block_size,
        extra=sim_extra,
    )
    for u in urls:
        log(f"  replica {u}")
    return urls


def replay_config(args: argparse.Namespace) -> Any:
    from .records import SLO
    from .replay import ReplayConfig

    return ReplayConfig(
        speedup=args.speedup,
        max_requests=args.max_requests,
        duration_s=args.duration,
        prompt=args.prompt,
        model=DEMO_MODEL,
        grace_s=args.grace,
        slo=SLO(ttft_s=args.slo_ttft, tpot_s=args.slo_tpot),
    )


def run_replay(
    args: argparse.Namespace,
    targets: Sequence[Any],
    urls: Sequence[str],
    title: str,
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    from .loaders import load_trace
    from .replay import replay, run_sync

    trace, _ = load_trace(args.trace)
    cfg = replay_config(args)
    result = run_sync(replay(trace, targets, cfg, engine_urls=urls, reset_between=True, progress=log))
    return report_result(args, trace, result, title, notes)


def report_result(
    args: argparse.Namespace, trace: Any, result: dict[str, Any], title: str, notes: Sequence[str] = ()
) -> dict[str, Any]:
    """Write records + report into ``args.out`` and print the comparison table."""
    from .replay import write_outputs
    from .report import text_table

    files = write_outputs(args.out, trace, result, title=title, notes=notes, plots=not args.no_plots)
    summary: dict[str, Any] = result["summary"]
    print()
    print(text_table(summary["targets"]))
    print()
    oracle_info = summary.get("oracle")
    if oracle_info:
        print(
            f"oracle hit ratio (one LRU cache of the fleet's {oracle_info['fleet_cache_tokens']:,} tokens): "
            f"{100 * oracle_info['token_hit_lru']:.1f}%"
        )
    print(f"report: {files['markdown']}")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m traces.demo", description=__doc__.split("\n")[0])
    fleet_arguments(p, speedup=5.0, max_requests=750)
    p.add_argument("--policies", default="round_robin,cache_aware", help="kvrouter policies, comma-separated")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    from .replay import Target

    t_start = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    group = ProcGroup(out / "logs")
    try:
        urls = start_fleet(group, args)
        targets = []
        for policy in [x.strip() for x in args.policies.split(",") if x.strip()]:
            _, url = start_kvrouter(group, urls, policy, name=f"kvrouter-{policy}")
            log(f"kvrouter --policy {policy} on {url}")
            targets.append(Target(name=policy, url=url))
        time_scale = effective_time_scale(args)
        notes = [
            f"{args.replicas} x `kvrouter sim --profile {args.profile} --time-scale {time_scale:g}`, "
            f"{args.kv_tokens:,} KV tokens per replica (block size {args.block_size}); "
            f"load = {args.speedup:g}/{time_scale:.3g} = {args.speedup / time_scale:.2g}x the trace on real H100s.",
            "Prefix caches reset (POST /reset_prefix_cache) on every replica before each target.",
        ]
        run_replay(args, targets, urls, "kvrouter demo: round robin vs cache-aware", notes)
    except KeyboardInterrupt:
        log("interrupted: stopping every process")
        return 130
    except (RuntimeError, TimeoutError, OSError) as exc:
        log(f"demo failed: {exc}")
        return 1
    finally:
        group.close()
    log(f"demo done in {time.monotonic() - t_start:.0f} s; logs in {out / 'logs'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
