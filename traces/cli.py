"""`kvrouter trace|replay|simulate` subcommands, registered via the ``kvrouter.commands`` entry points.

Each ``register_*`` function adds one top-level subcommand to the parser ``router.cli`` builds;
imports of heavy modules happen inside the handlers so ``kvrouter --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
import typing
from typing import Any

import msgspec

# ================================================================================================
# kvrouter trace: stats / generate (loaders, statistics, generators)
# ================================================================================================


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def _base_type(tp: Any) -> Any:
    """``Annotated[int, Meta(...)]`` -> ``int`` for argparse (msgspec validates the constraint);
    ``X | None`` -> ``X`` (the flag's absence is the ``None``)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is not typing.Annotated and len(args) == 1 and len(typing.get_args(tp)) == 2:
        tp = args[0]
    return typing.get_args(tp)[0] if typing.get_origin(tp) is typing.Annotated else tp


def register_trace(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("trace", help="inspect and generate request traces")
    tsub = p.add_subparsers(dest="trace_command", metavar="TRACE_COMMAND")
    tsub.required = True

    st = tsub.add_parser("stats", help="arrival, length and prefix-cache statistics of a trace file")
    st.add_argument("file", help="trace file (Mooncake / Qwen JSONL, Azure CSV, kvrouter JSONL)")
    st.add_argument("--format", default="auto", choices=["auto", "mooncake", "qwen", "azure", "kvrouter"])
    st.add_argument(
        "--lru",
        type=_int_list,
        default=None,
        help="comma-separated LRU cache sizes in trace blocks (default 500,1000,2000,5000,10000,50000,200000)",
    )
    st.add_argument("--json", action="store_true", help="print machine-readable JSON")
    st.add_argument("--strict", action="store_true", help="fail at the first bad line")
    st.set_defaults(func=_cmd_stats)

    from .generators import GENERATORS

    gen = tsub.add_parser("generate", help="write a synthetic trace (kvrouter JSONL)")
    gsub = gen.add_subparsers(dest="kind", metavar="KIND")
    gsub.required = True
    for kind, (params_cls, _fn) in GENERATORS.items():
        g = gsub.add_parser(kind, help=(params_cls.__doc__ or kind).strip().splitlines()[0])
        g.add_argument("--out", required=True, help="output file")
        g.add_argument(
            "--format",
            dest="out_format",
            choices=["kvrouter", "mooncake"],
            default="kvrouter",
            help="kvrouter JSONL (default) or Mooncake JSONL with session_id/turn (needs --block-tokens 512)",
        )
        # One flag per parameter field, typed and defaulted from the struct, so the CLI can
        # never drift from the generator's documented parameters.
        for f in msgspec.structs.fields(params_cls):
            g.add_argument(
                "--" + f.name.replace("_", "-"),
                dest=f.name,
                type=_base_type(f.type),
                default=f.default,
                help=f"(default {f.default})",
            )
        g.set_defaults(func=_cmd_generate, params_cls=params_cls)


def _cmd_stats(args: argparse.Namespace) -> int:
    import msgspec

    from .loaders import TraceFormatError, load_trace
    from .stats import DEFAULT_LRU_SIZES, format_stats, trace_stats

    try:
        trace, report = load_trace(args.file, args.format, strict=args.strict)
    except TraceFormatError as exc:
        print(f"kvrouter trace stats: {exc}", file=sys.stderr)
        return 2
    for issue in report.errors:
        print(f"{report.path}:{issue.line}: skipped: {issue.reason}", file=sys.stderr)
    if report.bad > len(report.errors):
        print(f"... and {report.bad - len(report.errors)} more bad lines", file=sys.stderr)
    stats = trace_stats(trace, args.lru if args.lru is not None else DEFAULT_LRU_SIZES)
    if args.json:
        out = {"stats": stats, "load": report}
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(out)).decode() + "\n")
    else:
        print(format_stats(stats))
        print(report.summary(), file=sys.stderr)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from .generators import generate
    from .loaders import write_mooncake, write_trace
    from .stats import format_stats, trace_stats

    names = [f.name for f in msgspec.structs.fields(args.params_cls)]
    try:
        trace = generate(args.kind, **{n: getattr(args, n) for n in names})
    except (ValueError, msgspec.ValidationError) as exc:
        print(f"kvrouter trace generate {args.kind}: {exc}", file=sys.stderr)
        return 2
    try:
        if args.out_format == "mooncake":
            write_mooncake(trace, args.out)
        else:
            write_trace(trace, args.out)
    except ValueError as exc:
        print(f"kvrouter trace generate {args.kind}: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(trace)} requests to {args.out}", file=sys.stderr)
    print(format_stats(trace_stats(trace, lru_sizes=())), file=sys.stderr)
    return 0


