"""Replay / simulation reports: one markdown file, PNG plots and a JSON file per run.

Input is what ``traces.replay`` (or the offline simulator) produces: per target, the records and
``summarize()``'s numbers, optionally the engines' own counters. The report adds the upper bound
(the trace's oracle hit ratio for the fleet's total KV cache: one LRU cache of the same size) and a
short "why" section that ties the TTFT difference between targets to the two things a router
controls: how much of the prompt was already cached where it sent it (hit ratio) and how evenly
it spread the work (load spread).

Plots use matplotlib's Agg backend (no display needed); matplotlib is the ``report`` extra.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from .model import Trace, TraceRequest
from .records import RequestRecord
from .stats import oracle_hit_ratio


def oracle(
    trace: Trace, requests: Sequence[TraceRequest], fleet_cache_tokens: int | None
) -> dict[str, Any] | None:
    """Oracle hit ratio of the replayed requests for one cache of the fleet's total size."""
    if not fleet_cache_tokens or trace.block_tokens <= 0 or not requests:
        return None
    sub = Trace(requests=tuple(requests), block_tokens=trace.block_tokens, name=trace.name)
    blocks = fleet_cache_tokens // trace.block_tokens
    h = oracle_hit_ratio(sub, blocks)
    return {
        "fleet_cache_tokens": fleet_cache_tokens,
        "cache_blocks": blocks,
        "block_tokens": trace.block_tokens,
        "token_hit_lru": h.token_hit_lru,
        "token_hit_inf": h.token_hit_inf,
    }


# --- numbers per target -----------------------------------------------------------------------------


