"""The scenario suite of docs/scenarios.md: workload families x load levels, for ``make eval`` / ``make tune``.

A **scenario** is a generator (traces/generators.py, traces/agentic.py) with fixed parameters, an
optional arrival transform (``bursty``) and a fleet (one engine profile per replica, so a fleet may
mix H100 and A100 replicas). A **cell** is a scenario at one load level: ``light`` (30 % of the
fleet's capacity), ``medium`` (60 %) and ``saturated`` (90 %).

Capacity (``capacity_rps``): the requests per second one replica completes when a sample of the
scenario's requests is queued at once (the engine model at its saturated throughput, prefix reuse
included), summed over the fleet's replicas. The offered rate of a cell is measured over the
middle 80 % of its arrivals (session traces ramp up and drain at the edges), and the generator's
arrival ``rate`` is rescaled until it is within 3 % of load x capacity. A session trace whose rate
saturates before that (its sessions cannot start faster than they end) has its time axis compressed
by the missing factor, think times and tool pauses included (``Cell.time_scale``; the table shows
the resulting utilization). Everything is derived from the seed: a cell is the same trace on
every run.

Sized for 2 shared cores: ~600-1,200 requests per cell; the whole suite with every policy takes a
few minutes (``python -m traces.scenarios eval``; ``--jobs`` processes).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from .generators import generate
from .model import Trace, TraceRequest
from .simulate import SimConfig, run_policy

LOADS: dict[str, float] = {"light": 0.3, "medium": 0.6, "saturated": 0.9}
H100 = "h100-llama3-8b"
A100 = "a100-40gb-llama3-8b"
CAPACITY_SAMPLE = 300  # requests queued at once to measure one replica's saturated throughput


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    kind: str  # generator name
    params: Mapping[str, Any]  # generator parameters, ``rate`` excluded (set per load)
    base_rate: float  # a first guess of ``rate``; calibration rescales it
    fleet: tuple[str, ...] = (H100,) * 8
    burst: tuple[float, float, float] | None = None  # (period s, duty, peak/mean) or None
    about: str = ""

    def trace(self, rate: float, seed: int) -> Trace:
        t = generate(self.kind, seed=seed, rate=rate, **self.params)
        if self.burst is not None:
            t = bursty(t, *self.burst)
        return t


def bursty(trace: Trace, period_s: float, duty: float, peak: float) -> Trace:
    """Re-time a trace's arrivals as a square-wave modulated Poisson process with the same mean.

    The intensity is ``peak`` x the mean for the first ``duty`` of every ``period_s`` and the
    rest of the mean mass spread over the remainder; arrival times are mapped through the inverse
    of the cumulative intensity, so a Poisson trace becomes a non-homogeneous Poisson one (and a
    session's gaps stretch or shrink with the phase they fall in). Order is preserved."""
    if not (0 < duty < 1 and 1 <= peak <= 1 / duty):
        raise ValueError(f"invalid burst shape duty={duty} peak={peak} (need 0<duty<1, 1<=peak<=1/duty)")
    low = (1 - duty * peak) / (1 - duty)
    on = duty * period_s
    mass_on = peak * on  # cumulative intensity (in mean-rate seconds) of one burst

    def warp(t: float) -> float:
        k, rem = divmod(t, period_s)  # t in mean-rate seconds: period_s of them per period
        if rem < mass_on:
            return k * period_s + rem / peak
        if low <= 0:
            return k * period_s + on
        return k * period_s + on + (rem - mass_on) / low

    reqs = tuple(msgspec.structs.replace(r, timestamp_s=warp(r.timestamp_s)) for r in trace.requests)
    meta = {**trace.meta, "burst_period_s": period_s, "burst_duty": duty, "burst_peak": peak}
    return msgspec.structs.replace(trace, requests=reqs, name=f"{trace.name}+bursty", meta=meta)


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "chat",
            "chat",
            dict(
                block_tokens=512,
                sessions=420,
                turns_mean=3.0,
                system_prompts=4,
                system_tokens=1200,
                user_tokens_mean=200.0,
                answer_tokens_mean=300.0,
                think_time_s=4.0,
                decode_tps=150.0,
                max_input_tokens=12000,
            ),
            base_rate=2.0,
            about="multi-turn chat, 4 system prompts, human think time (exp, mean 4 s)",
        ),
        Scenario(
            "agentic",
            "agentic",
            dict(
                block_tokens=512,
                sessions=170,
                turns_mean=5.0,
                prompts=16,
                pause="short",
                subagent_prob=0.3,
                subagent_turns_mean=3.0,
                system_tokens_mean=5000.0,
                decode_tps=150.0,
                max_input_tokens=20000,
            ),
            base_rate=1.0,
            about="agent sessions with tool pauses (log-normal, median 2 s), 16 Zipf tool prompts, sub-agents",
        ),
        Scenario(
            "rag",
            "rag",
            dict(
                block_tokens=512,
                requests=1000,
                documents=400,
                zipf_s=1.1,
                docs_per_request=2,
                doc_tokens_mean=2000.0,
                system_tokens=400,
            ),
            base_rate=20.0,
            about="RAG: 2 documents of 400 (Zipf 1.1), ~4.5k-token prompts",
        ),
        Scenario(
            "tenants",
            "shared-prompt",
            dict(
                block_tokens=512,
                requests=1000,
                users=3000,
                system_prompts=48,
                prompt_zipf=0.6,
                system_tokens=5000,
                user_context_tokens=600,
            ),
            base_rate=20.0,
            about="48 tenants with distinct 5k-token system prompts (Zipf 0.6), 600-token per-user context",
        ),
        Scenario(
            "bursty",
            "shared-prompt",
            dict(
                block_tokens=512,
                requests=1000,
                users=1000,
                system_prompts=8,
                prompt_zipf=1.0,
                system_tokens=3000,
            ),
            base_rate=20.0,
            burst=(10.0, 0.2, 4.0),
            about="8 apps' prompts, arrivals in bursts: 4x the mean rate 2 s of every 10 s",
        ),
        Scenario(
            "long-context",
            "rag",
            dict(
                block_tokens=512,
                requests=300,
                documents=48,
                zipf_s=0.8,
                docs_per_request=1,
                doc_tokens_mean=24000.0,
                doc_tokens_cv=0.4,
                system_tokens=200,
            ),
            base_rate=2.0,
            about="~24k-token contexts over 48 documents (Zipf 0.8): the fleet's KV holds each ~3 times",
        ),
        Scenario(
            "hetero",
            "rag",
            dict(
                block_tokens=512,
                requests=1000,
                documents=400,
                zipf_s=1.1,
                docs_per_request=2,
                doc_tokens_mean=2000.0,
                system_tokens=400,
            ),
            base_rate=15.0,
            fleet=(H100,) * 4 + (A100,) * 4,
            about="the rag workload on 4 H100 + 4 A100-40GB replicas (3x slower prefill, 30 % of the KV)",
        ),
    )
}


