"""``make compare-aiperf``: kvrouter against the real SGLang router, both driven by AIPerf (NVIDIA's
benchmark client), each in front of an identical fresh simulated fleet.

    python -m traces.aiperf_compare --tokenizer .cache/tiny-llama --out reports/compare-aiperf \\
        [--aiperf-venv .venv-aiperf] [--workloads synthetic,mooncake] [--repeat 2] ...

What operators can rerun with their own tool (docs/aiperf.md). Per workload, per repeat, per target:

1. a fresh ``kvrouter sim`` fleet (cold caches, nothing left running from the previous target), whose
   replicas tokenize with ``--tokenizer`` (a Hugging Face tokenizer folder, the tiny test model's by
   default) so the engines, kvrouter and AIPerf count the same tokens;
2. the target router in front of it: ``kvrouter serve --policy cache_aware --tokenizer DIR`` or
   ``python -m sglang_router.launch_router --policy cache_aware`` from ``.venv-peers``;
3. ``aiperf profile`` (0.13.0, from its own venv: tools/install_aiperf.sh) against the router, bounded
   by a request count and ``--benchmark-duration``, streaming chat with ``ignore_eos`` and
   ``--use-server-token-count``;
4. the replicas' ``/metrics`` before and after (engine prefix-cache hit ratio, simulated time the sim
   dropped because it fell behind: a run that dropped seconds measured a starved machine, not routing),
   the router's CPU time, and AIPerf's JSON export (``profile_export_aiperf.json``).

Workloads: ``synthetic`` (AIPerf's shared-prefix generator: a pool of long prefixes, each reused by
several requests, plus a unique suffix) and ``mooncake`` (AIPerf's ``mooncake_trace`` mode on the first
rows of the bundled Mooncake conversation trace, replayed at its recorded timestamps).

AIPerf workarounds applied here (docs/aiperf.md explains them): AIPerf 0.13.0 cannot load a local
tokenizer folder in offline mode, and its mooncake mode forces offline mode, so the folder is exposed as
a fake Hugging Face hub entry ``local/NAME`` under ``--out/hf`` with ``HF_HUB_OFFLINE=1``;
``--reset-kv-cache`` is not used (kvrouter has no ``/reset_prefix_cache``); a fresh fleet per run
gives cold caches instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from router.replicas.engine_metrics import samples

from .fleetproc import (
    PEERS_VENV,
    ROOT,
    Proc,
    ProcGroup,
    ensure_peers_venv,
    start_kvrouter,
    start_sglang_router,
    start_sim,
)

AIPERF_VERSION = "0.13.0"
AIPERF_VENV = ROOT / ".venv-aiperf"
EXPORT_FILE = "profile_export_aiperf.json"
MOONCAKE_TRACE = ROOT / "traces" / "data" / "mooncake" / "conversation_trace.jsonl"
WORKLOADS = ("synthetic", "mooncake")
TARGETS = ("kvrouter", "sglang-router")
# The files AIPerf's tokenizer loader reads from a hub snapshot (those missing in a folder are skipped).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "config.json",
    "generation_config.json",
)
# A fake commit id for the fake hub entry: any 40 hex digits.
FAKE_REVISION = "0" * 39 + "1"


# --- AIPerf's JSON export -------------------------------------------------------------------------------


class ExportError(ValueError):
    """An AIPerf export without the fields a comparison needs."""


@dataclass(frozen=True)
class AiperfSummary:
    """The numbers this comparison reads from one ``profile_export_aiperf.json`` (times in ms)."""

    aiperf_version: str
    requests_ok: int
    errors: int
    ttft_mean_ms: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_mean_ms: float
    itl_p50_ms: float
    req_per_s: float
    output_tok_per_s: float
    duration_s: float
    # AIPerf's own view of prefix reuse: usage.prompt_tokens_details.cached_tokens over prompt tokens
    # (None when the server reports no cached tokens).
    cache_read_pct: float | None
    was_cancelled: bool
    error_kinds: dict[str, int] = field(default_factory=dict)


def _stat(export: Mapping[str, Any], key: str, stat: str = "avg") -> float:
    try:
        value = export[key][stat]
    except (KeyError, TypeError) as exc:
        raise ExportError(f"AIPerf export has no {key}.{stat}") from exc
    if not isinstance(value, int | float):
        raise ExportError(f"AIPerf export {key}.{stat} is {value!r}, not a number")
    return float(value)


def _optional(export: Mapping[str, Any], key: str, stat: str = "avg") -> float | None:
    try:
        return _stat(export, key, stat)
    except ExportError:
        return None


def summarize_export(export: Mapping[str, Any]) -> AiperfSummary:
    """The comparison's numbers from a parsed AIPerf 0.13 export (schema 1.4). AIPerf writes no export
    when every request failed (it exits 1), so latency fields are required here."""
    errors: dict[str, int] = {}
    for item in export.get("error_summary") or []:
        detail = item.get("error_details") or {}
        kind = " ".join(str(detail[k]) for k in ("code", "type") if detail.get(k) is not None) or "error"
        errors[kind] = errors.get(kind, 0) + int(item.get("count", 0))
    # error_request_count is AIPerf's own total; the summary groups distinct messages (same total).
    counted = _optional(export, "error_request_count")
    n_err = int(counted) if counted is not None else sum(errors.values())
    # completed_request_count counts successes and errors; request_count only successes with records.
    ok = _optional(export, "request_count")
    if ok is None:
        completed = _optional(export, "completed_request_count")
        if completed is None:
            raise ExportError("AIPerf export has neither request_count nor completed_request_count")
        ok = completed - n_err
    return AiperfSummary(
        aiperf_version=str(export.get("aiperf_version", "?")),
        requests_ok=int(ok),
        errors=n_err,
        ttft_mean_ms=_stat(export, "time_to_first_token", "avg"),
        ttft_p50_ms=_stat(export, "time_to_first_token", "p50"),
        ttft_p99_ms=_stat(export, "time_to_first_token", "p99"),
        itl_mean_ms=_stat(export, "inter_token_latency", "avg"),
        itl_p50_ms=_stat(export, "inter_token_latency", "p50"),
        req_per_s=_optional(export, "request_throughput") or 0.0,
        output_tok_per_s=_optional(export, "output_token_throughput") or 0.0,
        duration_s=_optional(export, "benchmark_duration") or 0.0,
        cache_read_pct=_optional(export, "overall_usage_prompt_cache_read_pct"),
        was_cancelled=bool(export.get("was_cancelled", False)),
        error_kinds=errors,
    )


def parse_export(path: Path) -> AiperfSummary:
    """``summarize_export`` of a ``profile_export_aiperf.json`` file (or the artifact folder holding it)."""
    if path.is_dir():
        path = path / EXPORT_FILE
    return summarize_export(json.loads(path.read_text()))


PER_REQUEST_FILE = "profile_export.jsonl"


@dataclass(frozen=True)
class CacheSplit:
    """Mean TTFT of the successful requests that read part of their prompt from the engines' prefix cache
    (``usage.prompt_tokens_details.cached_tokens`` > 0) and of those that read none: tells placement
    (how many requests miss) apart from cost per request (how slow each kind is)."""

    cached: int
    cached_ttft_mean_ms: float
    uncached: int
    uncached_ttft_mean_ms: float


def ttft_by_cache(path: Path) -> CacheSplit:
    """``CacheSplit`` from AIPerf's per-request records (``profile_export.jsonl``, or its folder).
    Failed requests (``error`` set) and requests without a TTFT are left out."""
    if path.is_dir():
        path = path / PER_REQUEST_FILE
    cached: list[float] = []
    uncached: list[float] = []
    with path.open() as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            metrics = rec.get("metrics") or {}
            if rec.get("error") or "time_to_first_token" not in metrics:
                continue
            read = (metrics.get("usage_prompt_cache_read_tokens") or {}).get("value") or 0
            (cached if read > 0 else uncached).append(float(metrics["time_to_first_token"]["value"]))

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else math.nan

    return CacheSplit(len(cached), mean(cached), len(uncached), mean(uncached))


# --- engine metrics -------------------------------------------------------------------------------------

ENGINE_SERIES = (
    "vllm:prefix_cache_hits_total",
    "vllm:prefix_cache_queries_total",
    "vllm:request_success_total",
    "kvrouter_sim_dropped_seconds_total",
)


def engine_counters(text: str) -> dict[str, float]:
    """Each of ``ENGINE_SERIES`` summed over its label sets, from one replica's Prometheus page."""
    out = dict.fromkeys(ENGINE_SERIES, 0.0)
    for name, _labels, value in samples(text, names=out):
        out[name] += value
    return out