def load_max_over_mean(s: Mapping[str, Any]) -> float:
    """Busiest replica's requests / mean: from the replica header, else from engine counters."""
    spread = s.get("load_spread") or {}
    if spread.get("max_over_mean") is not None:
        return float(spread["max_over_mean"])
    per = ((s.get("engine") or {}).get("requests_per_replica") or {}).values()
    counts = [float(c) for c in per if c is not None]
    if counts and sum(counts) > 0:
        return max(counts) / (sum(counts) / len(counts))
    return math.nan


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _s(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x < 0.01:
        return f"{x * 1000:.1f} ms"
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def _n(x: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


COLUMNS = (
    "target",
    "ok/sent",
    "req/s",
    "goodput",
    "TTFT mean",
    "p50",
    "p90",
    "p99",
    "TPOT mean",
    "e2e mean",
    "hit (engine)",
    "hit (cached_tokens)",
    "load max/mean",
    "split",
)


def table_rows(targets: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    rows = []
    for name, s in targets.items():
        rows.append(
            [
                name,
                f"{s['ok']}/{s['requests']}",
                _n(s["throughput_rps"]),
                _n(s["goodput_rps"]),
                _s(s["ttft_mean_s"]),
                _s(s["ttft_p50_s"]),
                _s(s["ttft_p90_s"]),
                _s(s["ttft_p99_s"]),
                _s(s["tpot_mean_s"]),
                _s(s["e2e_mean_s"]),
                _pct(s.get("engine_hit_ratio")),
                _pct(s["hit_ratio"]),
                _n(load_max_over_mean(s)),
                _pct(s.get("split_share")),  # PD fleets (engine NIXL reads / requests); "-" otherwise
            ]
        )
    return rows


def markdown_table(targets: Mapping[str, Mapping[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(targets)]
    return "\n".join(lines)


def text_table(targets: Mapping[str, Mapping[str, Any]]) -> str:
    """Fixed-width table for a terminal."""
    rows = [list(COLUMNS), *table_rows(targets)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def why(targets: Mapping[str, Mapping[str, Any]], oracle_info: Mapping[str, Any] | None) -> list[str]:
    """Plain-language explanation of the TTFT gap from hit ratio and load spread (no hard-coded winner)."""
    ok = {n: s for n, s in targets.items() if s["ok"] and not math.isnan(s["ttft_mean_s"])}
    if len(ok) < 2:
        return ["Only one target completed requests: nothing to compare."]
    best = min(ok, key=lambda n: ok[n]["ttft_mean_s"])
    out: list[str] = []

    def hit(s: Mapping[str, Any]) -> float:
        e = s.get("engine_hit_ratio")
        return float(e) if e is not None and not math.isnan(e) else float(s["hit_ratio"])

    for n, s in ok.items():
        if n == best:
            continue
        b = ok[best]
        dh = hit(b) - hit(s)
        saved = dh * (b["prompt_tokens"] / max(b["requests"], 1))
        lb, ls = load_max_over_mean(b), load_max_over_mean(s)
        reasons = []
        if not math.isnan(dh) and abs(dh) >= 0.005:
            more = "more" if dh > 0 else "fewer"
            reasons.append(
                f"{best} found {100 * abs(dh):.1f} points {more} of the prompt tokens in cache "
                f"({_pct(hit(b))} vs {_pct(hit(s))}; "
                f"about {abs(saved):,.0f} {'fewer' if dh > 0 else 'more'} prefill tokens per request)"
            )
        if not (math.isnan(lb) or math.isnan(ls)) and abs(lb - ls) >= 0.05:
            even = "more evenly" if lb < ls else "less evenly"
            reasons.append(f"{best} spread requests {even} (busiest replica {lb:.2f}x the mean vs {ls:.2f}x)")
        if s["errors"] > 0.05 * s["requests"]:
            # Percentiles cover finished requests only: a target that lost many understates its tail.
            reasons.append(
                f"{s['errors']} of {n}'s {s['requests']} requests failed or never finished, so its "
                "latencies cover only the rest (it fell behind the offered load)"
            )
        if not reasons:
            reasons.append("hit ratio and load spread are about equal, so the gap is within run-to-run noise")
        out.append(
            f"**{best} vs {n}**: TTFT mean {_s(b['ttft_mean_s'])} vs {_s(s['ttft_mean_s'])}, "
            f"p99 {_s(b['ttft_p99_s'])} vs {_s(s['ttft_p99_s'])}. " + "; ".join(reasons) + "."
        )
    if oracle_info:
        top = max(hit(s) for s in ok.values())
        out.append(
            f"Upper bound: one LRU cache of the fleet's total size ({oracle_info['cache_blocks']:,} blocks of "
            f"{oracle_info['block_tokens']} tokens) would hit {_pct(oracle_info['token_hit_lru'])} of prompt tokens "
            f"({_pct(oracle_info['token_hit_inf'])} with unlimited cache); the best target reached {_pct(top)}."
        )
    return out


# --- plots ----------------------------------------------------------------------------------------------


def in_flight_series(records: Sequence[RequestRecord]) -> dict[str, tuple[list[float], list[int]]]:
    """Step series of requests in flight per replica (unknown replica: '?'), from send to completion.

    A failed request counts until its last known instant (its first token, if any); one that
    failed before any token has no known duration and is left out."""
    events: dict[str, list[tuple[float, int]]] = {}
    for r in records:
        dur = r.e2e_s if r.e2e_s is not None else r.ttft_s
        if not dur or dur <= 0:
            continue
        ev = events.setdefault(r.replica or "?", [])
        ev.append((r.send_s, 1))
        ev.append((r.send_s + dur, -1))
    out: dict[str, tuple[list[float], list[int]]] = {}
    for key, ev in sorted(events.items()):
        ev.sort(key=lambda e: (e[0], e[1]))  # ends before starts at the same instant
        ts, ns, n = [0.0], [0], 0
        for t, d in ev:
            n += d
            ts.append(t)
            ns.append(n)
        out[key] = (ts, ns)
    return out


def _short(replica: str) -> str:
    return replica.rsplit(":", 1)[-1] if "://" in replica else replica


def plot(
    out_dir: str,
    targets: Mapping[str, Mapping[str, Any]],
    records: Mapping[str, Sequence[RequestRecord]],
    oracle_info: Mapping[str, Any] | None,
) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    # TTFT CDF per target
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, recs in records.items():
        vals = sorted(r.ttft_s for r in recs if r.ok and r.ttft_s is not None)
        if vals:
            ax.step(vals, [(i + 1) / len(vals) for i in range(len(vals))], where="post", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (s, log)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TTFT CDF")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "ttft_cdf.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # hit ratio per target
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = list(targets)
    xs = range(len(names))
    eng = [targets[n].get("engine_hit_ratio") for n in names]
    cli = [targets[n]["hit_ratio"] for n in names]
    w = 0.38
    ax.bar(
        [x - w / 2 for x in xs],
        [0 if v is None or math.isnan(v) else 100 * v for v in eng],
        w,
        label="engine counters",
    )
    ax.bar([x + w / 2 for x in xs], [0 if math.isnan(v) else 100 * v for v in cli], w, label="cached_tokens")
    if oracle_info:
        ax.axhline(
            100 * oracle_info["token_hit_lru"],
            color="k",
            ls="--",
            lw=1,
            label="oracle (one LRU of fleet size)",
        )
    ax.set_xticks(list(xs), names, rotation=15)
    ax.set_ylabel("prefix-cache hit ratio (% of prompt tokens)")
    ax.set_title("Prefix-cache hit ratio")
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "hit_ratio.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # requests in flight per replica over time, one panel per target
    n = max(len(records), 1)
    fig, axes = plt.subplots(n, 1, figsize=(8, 2.4 * n), sharex=True, squeeze=False)
    for ax, (name, recs) in zip(axes[:, 0], records.items(), strict=False):
        for rep, (ts, ns) in in_flight_series(recs).items():
            ax.step(ts, ns, where="post", lw=0.9, label=_short(rep))
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("in flight")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=4, loc="upper right")
    axes[-1, 0].set_xlabel("time since start (s)")
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "load_over_time.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


# --- the report -------------------------------------------------------------------------------------------


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    return x


def write_report(
    out_dir: str,
    summary: Mapping[str, Any],
    records: Mapping[str, Sequence[RequestRecord]],
    *,
    oracle_info: Mapping[str, Any] | None = None,
    title: str = "kvrouter replay",
    notes: Sequence[str] = (),
    plots: bool = True,
) -> dict[str, str]:
    """Write ``report.md``, ``report.json`` and (``plots``) three PNGs into ``out_dir``; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    targets: Mapping[str, Mapping[str, Any]] = summary["targets"]
    files: dict[str, str] = {}
    pngs = plot(out_dir, targets, records, oracle_info) if plots else []
    data = {**summary, "oracle": oracle_info, "why": why(targets, oracle_info)}
    files["json"] = os.path.join(out_dir, "report.json")
    with open(files["json"], "w") as f:
        json.dump(_jsonable(data), f, indent=1, sort_keys=True)

    cfg = summary.get("config") or {}
    slo = cfg.get("slo") or {}
    md = [f"# {title}", ""]
    md.append(
        f"Trace `{summary.get('trace')}`: {summary.get('requests')} requests, speed-up {cfg.get('speedup', '-')}, "
        f"prompts as {cfg.get('prompt', '-')}, model `{summary.get('model')}`. "
        f"Goodput counts requests with TTFT <= {slo.get('ttft_s', '-')} s and TPOT <= {slo.get('tpot_s', '-')} s."
    )
    md += ["", markdown_table(targets), ""]
    if oracle_info:
        md.append(
            f"Oracle hit ratio for the fleet's total KV cache ({oracle_info['fleet_cache_tokens']:,} tokens = "
            f"{oracle_info['cache_blocks']:,} trace blocks): **{_pct(oracle_info['token_hit_lru'])}** "
            f"(unlimited cache: {_pct(oracle_info['token_hit_inf'])})."
        )
        md.append("")
    md += ["## Why", ""] + [f"- {w}" for w in data["why"]] + [""]
    md += [
        "## Client and simulator health",
        "",
        "Send lateness shows whether the client kept the trace clock; the sim's step lag (mean wake-up delay "
        "per engine step, wall time) whether the simulated engines kept real time.",
        "",
        "| target | wall | send lateness p99 / max | cancelled at end | sim step lag mean |",
        "|---|---|---|---|---|",
    ]
    for name, s in targets.items():
        c = s.get("client") or {}
        lag = (s.get("engine") or {}).get("sim_step_lag_mean_s")
        md.append(
            f"| {name} | {_n(c.get('wall_s'), '{:.1f} s')} | {_s(c.get('send_lateness_p99_s'))} / "
            f"{_s(c.get('send_lateness_max_s'))} | {c.get('cancelled', '-')} | {_s(lag)} |"
        )
    errs = {n: [r.error for r in recs if r.error] for n, recs in records.items()}
    if any(errs.values()):
        md += ["", "## Errors (first 3 per target)", ""]
        for n, es in errs.items():
            for e in es[:3]:
                md.append(f"- {n}: `{e}`")
    if notes:
        md += ["", "## Notes", ""] + [f"- {x}" for x in notes]
    if pngs:
        md += ["", "## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in pngs]
    files["markdown"] = os.path.join(out_dir, "report.md")
    with open(files["markdown"], "w") as f:
        f.write("\n".join(md) + "\n")
    for p in pngs:
        files[os.path.basename(p)] = p
    return files