def offered_rps(trace: Trace) -> float:
    """Arrival rate over the middle 80 % of the arrivals (edges ramp up and drain)."""
    ts = [r.timestamp_s for r in trace.requests]
    n = len(ts)
    if n < 10:
        return n / max(ts[-1] - ts[0], 1e-9) if n > 1 else 0.0
    a, b = n // 10, n - 1 - n // 10
    return (b - a) / max(ts[b] - ts[a], 1e-9)


@functools.lru_cache(maxsize=64)
def capacity_rps(name: str, seed: int = 0) -> float:
    """The fleet's saturated throughput on this scenario's request mix (module docstring)."""
    sc = SCENARIOS[name]
    trace = sc.trace(sc.base_rate, seed)
    sample = trace.requests[:CAPACITY_SAMPLE]
    # Everything queued at once (spread over 1 ms so arrival order is kept).
    reqs = tuple(msgspec.structs.replace(r, timestamp_s=i * 1e-6) for i, r in enumerate(sample))
    one = msgspec.structs.replace(trace, requests=reqs)
    per_profile: dict[str, float] = {}
    for prof in set(sc.fleet):
        run = run_policy(one, SimConfig(replicas=1, fleet=(prof,)), "round_robin", reqs=reqs)
        per_profile[prof] = len(reqs) / max(run.sim_end_s, 1e-9)
    return sum(per_profile[p] for p in sc.fleet)


@dataclass(slots=True)
class Cell:
    scenario: str
    load: str
    trace: Trace
    capacity_rps: float
    offered_rps: float
    time_scale: float = 1.0  # < 1: the session trace's gaps were compressed to reach the load

    @property
    def utilization(self) -> float:
        return self.offered_rps / self.capacity_rps if self.capacity_rps else math.nan

    def config(self, **overrides: Any) -> SimConfig:
        fleet = SCENARIOS[self.scenario].fleet
        return SimConfig(replicas=len(fleet), fleet=fleet, **overrides)


@functools.lru_cache(maxsize=64)
def build_cell(name: str, load: str, seed: int = 0) -> Cell:
    """The scenario's trace at ``LOADS[load]`` x capacity (rate rescaled, at most 6 rounds)."""
    sc = SCENARIOS[name]
    cap = capacity_rps(name, seed)
    target = LOADS[load] * cap
    rate = sc.base_rate
    trace = sc.trace(rate, seed)
    for _ in range(6):
        got = offered_rps(trace)
        if abs(got / target - 1) <= 0.03:
            break
        rate *= target / got
        trace = sc.trace(rate, seed)
    got = offered_rps(trace)
    squeeze = 1.0
    if got < target * 0.97:
        # A session trace's rate saturates at (sessions x turns) / session length: past that, only
        # shorter gaps add load. Compress its time axis (think times and tool pauses included).
        squeeze = got / target
        reqs = tuple(msgspec.structs.replace(r, timestamp_s=r.timestamp_s * squeeze) for r in trace.requests)
        trace = msgspec.structs.replace(trace, requests=reqs)
    return Cell(name, load, trace, cap, offered_rps(trace), squeeze)