def scrape_engines(urls: Sequence[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for u in urls:
        with urllib.request.urlopen(u.rstrip("/") + "/metrics", timeout=10) as r:
            out[u] = engine_counters(r.read().decode())
    return out


@dataclass(frozen=True)
class EngineDelta:
    hit_ratio: float
    requests_per_replica: list[int]
    dropped_s: float


def engine_delta(
    before: Mapping[str, Mapping[str, float]], after: Mapping[str, Mapping[str, float]]
) -> EngineDelta:
    d = {u: {k: after[u][k] - before.get(u, {}).get(k, 0.0) for k in ENGINE_SERIES} for u in after}
    hits = sum(x["vllm:prefix_cache_hits_total"] for x in d.values())
    queries = sum(x["vllm:prefix_cache_queries_total"] for x in d.values())
    return EngineDelta(
        hit_ratio=hits / queries if queries else math.nan,
        requests_per_replica=[int(x["vllm:request_success_total"]) for x in d.values()],
        dropped_s=sum(x["kvrouter_sim_dropped_seconds_total"] for x in d.values()),
    )


def group_cpu_seconds(pid: int) -> float:
    """utime + stime of every live process in ``pid``'s process group (the router and any workers it
    started; fleetproc starts each in its own session, so the group is exactly the router)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        # fields[0] is field 3 (state): pgrp is field 5, utime 14, stime 15.
        if int(fields[2]) == pid:
            total += int(fields[11]) + int(fields[12])
    return total / tick


# --- AIPerf invocation ----------------------------------------------------------------------------------


def fake_hub_tokenizer(folder: Path, hf_home: Path) -> str:
    """Expose a local tokenizer folder as hub model ``local/NAME`` in ``hf_home``'s cache; returns the name.

    AIPerf 0.13.0 loads tokenizers with ``snapshot_download(local_files_only=True)`` in offline mode,
    which rejects a filesystem path, and its mooncake mode forces offline mode in its workers; a hub-cache
    entry (refs/main -> a snapshot folder holding the files) is what offline mode does accept."""
    name = folder.resolve().name
    entry = hf_home / "hub" / f"models--local--{name}"
    snap = entry / "snapshots" / FAKE_REVISION
    snap.mkdir(parents=True, exist_ok=True)
    (entry / "refs").mkdir(exist_ok=True)
    (entry / "refs" / "main").write_text(FAKE_REVISION)
    for f in TOKENIZER_FILES:
        if (folder / f).is_file():
            shutil.copyfile(folder / f, snap / f)
    if not (snap / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{folder} has no tokenizer.json")
    return f"local/{name}"


def mooncake_window(src: Path, rows: int, dest: Path, slowdown: float = 1.0) -> tuple[int, float]:
    """The first ``rows`` rows of a Mooncake trace with timestamps made relative to the first row (AIPerf's
    fixed schedule starts at the first timestamp anyway; this keeps the file honest on its own) and
    multiplied by ``slowdown``: AIPerf 0.13 cannot slow a Mooncake replay down, and a small machine
    that runs AIPerf, the router and the sim side by side may need the offered load lowered.
    Returns (rows written, span in seconds)."""
    if slowdown <= 0:
        raise ValueError(f"slowdown must be > 0, got {slowdown}")
    out: list[str] = []
    t0: float | None = None
    last = 0.0
    with src.open() as f:
        for line in f:
            if len(out) >= rows:
                break
            if not line.strip():
                continue
            row = json.loads(line)
            t0 = row["timestamp"] if t0 is None else t0
            row["timestamp"] = round((row["timestamp"] - t0) * slowdown)
            last = row["timestamp"]
            out.append(json.dumps(row))
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("\n".join(out) + "\n")
    return len(out), last / 1000.0


@dataclass(frozen=True)
class Workload:
    name: str
    args: list[str]
    describe: str


def synthetic_workload(args: argparse.Namespace) -> Workload:
    flags = [
        "--isl",
        str(args.isl),
        "--osl",
        str(args.osl),
        "--num-prefix-prompts",
        str(args.prefixes),
        "--prefix-prompt-length",
        str(args.prefix_length),
        "--request-count",
        str(args.requests),
        "--concurrency",
        str(args.concurrency),
    ]
    reuse = args.requests / args.prefixes
    return Workload(
        "synthetic",
        flags,
        f"AIPerf shared-prefix synthetic: {args.requests} requests at concurrency {args.concurrency}, "
        f"{args.prefixes} prefixes of {args.prefix_length} tokens (~{reuse:.0f} uses each) + a "
        f"{args.isl}-token unique suffix, {args.osl} output tokens",
    )


def mooncake_workload(args: argparse.Namespace, out: Path) -> Workload:
    window = out / "mooncake_window.jsonl"
    n, span = mooncake_window(Path(args.mooncake_trace), args.mooncake_rows, window, args.mooncake_slowdown)
    rate = "recorded" if args.mooncake_slowdown == 1 else f"x{args.mooncake_slowdown:g} stretched"
    flags = [
        "--custom-dataset-type",
        "mooncake_trace",
        "--input-file",
        str(window),
        "--fixed-schedule",
    ]
    return Workload(
        "mooncake",
        flags,
        f"AIPerf mooncake_trace: the first {n} rows of {Path(args.mooncake_trace).name} at their {rate} "
        f"timestamps ({span:.0f} s), prompts synthesized by AIPerf to each row's input_length",
    )


def aiperf_command(
    aiperf: Path, url: str, model: str, tokenizer: str, workload: Workload, artifacts: Path, duration_s: float
) -> list[str]:
    return [
        str(aiperf),
        "profile",
        "--model",
        model,
        "--url",
        url,
        "--endpoint-type",
        "chat",
        "--streaming",
        *workload.args,
        "--benchmark-duration",
        f"{duration_s:g}",
        "--benchmark-grace-period",
        "30",
        "--tokenizer",
        tokenizer,
        "--random-seed",
        "42",
        "--use-server-token-count",
        "--extra-inputs",
        "ignore_eos:true",
        "--ui-type",
        "none",
        "--no-server-metrics",
        "--no-gpu-telemetry",
        "--artifact-dir",
        str(artifacts),
    ]


# --- one run --------------------------------------------------------------------------------------------


# More simulated time dropped than this and a run is flagged (docs/aiperf.md, "Reading the table").
MAX_DROPPED_S = 3.0


@dataclass
class RunResult:
    workload: str
    repeat: int
    target: str
    aiperf: AiperfSummary | None = None
    engines: EngineDelta | None = None
    split: CacheSplit | None = None
    router_cpu_s: float | None = None
    load_before: float = 0.0
    load_after: float = 0.0
    error: str | None = None

    def starved(self, max_dropped_s: float = MAX_DROPPED_S) -> bool:
        """The sim fell behind by more than ``max_dropped_s`` of simulated time: the run measured a
        CPU-starved machine (AIPerf, the routers and the sim share the cores), not routing."""
        return self.engines is not None and self.engines.dropped_s > max_dropped_s


StartRouter = Callable[[ProcGroup, Sequence[str]], tuple[Proc, str]]


def run_one(
    args: argparse.Namespace,
    workload: Workload,
    repeat: int,
    target: str,
    start_router: StartRouter,
    hub_tokenizer: str,
    out: Path,
) -> RunResult:
    res = RunResult(workload.name, repeat, target, load_before=os.getloadavg()[0])
    run_dir = out / "runs" / f"{workload.name}-{repeat}-{target}"
    shutil.rmtree(run_dir, ignore_errors=True)
    group = ProcGroup(run_dir / "logs")
    try:
        _, urls = start_sim(
            group,
            replicas=args.replicas,
            profile=args.profile,
            model=args.model,
            time_scale=args.time_scale,
            extra=["--tokenizer", str(args.tokenizer), "--seed", "0"],
        )
        router, url = start_router(group, urls)
        before = scrape_engines(urls)
        cmd = aiperf_command(
            Path(args.aiperf_venv) / "bin" / "aiperf",
            url,
            args.model,
            hub_tokenizer,
            workload,
            run_dir / "aiperf",
            args.duration,
        )
        env = {"HF_HOME": str(out / "hf"), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
        log(f"  {workload.name} #{repeat} {target}: aiperf against {url} ...")
        client = group.start(cmd, "aiperf", env=env)
        # AIPerf spends 20-50 s of its own starting up and exporting on 2 cores, beyond the benchmark.
        limit = args.duration + 30 + args.aiperf_overhead
        try:
            rc = client.p.wait(limit)
        except subprocess.TimeoutExpired:
            client.stop()
            raise RuntimeError(f"aiperf still running after {limit:g} s; stopped") from None
        res.router_cpu_s = group_cpu_seconds(router.p.pid)
        res.engines = engine_delta(before, scrape_engines(urls))
        if rc != 0:
            raise RuntimeError(f"aiperf exited {rc}:\n{client.log(2000)}")
        res.aiperf = parse_export(run_dir / "aiperf")
        res.split = ttft_by_cache(run_dir / "aiperf")
    except (RuntimeError, TimeoutError, OSError, ExportError) as exc:
        res.error = str(exc)[-1500:]
        log(f"  {workload.name} #{repeat} {target} failed: {res.error}")
    finally:
        group.close()
        res.load_after = os.getloadavg()[0]
    return res


# --- report ---------------------------------------------------------------------------------------------

COLUMNS = (
    "workload",
    "run",
    "target",
    "ok/err",
    "TTFT mean ms",
    "TTFT p50",
    "TTFT p99",
    "TTFT cached (n)",
    "TTFT uncached (n)",
    "ITL mean ms",
    "req/s",
    "engine hit",
    "AIPerf cached %",
    "sim dropped s",
    "router CPU s",
    "load",
)


def _f(x: float | None, fmt: str = ".1f") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _split(mean_ms: float, n: int) -> str:
    return f"{_f(mean_ms)} ({n})"


def table_rows(results: Sequence[RunResult]) -> list[list[str]]:
    rows = []
    for r in results:
        a, e = r.aiperf, r.engines
        head = [r.workload, str(r.repeat) + (" starved" if r.starved() else ""), r.target]
        if a is None:
            rows.append([*head, "failed", *["—"] * (len(COLUMNS) - 4)])
            continue
        rows.append(
            [
                *head,
                f"{a.requests_ok}/{a.errors}",
                _f(a.ttft_mean_ms),
                _f(a.ttft_p50_ms),
                _f(a.ttft_p99_ms),
                _split(r.split.cached_ttft_mean_ms, r.split.cached) if r.split else "—",
                _split(r.split.uncached_ttft_mean_ms, r.split.uncached) if r.split else "—",
                _f(a.itl_mean_ms, ".2f"),
                _f(a.req_per_s, ".2f"),
                _f(e.hit_ratio if e else None, ".3f"),
                _f(a.cache_read_pct),
                _f(e.dropped_s if e else None),
                _f(r.router_cpu_s),
                f"{r.load_before:.1f}→{r.load_after:.1f}",
            ]
        )
    return rows


def ratio_rows(results: Sequence[RunResult], base: str = "sglang-router", new: str = "kvrouter") -> list[str]:
    """Per workload and repeat: kvrouter / SGLang router on TTFT mean, p50, p99 (below 1: kvrouter better)."""
    lines = []
    by = {(r.workload, r.repeat, r.target): r for r in results}
    for (wl, rep, tgt), ra in by.items():
        rb = by.get((wl, rep, base))
        a, b = ra.aiperf, rb.aiperf if rb is not None else None
        if tgt != new or rb is None or a is None or b is None:
            continue
        parts = [
            f"{name} {x / y:.2f}"
            for name, x, y in (
                ("TTFT mean", a.ttft_mean_ms, b.ttft_mean_ms),
                ("p50", a.ttft_p50_ms, b.ttft_p50_ms),
                ("p99", a.ttft_p99_ms, b.ttft_p99_ms),
            )
            if y > 0
        ]
        flag = " (starved: not a routing measurement)" if ra.starved() or rb.starved() else ""
        lines.append(f"{wl} run {rep}: {new} / {base}: " + ", ".join(parts) + flag)
    return lines


def markdown_table(rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(COLUMNS)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*COLUMNS), *(fmt.format(*r) for r in rows)])


# --- main -----------------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _sigterm(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m traces.aiperf_compare", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="reports/compare-aiperf", help="report folder")
    p.add_argument(
        "--tokenizer",
        default=os.environ.get("KVROUTER_TINY_MODEL", str(ROOT / ".cache" / "tiny-llama")),
        help="Hugging Face tokenizer folder for the sim, kvrouter and AIPerf (default: the tiny test model)",
    )
    p.add_argument("--model", default=None, help="served model name (default: the tokenizer folder's name)")
    p.add_argument(
        "--aiperf-venv", default=str(AIPERF_VENV), help="virtualenv with aiperf (tools/install_aiperf.sh)"
    )
    p.add_argument("--peers-venv", default=str(PEERS_VENV), help="virtualenv with sglang-router")
    p.add_argument("--no-install", action="store_true", help="do not create the peers' virtualenv")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated: synthetic, mooncake")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated: kvrouter, sglang-router")
    p.add_argument("--repeat", type=int, default=1, help="runs per workload and target (order alternates)")
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--profile", default="h100-llama3-8b", help="sim engine profile")
    p.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="sim speed against real H100 time (default 1: AIPerf shares the cores, and a faster sim falls behind)",
    )
    p.add_argument("--requests", type=int, default=100, help="synthetic: requests (default 100)")
    p.add_argument("--concurrency", type=int, default=8, help="synthetic: concurrency (default 8)")
    p.add_argument("--prefixes", type=int, default=25, help="synthetic: shared prefixes (default 25)")
    p.add_argument("--prefix-length", type=int, default=4096, help="synthetic: prefix tokens (default 4096)")
    p.add_argument("--isl", type=int, default=256, help="synthetic: unique suffix tokens (default 256)")
    p.add_argument("--osl", type=int, default=128, help="synthetic: output tokens (default 128)")
    p.add_argument(
        "--mooncake-trace", default=str(MOONCAKE_TRACE), help="Mooncake trace for the mooncake workload"
    )
    p.add_argument(
        "--mooncake-rows", type=int, default=100, help="mooncake: first N rows (default 100, 33 s)"
    )
    p.add_argument(
        "--mooncake-slowdown",
        type=float,
        default=1.0,
        help="mooncake: multiply the timestamps (2 = half the recorded request rate; default 1)",
    )
    p.add_argument("--duration", type=float, default=120.0, help="AIPerf --benchmark-duration per run (s)")
    p.add_argument(
        "--aiperf-overhead", type=float, default=180.0, help="seconds AIPerf may take beyond duration + grace"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    args.tokenizer = Path(args.tokenizer).resolve()
    args.model = args.model or args.tokenizer.name
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    aiperf = Path(args.aiperf_venv) / "bin" / "aiperf"
    if not aiperf.exists():
        log(f"{aiperf} not found: run `make aiperf-env` (tools/install_aiperf.sh {args.aiperf_venv}) first")
        return 2
    if not (args.tokenizer / "tokenizer.json").is_file():
        log(f"{args.tokenizer} has no tokenizer.json (build the tiny model: `make tiny-model`)")
        return 2
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if set(workloads) - set(WORKLOADS) or set(targets) - set(TARGETS) or not workloads or not targets:
        log(f"workloads must be among {WORKLOADS}, targets among {TARGETS}")
        return 2
    peers = Path(args.peers_venv)
    if "sglang-router" in targets:
        if args.no_install and not (peers / "bin" / "python").exists():
            log(f"{peers} does not exist and --no-install was given")
            return 2
        err = None if args.no_install else ensure_peers_venv(peers)
        if err:
            log(f"sglang-router unavailable: {err}")
            return 2
    hub_name = fake_hub_tokenizer(args.tokenizer, out / "hf")
    kv_extra = ["--tokenizer", str(args.tokenizer), "--log-level", "warning"]
    starters: dict[str, StartRouter] = {
        "kvrouter": lambda g, urls: start_kvrouter(g, urls, "cache_aware", "kvrouter", extra=kv_extra),
        "sglang-router": lambda g, urls: start_sglang_router(g, urls, venv=peers),
    }
    built = {"synthetic": lambda: synthetic_workload(args), "mooncake": lambda: mooncake_workload(args, out)}
    plan = [built[w]() for w in workloads]
    results: list[RunResult] = []
    t0 = time.monotonic()
    try:
        for wl in plan:
            log(f"{wl.name}: {wl.describe}")
            for rep in range(1, args.repeat + 1):
                # Alternate the order between repeats, so drift in the machine's load favours no one.
                order = targets if rep % 2 else list(reversed(targets))
                for tgt in order:
                    results.append(run_one(args, wl, rep, tgt, starters[tgt], hub_name, out))
    except KeyboardInterrupt:
        log("interrupted: every process stopped")
        return 130
    rows = table_rows(results)
    ratios = ratio_rows(results)
    print(text_table(rows))
    for line in ratios:
        print(line)
    notes = [
        f"{args.replicas} x `kvrouter sim --profile {args.profile} --time-scale {args.time_scale:g} "
        f"--tokenizer {args.tokenizer.name}`, a fresh fleet per run; kvrouter `--policy cache_aware "
        f"--tokenizer`, SGLang router `--policy cache_aware` (sglang-router from {peers.name}).",
        *[f"{w.name}: {w.describe}." for w in plan],
        "TTFT cached / uncached: mean TTFT (and count) of the requests that read some / none of their "
        "prompt from the prefix cache, from AIPerf's per-request records.",
        "engine hit: prefix-cache hit tokens / queried tokens over the run, from the replicas' /metrics; "
        "AIPerf cached %: usage cached_tokens / prompt tokens as AIPerf saw them.",
        "sim dropped s: simulated time the sim lost because it fell behind (CPU starvation); "
        f"runs with more than {MAX_DROPPED_S:g} s are marked starved: they measure the machine, not the router.",
    ]
    report = [
        "# kvrouter vs SGLang router under AIPerf",
        "",
        f"`python -m traces.aiperf_compare {' '.join(sys.argv[1:] if argv is None else argv)}`",
        "",
        markdown_table(rows),
        "",
        *[f"- {x}" for x in ratios],
        "",
        *[f"- {n}" for n in notes],
        *[f"- {r.workload} #{r.repeat} {r.target} failed: {r.error}" for r in results if r.error],
        "",
    ]
    (out / "report.md").write_text("\n".join(report))
    (out / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=1, default=str))
    log(f"done in {time.monotonic() - t0:.0f} s: {out / 'report.md'}, {out / 'results.json'}")
    with contextlib.suppress(OSError):
        shutil.rmtree(out / "hf")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
