"""``kvrouter sim``: run N simulated vLLM replicas in one process until SIGINT/SIGTERM.

Registered through the ``kvrouter.commands`` entry point, so router/ never imports engines/.
Prints one line per replica, then ``ready``::

    replica r0 url=http://127.0.0.1:8001 events=tcp://127.0.0.1:5557 replay=tcp://127.0.0.1:5657
    ready
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import signal
import sys
from typing import Any

from .model.profiles import PROFILES
from .replica.faults import FaultConfig

GC_GEN0_THRESHOLD = 20_000  # see serve(): allocations between young collections
REPLAY_PORT_OFFSET = 100  # default replay range: events port + 100 (vLLM docs use 5557 / 5657)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "sim",
        help="run simulated vLLM replicas (HTTP API, KV events, metrics, faults)",
        description="Run N simulated vLLM replicas in one process on ports P..P+N-1.",
    )
    p.add_argument("--replicas", type=int, default=1, help="number of replicas (default 1)")
    p.add_argument("--port", type=int, default=8001, help="HTTP port of replica 0; 0 = any free port")
    p.add_argument("--host", default="127.0.0.1", help="address every socket listens on")
    p.add_argument("--profile", default="tiny", choices=sorted(PROFILES), help="engine profile")
    p.add_argument(
        "--model", default=None, help="served model name (default: the profile name's model, 'tiny')"
    )
    p.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="speed-up: step times are divided by X (0.01 = 100x slower)",
    )
    p.add_argument("--block-size", type=int, default=None, help="KV block size in tokens (default: profile)")
    p.add_argument("--num-gpu-blocks", type=int, default=None, help="GPU KV blocks (default: profile)")
    p.add_argument("--cpu-tier-tokens", type=int, default=None, help="LMCache-like CPU tier capacity, tokens")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: profile)")
    p.add_argument("--events-port", type=int, default=5557, help="KV-event PUB port of replica 0; 0 = any")
    p.add_argument(
        "--replay-port", type=int, default=None, help="replay ROUTER port of replica 0 (default events+100)"
    )
    p.add_argument("--no-events", action="store_true", help="do not publish KV events")
    p.add_argument("--legacy-events", action="store_true", help="legacy positional-array event shape")
    p.add_argument("--bytes-block-hashes", action="store_true", help="32-byte digests instead of int hashes")
    p.add_argument(
        "--kv-event-hashes",
        choices=("vllm", "engine"),  # server.KV_EVENT_HASHES (not imported: `--help` stays fast)
        default="vllm",
        help="block hashes in KV events: vllm = vLLM's sha256 values (default); engine = the sim's "
        "xxh3 ids, enough for routers that re-hash token_ids (kvrouter), ~1/6 less CPU under load",
    )
    p.add_argument("--topic", default="kv-events", help="KV-event topic")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json or model folder (default: built-in)")
    p.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        metavar="N",
        help="as vLLM's: a stream sends its first token at once, then every N tokens (default 1)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (replica i: seed+i)")
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="P",
        help="split the replicas over P worker processes, one event loop each, as separate vLLM "
        "replicas are (same ports, names and output; default 1)",
    )
    p.add_argument(
        "--role",
        choices=["prefill", "decode", "both"],
        default="both",
        help="PD role: NIXL kv_transfer_params it serves (docs/engine-sim.md, PD)",
    )
    p.add_argument(
        "--kv-lease",
        type=float,
        default=30.0,
        metavar="S",
        help="prefill: seconds the blocks stay pinned for the decode side (vLLM kv_lease_duration)",
    )
    p.add_argument(
        "--kv-load-failure-policy",
        choices=["fail", "recompute"],
        default="fail",
        help="decode: a failed KV read fails the request (vLLM default) or recomputes it",
    )
    p.add_argument("--first-replica", type=int, default=0, help=argparse.SUPPRESS)  # a worker's range
    f = p.add_argument_group("faults (see docs/engine-sim.md; change live with POST /sim/faults)")
    f.add_argument("--fault-refuse-connections", action="store_true", help="do not listen")
    f.add_argument(
        "--fault-refuse-for", type=float, default=0.0, metavar="S", help="...then listen after S s"
    )
    f.add_argument("--fault-error-rate", type=float, default=0.0, metavar="P", help="HTTP 500 for fraction P")
    f.add_argument("--fault-stall", type=float, default=0.0, metavar="S", help="stall S s before first byte")
    f.add_argument("--fault-stall-forever", action="store_true", help="never send the first byte")
    f.add_argument(
        "--fault-die-after-chunks", type=int, default=None, metavar="K", help="cut streams after K"
    )
    f.add_argument(
        "--fault-slow-factor", type=float, default=1.0, metavar="F", help="engine steps F times slower"
    )
    f.add_argument("--fault-stuck", action="store_true", help="engine loop stops; /health stays 200")
    f.add_argument(
        "--fault-stop-after-chunks",
        type=int,
        default=None,
        metavar="K",
        help="streams stop after K, conn open",
    )
    f.add_argument("--fault-preemption-rate", type=float, default=0.0, metavar="P", help="steps that preempt")
    f.add_argument(
        "--fault-health-stall", type=float, default=0.0, metavar="S", help="/health answers after S s"
    )
    f.add_argument("--fault-malformed-events", type=float, default=0.0, metavar="P", help="garble fraction P")
    f.add_argument("--fault-reorder-events", type=float, default=0.0, metavar="P", help="swap fraction P")
    p.set_defaults(func=run)


def faults_from_args(args: argparse.Namespace) -> FaultConfig:
    cfg = FaultConfig(
        refuse_connections=args.fault_refuse_connections,
        refuse_for_s=args.fault_refuse_for,
        error_rate=args.fault_error_rate,
        stall_s=args.fault_stall,
        stall_forever=args.fault_stall_forever,
        die_after_chunks=args.fault_die_after_chunks,
        malformed_event_rate=args.fault_malformed_events,
        reorder_event_rate=args.fault_reorder_events,
        slow_factor=args.fault_slow_factor,
        stuck=args.fault_stuck,
        stop_after_chunks=args.fault_stop_after_chunks,
        preemption_rate=args.fault_preemption_rate,
        health_stall_s=args.fault_health_stall,
    )
    cfg.validate()
    return cfg


async def serve(args: argparse.Namespace, stop: asyncio.Event | None = None) -> int:
    from .fleet import FleetConfig, start_fleet  # imported late: `kvrouter --help` stays fast

    events_port: int | None = None if args.no_events else args.events_port
    replay_port: int | None = None
    if events_port is not None:
        if args.replay_port is not None:
            replay_port = args.replay_port
        else:
            replay_port = events_port + REPLAY_PORT_OFFSET if events_port else 0
    kw: dict[str, Any] = {}
    if args.model:
        kw["model"] = args.model
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    async with contextlib.AsyncExitStack() as stack:
        try:
            fleet = await stack.enter_async_context(
                start_fleet(
                    FleetConfig(
                        n=args.replicas,
                        profile=args.profile,
                        host=args.host,
                        port=args.port,
                        events_port=events_port,
                        replay_port=replay_port,
                        time_scale=args.time_scale,
                        block_size=args.block_size,
                        num_gpu_blocks=args.num_gpu_blocks,
                        cpu_tier_tokens=args.cpu_tier_tokens,
                        legacy_events=args.legacy_events,
                        int_block_hashes=not args.bytes_block_hashes,
                        kv_event_hashes=args.kv_event_hashes,
                        topic=args.topic,
                        max_model_len=args.max_model_len,
                        tokenizer=args.tokenizer,
                        faults=faults_from_args(args),
                        seed=args.seed,
                        stream_interval=args.stream_interval,
                        role=args.role,
                        kv_lease_s=args.kv_lease,
                        kv_load_failure_policy=args.kv_load_failure_policy,
                        first_index=args.first_replica,
                        **kw,
                    )
                )
            )
        except ValueError as exc:  # a value start_fleet rejects: --replicas 0, --time-scale 0, ...
            print(f"kvrouter sim: {exc}", file=sys.stderr)
            return 2
        # Every replica's block pool, hasher and server objects exist now and live as long as the
        # process: freeze them out of the cyclic GC, which otherwise walked millions of their list
        # slots on every full collection (140-280 ms pauses = step lag, 10-20% of a loaded sim's
        # CPU). A larger first threshold: a 12k-id prompt is several young containers, and with
        # vLLM-sized prompts the default 700 collected gen 0 ~50 times a second.
        gc.freeze()
        gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])
        for rep in fleet.replicas:
            print(
                f"replica {rep.name} url={rep.url} events={rep.events_endpoint} replay={rep.replay_endpoint}"
            )
        print("ready", flush=True)
        await stop.wait()
    return 0


def run(args: argparse.Namespace) -> int:
    if args.processes != 1:
        from .workers import run_workers

        return run_workers(args, run)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        runner = asyncio.run
    try:
        return int(runner(serve(args)))
    except OSError as exc:
        print(f"kvrouter sim: {exc}", file=sys.stderr)
        return 1
