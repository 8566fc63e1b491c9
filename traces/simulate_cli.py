"""``kvrouter simulate``: run the policies (and PD fleets) offline and print or write the report.

Split out of traces/simulate.py (the event loop) so that the simulator module stays one piece
under 500 lines and the PD comparison (traces/pd_simulate.py) joins the same command and table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import msgspec

from engines.sim.model.profiles import get_profile

from .pd_simulate import PDConfig, parse_rule, run_pd
from .simulate import PolicyRun, SimConfig, build_report, policy_factory, select_requests, simulate_runs

_COLUMNS = (
    ("policy", "{}", None),
    ("hit", "{:.1%}", "hit_ratio"),
    ("cpu hit", "{:.1%}", "cpu_hit_ratio"),
    ("ttft mean", "{:.3f}", "ttft_mean_s"),
    ("p50", "{:.3f}", "ttft_p50_s"),
    ("p99", "{:.3f}", "ttft_p99_s"),
    ("tpot ms", "{:.1f}", "tpot_mean_s"),
    ("tpot p99", "{:.1f}", "tpot_p99_s"),
    ("e2e mean", "{:.2f}", "e2e_mean_s"),
    ("req/s", "{:.2f}", "throughput_rps"),
    ("slo", "{:.1%}", "slo_attainment"),
    ("goodput", "{:.2f}", "goodput_rps"),
    ("split", "{:.1%}", "split_share"),
    ("max/mean", "{:.2f}", None),
    ("wall s", "{:.2f}", "wall_s"),
)
_MS = {"tpot_mean_s", "tpot_p99_s"}


def format_report(report: Mapping[str, Any]) -> str:
    """A readable table of one ``simulate`` report."""
    cfg = report["config"]
    lines = [
        f"trace {report['trace']}: {report['requests']:,} requests, {cfg['replicas']} x {cfg['profile']}, "
        f"speedup {cfg['speedup']:g}, kv events {'on' if cfg['kv_events'] else 'off'}, "
        f"SLO ttft {cfg['slo_ttft_s']:g} s tpot {cfg['slo_tpot_s'] * 1000:g} ms",
        f"oracle hit ratio (one LRU of the fleet's {report['oracle']['cache_blocks']:,} blocks, "
        f"token-weighted): {report['oracle_hit_ratio']:.1%}",
        "",
    ]
    rows = [[c[0] for c in _COLUMNS]]
    for name, p in report["policies"].items():
        row = []
        for title, fmt, key in _COLUMNS:
            if title == "policy":
                row.append(name)
            elif title == "max/mean":
                row.append(fmt.format(p["load_spread"].get("max_over_mean", math.nan)))
            elif key == "split_share" and key not in p:
                row.append("-")
            else:
                v = p.get(key, math.nan) if key else math.nan
                if key in _MS and isinstance(v, float):
                    v *= 1000
                row.append("nan" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v))
        rows.append(row)
    widths = [max(len(r[j]) for r in rows) for j in range(len(rows[0]))]
    for k, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    sessions = [(n, p) for n, p in report["policies"].items() if "session_completion_mean_s" in p]
    if sessions:
        loop = "closed loop" if cfg.get("closed_loop") else "open loop: fixed by the trace"
        lines += ["", f"session completion, first send to last token ({loop}):"]
        for n, p in sessions:
            lines.append(
                f"  {n}: {p['sessions']} sessions, mean {p['session_completion_mean_s']:.1f} s, "
                f"p99 {p['session_completion_p99_s']:.1f} s"
            )
    return "\n".join(lines)


def _ints(text: str | None) -> list[int]:
    return [int(x) for x in text.split(",")] if text else []


def pd_configs(args: Any) -> list[PDConfig]:
    """``--prefill-replicas 2,3 --decode-replicas 6,5 [--both-replicas 0,0] --pd always --pd auto``
    -> one config per (pool sizes, rule). Lists pair by position; a missing list is all zeros.
    Raises ValueError on mismatched lists or an unknown rule."""
    pools = [_ints(getattr(args, k, None)) for k in ("prefill_replicas", "decode_replicas", "both_replicas")]
    size = max(len(x) for x in pools)
    if size == 0:
        return []
    if any(x and len(x) != size for x in pools):
        raise ValueError(
            "--prefill-replicas, --decode-replicas and --both-replicas need as many values each "
            "(e.g. 2,3 and 6,5)"
        )
    ps, ds, bs = (x or [0] * size for x in pools)
    rate = getattr(args, "pd_rate", None) or "compute"
    out: list[PDConfig] = []
    for p, d, b in zip(ps, ds, bs, strict=True):
        for text in getattr(args, "pd", None) or ["always", "auto", "threshold"]:
            rule, n = parse_rule(text)
            cfg = PDConfig(prefill_replicas=p, decode_replicas=d, both_replicas=b, rule=rule, rate=rate)
            if n is not None:
                cfg = msgspec.structs.replace(cfg, threshold_tokens=n)
            out.append(cfg)
    return out


def _window(text: str | None) -> tuple[float, float]:
    """``START:END`` simulated seconds (either side may be empty: from 0 / to the end)."""
    if not text:
        return (0.0, math.inf)
    start, sep, end = text.partition(":")
    if not sep:
        raise ValueError(f"invalid --slow-window {text!r} (expected START:END seconds)")
    return (float(start) if start else 0.0, float(end) if end else math.inf)


# Over the complexity limit on purpose: one CLI handler that checks every flag and reports each
# error the same way; split, the exit codes would be threaded through every piece.
def cmd_simulate(args: Any) -> int:
    """Run the policies and PD fleets, print a table (or one JSON object with ``--json``), write ``--out``."""
    import logging
    import os
    import sys

    from .loaders import TraceFormatError, load_trace
    from .records import write_records

    # Outlier transitions go to the report (outlier_transitions), not one warning line each.
    logging.getLogger("kvrouter.outliers").setLevel(logging.ERROR)
    try:
        trace, report = load_trace(args.trace)
    except (OSError, TraceFormatError) as exc:
        print(f"kvrouter simulate: {exc}", file=sys.stderr)
        return 2
    if report.bad:
        print(report.summary(), file=sys.stderr)
    weights: dict[str, float] = {}
    for item in args.weight or ():
        key, _, value = item.partition("=")
        try:
            weights[key.strip()] = float(value)
        except ValueError:
            print(f"kvrouter simulate: invalid --weight {item!r} (expected NAME=FLOAT)", file=sys.stderr)
            return 2
    try:
        cfg = SimConfig(
            replicas=args.replicas,
            profile=args.profile,
            speedup=args.speedup,
            max_requests=args.max_requests,
            duration_s=args.duration,
            kv_events=args.kv_events == "on",
            scrape_interval_s=args.scrape_interval,
            seed=args.seed,
            weights=weights,
            load_factor=args.load_factor,
            num_gpu_blocks=getattr(args, "num_gpu_blocks", None),
            cpu_tier_tokens=getattr(args, "cpu_tier_tokens", 0),
            cpu_events=getattr(args, "cpu_events", "on") == "on",
            slow_replica=getattr(args, "slow_replica", None),
            slow_factor=getattr(args, "slow_factor", 1.0),
            slow_window=_window(getattr(args, "slow_window", None)),
            outliers=getattr(args, "outliers", "off") == "on",
            slo_ttft_s=getattr(args, "slo_ttft", 2.0),
            slo_tpot_s=getattr(args, "slo_tpot", 0.1),
            closed_loop=getattr(args, "closed_loop", False),
            decode_tps=getattr(args, "decode_tps", None),
        )
        get_profile(cfg.profile)
        pds = pd_configs(args)
        names = args.policy or (["cache_aware"] if pds else ["round_robin", "cache_aware"])
        for n in names:
            policy_factory(n, cfg)
        runs: list[PolicyRun] = simulate_runs(trace, cfg, names)
        reqs = select_requests(trace, cfg)
        runs += [run_pd(trace, cfg, pd, reqs) for pd in pds]
    except ValueError as exc:
        print(f"kvrouter simulate: {exc}", file=sys.stderr)
        return 2
    out = build_report(trace, cfg, reqs, runs)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        for r in runs:
            safe = r.name.replace(" ", "_").replace(":", "-").replace("+", "_")
            write_records(os.path.join(args.out, f"records-{safe}.jsonl"), r.records)
        with open(os.path.join(args.out, "summary.json"), "wb") as f:
            f.write(msgspec.json.format(msgspec.json.encode(out)) + b"\n")
    if args.json:
        sys.stdout.write(msgspec.json.encode(out).decode() + "\n")
    else:
        print(format_report(out))
    return 0