# ---- evaluation -------------------------------------------------------------------------------

KVROUTER = "cache_aware"
BASELINE = "round_robin"
PEERS: tuple[str, ...] = (
    "sglang_cache_aware",
    "llmd_default",
    "vllm_consistent_hash",
    "vllm_sticky_least_loaded",
    "sglang_sticky",
    "llmd_session_affinity",
)
METRICS = ("hit_ratio", "ttft_mean_s", "ttft_p99_s", "goodput_rps")


@dataclass(slots=True)
class CellResult:
    scenario: str
    load: str
    utilization: float
    requests: int
    time_scale: float = 1.0
    policies: dict[str, dict[str, float]] = field(default_factory=dict)

    def ratios(self, name: str = KVROUTER) -> tuple[float, float]:
        """(mean, p99) TTFT of ``name`` over the best peer's (each metric's own best)."""
        mine = self.policies[name]
        peers = [self.policies[p] for p in PEERS if p in self.policies]
        best_mean = min(p["ttft_mean_s"] for p in peers)
        best_p99 = min(p["ttft_p99_s"] for p in peers)
        return mine["ttft_mean_s"] / best_mean, mine["ttft_p99_s"] / best_p99


def run_cell(
    name: str,
    load: str,
    policies: Sequence[str],
    seed: int = 0,
    weights: Mapping[str, float] | None = None,
    load_factor: float | None = None,
) -> CellResult:
    cell = build_cell(name, load, seed)
    cfg = cell.config(seed=seed, weights=dict(weights or {}), load_factor=load_factor)
    reqs: tuple[TraceRequest, ...] = cell.trace.requests
    out = CellResult(name, load, cell.utilization, len(reqs), cell.time_scale)
    for p in policies:
        s = run_policy(cell.trace, cfg, p, reqs=reqs).summary
        out.policies[p] = {m: float(s[m]) for m in METRICS}
    return out


def _run_cell_args(
    args: tuple[str, str, tuple[str, ...], int, tuple[tuple[str, float], ...], float | None],
) -> CellResult:
    name, load, policies, seed, weights, lf = args
    return run_cell(name, load, policies, seed, dict(weights), lf)


def run_suite(
    policies: Sequence[str],
    *,
    scenarios: Sequence[str] | None = None,
    loads: Sequence[str] | None = None,
    seed: int = 0,
    weights: Mapping[str, float] | None = None,
    load_factor: float | None = None,
    jobs: int = 1,
    progress: Callable[[str], None] | None = None,
) -> list[CellResult]:
    """Every cell with every policy; ``jobs`` > 1 runs cells in that many processes."""
    cells = [(s, ld) for s in (scenarios or list(SCENARIOS)) for ld in (loads or list(LOADS))]
    args = [
        (s, ld, tuple(policies), seed, tuple(sorted((weights or {}).items())), load_factor) for s, ld in cells
    ]
    results: list[CellResult] = []
    if jobs > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(jobs) as pool:
            for r in pool.imap(_run_cell_args, args):
                results.append(r)
                if progress:
                    progress(f"{r.scenario} {r.load} done")
    else:
        for a in args:
            results.append(_run_cell_args(a))
            if progress:
                progress(f"{a[0]} {a[1]} done")
    return results


def geomean(values: Sequence[float]) -> float:
    vals = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else math.nan


def format_table(results: Sequence[CellResult], policies: Sequence[str]) -> str:
    """One markdown table: per cell and policy hit / mean / p99 TTFT / goodput, then the ratios."""
    lines = [
        "| scenario | load (util) | policy | hit | TTFT mean s | TTFT p99 s | goodput req/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for k, p in enumerate(policies):
            v = r.policies[p]
            gaps = f", gaps x{r.time_scale:.2f}" if r.time_scale < 1 else ""
            head = [r.scenario, f"{r.load} ({r.utilization:.0%}{gaps})"] if k == 0 else ["", ""]
            lines.append(
                "| "
                + " | ".join(
                    [
                        *head,
                        p,
                        f"{v['hit_ratio']:.1%}",
                        f"{v['ttft_mean_s']:.3f}",
                        f"{v['ttft_p99_s']:.3f}",
                        f"{v['goodput_rps']:.2f}",
                    ]
                )
                + " |"
            )
    lines += ["", ratio_table(results)]
    return "\n".join(lines)


def ratio_table(results: Sequence[CellResult], name: str = KVROUTER) -> str:
    lines = [
        f"{name} TTFT / best peer emulation's (lower is better; best peer per metric per cell)",
        "",
        "| scenario | load | mean | p99 |",
        "|---|---|---|---|",
    ]
    means, p99s = [], []
    for r in results:
        m, p = r.ratios(name)
        means.append(m)
        p99s.append(p)
        lines.append(f"| {r.scenario} | {r.load} | {m:.2f} | {p:.2f} |")
    lines.append(f"| **geomean** | | **{geomean(means):.3f}** | **{geomean(p99s):.3f}** |")
    return "\n".join(lines)