# ================================================================================================
# kvrouter replay / kvrouter simulate: live replay driver and offline simulator
# (register_replay / register_simulate go below; owned by the replay/simulation work)
# ================================================================================================


def register_replay(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "replay",
        help="replay a trace against live targets (open loop) and write records + report",
        description="Send a trace's requests to each target in turn at trace time / speed-up; see docs/replay.md.",
    )
    p.add_argument(
        "--trace", required=True, help="trace file (Mooncake / Qwen JSONL, Azure CSV, kvrouter JSONL)"
    )
    p.add_argument(
        "--target", action="append", required=True, metavar="NAME=URL", help="repeatable; run in order"
    )
    p.add_argument("--speedup", type=float, default=1.0, help="trace time / X = send time (default 1)")
    p.add_argument("--max-requests", type=int, default=None, help="send at most N requests")
    p.add_argument(
        "--duration", type=float, default=None, metavar="S", help="send for at most S wall seconds"
    )
    p.add_argument("--out", required=True, help="output folder (records, summary.json, report)")
    p.add_argument("--prompt", choices=["tokens", "text"], default="tokens", help="token-id or text prompts")
    p.add_argument("--model", default=None, help="model name (default: first of the target's /v1/models)")
    p.add_argument(
        "--concurrency-limit", type=int, default=None, help="client-side cap on requests in flight"
    )
    p.add_argument("--slo-ttft", type=float, default=2.0, metavar="S", help="goodput TTFT SLO (default 2 s)")
    p.add_argument(
        "--slo-tpot", type=float, default=0.1, metavar="S", help="goodput TPOT SLO (default 0.1 s)"
    )
    p.add_argument(
        "--engine-metrics",
        action="append",
        default=None,
        metavar="URL",
        help="replica base URL whose vllm:* counters to diff per target (repeatable)",
    )
    p.add_argument(
        "--reset-prefix-cache",
        action="store_true",
        help="POST /reset_prefix_cache to every --engine-metrics replica before each target",
    )
    p.add_argument(
        "--grace", type=float, default=30.0, metavar="S", help="wait for pending requests after the last send"
    )
    p.add_argument("--request-timeout", type=float, default=600.0, metavar="S", help="per-request limit")
    p.add_argument("--endpoint", default="/v1/completions", help="request path (default /v1/completions)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument(
        "--closed-loop",
        action="store_true",
        help="a session's turn is sent when its previous turn finished plus its tool pause (docs/sessions.md)",
    )
    p.add_argument(
        "--decode-tps",
        type=float,
        default=None,
        help="closed loop: decode speed the trace's timestamps assumed (default 50)",
    )

    def _run(args: argparse.Namespace) -> int:
        from .replay import cmd_replay  # aiohttp and the report load only when replaying

        return cmd_replay(args)

    p.set_defaults(func=_run)


def register_simulate(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "simulate",
        help="offline virtual-time simulation: the real router policies over simulated engines",
        description="Play a trace against N simulated replicas in virtual time, once per policy; "
        "see docs/offline-simulator.md.",
    )
    p.add_argument(
        "--trace", required=True, help="trace file with block ids (Mooncake JSONL, kvrouter JSONL)"
    )
    p.add_argument("--replicas", type=int, default=8, help="simulated replicas (default 8)")
    p.add_argument("--profile", default="h100-llama3-8b", help="engine profile (default h100-llama3-8b)")
    p.add_argument(
        "--policy",
        action="append",
        default=None,
        metavar="P",
        help="repeatable: router policy or peer emulation (default round_robin and cache_aware)",
    )
    p.add_argument("--speedup", type=float, default=1.0, help="arrival = trace time / X (default 1)")
    p.add_argument("--max-requests", type=int, default=None, help="first N requests of the trace")
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="S",
        help="requests arriving in the first S simulated s",
    )
    p.add_argument(
        "--kv-events", choices=["on", "off"], default="on", help="feed engine KV events to the index"
    )
    p.add_argument(
        "--scrape-interval", type=float, default=0.25, metavar="S", help="engine gauge refresh (0.25)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the policies' rng (default 0)")
    p.add_argument(
        "--weight", action="append", default=None, metavar="NAME=W", help="cache_aware weight override"
    )
    p.add_argument("--load-factor", type=float, default=None, help="cache_aware bounded-load factor override")
    p.add_argument("--slo-ttft", type=float, default=2.0, metavar="S", help="goodput TTFT SLO (default 2 s)")
    p.add_argument(
        "--slo-tpot", type=float, default=0.1, metavar="S", help="goodput TPOT SLO (default 0.1 s)"
    )
    p.add_argument(
        "--prefill-replicas",
        default=None,
        metavar="P[,P..]",
        help="PD fleets: prefill pool sizes, paired with --decode-replicas (docs/disaggregation.md)",
    )
    p.add_argument("--decode-replicas", default=None, metavar="D[,D..]", help="PD fleets: decode pool sizes")
    p.add_argument(
        "--both-replicas",
        default=None,
        metavar="B[,B..]",
        help="PD fleets: replicas that prefill for others and decode (NIXL kv_both), paired likewise",
    )
    p.add_argument(
        "--pd-rate",
        choices=["compute", "ttft"],
        default="compute",
        help="prefill rate the PD decision divides by: compute (no queue) or ttft (queue included)",
    )
    p.add_argument(
        "--pd",
        action="append",
        default=None,
        metavar="RULE",
        help="repeatable split rule: always, auto, never, threshold[:N] (default always, auto, threshold)",
    )
    p.add_argument(
        "--num-gpu-blocks", type=int, default=None, help="GPU KV blocks per replica (default: profile)"
    )
    p.add_argument(
        "--cpu-tier-tokens", type=int, default=0, help="per-replica LMCache-like CPU tier, tokens (0: none)"
    )
    p.add_argument(
        "--cpu-events",
        choices=["on", "off"],
        default="on",
        help="CPU tier publishes KV events (off: the router credits the GPU tier only)",
    )
    p.add_argument(
        "--slow-replica", type=int, default=None, metavar="I", help="replica I runs slowed (see --slow-*)"
    )
    p.add_argument(
        "--slow-factor", type=float, default=3.0, metavar="F", help="its steps take F times longer (3)"
    )
    p.add_argument(
        "--slow-window", default=None, metavar="START:END", help="simulated seconds it is slow (all)"
    )
    p.add_argument(
        "--outliers",
        choices=["on", "off"],
        default="off",
        help="the router's outlier detector on kvrouter's policies, not peers (default off)",
    )
    p.add_argument(
        "--closed-loop",
        action="store_true",
        help="a session's turn is sent when its previous turn finished plus its tool pause "
        "(docs/sessions.md); default: every request at its trace time",
    )
    p.add_argument(
        "--decode-tps",
        type=float,
        default=None,
        help="closed loop: decode speed the trace's timestamps assumed (default: trace metadata, else 50)",
    )
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    p.add_argument("--out", default=None, metavar="DIR", help="write records-<policy>.jsonl and summary.json")

    def _run(args: argparse.Namespace) -> int:
        from .simulate_cli import cmd_simulate

        return cmd_simulate(args)

    p.set_defaults(func=_run)
