"""Live trace replay: send a trace's requests to OpenAI-compatible targets, open loop, and record each one.

Open loop means arrivals follow the trace clock (``timestamp_s / speedup``) whatever the
responses do: a slow target accumulates requests in flight instead of slowing the offered load,
which is what a router is judged on. Each target is replayed on its own, one after another, with
the same prompts; the caller owns resetting engine state between targets (``reset_prefix_cache``
here is a helper for that).

Every request sent becomes one ``RequestRecord``: send time, TTFT, inter-token latencies, e2e,
tokens, ``cached_tokens`` from the usage chunk, the replica (``x-kvrouter-replica`` header when
present), HTTP status, or the error. Requests still running when the run ends get ``grace_s``
to finish, then are cancelled and recorded as errors, so a run always stops by itself.

The client must never be the bottleneck: request bodies are encoded before the clock starts,
one ``aiohttp`` session with no connection cap serves every request, and SSE lines are decoded
with msgspec. ``lateness`` in the summary (actual send minus scheduled send) shows whether the
client kept up.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import aiohttp
import msgspec

from router.replicas.engine_metrics import parse_labels, samples

from .closed_loop import session_completion
from .model import Trace, TraceRequest
from .records import SLO, RequestRecord, percentile, summarize
from .synth import PromptSynth

REPLICA_HEADER = "x-kvrouter-replica"
SESSION_HEADER = "x-session-id"  # the trace's session_id, the header vllm-router and kvrouter read
_BASE_HEADERS = {"Content-Type": "application/json", "Accept": "text/event-stream"}
PromptMode = Literal["tokens", "text"]


class Target(msgspec.Struct, frozen=True):
    name: str
    url: str  # base URL, e.g. http://127.0.0.1:8000

    @classmethod
    def parse(cls, spec: str) -> Target:
        """``NAME=URL`` (or a bare URL, named after its host:port)."""
        name, sep, url = spec.partition("=")
        if not sep:
            url, name = spec, spec.split("://", 1)[-1].rstrip("/").replace("/", "_").replace(":", "_")
        if not url.startswith(("http://", "https://")) or not name:
            raise ValueError(f"target must be NAME=http://host:port, got {spec!r}")
        return cls(name=name, url=url.rstrip("/"))


class ReplayConfig(msgspec.Struct, kw_only=True):
    speedup: float = 1.0  # trace time / speedup = send time
    max_requests: int | None = None
    duration_s: float | None = None  # last send no later than this (wall seconds after start)
    prompt: PromptMode = "tokens"
    model: str | None = None  # None: the first id in the target's /v1/models
    concurrency_limit: int | None = None  # client-side cap on requests in flight (None: open loop)
    grace_s: float = 30.0  # after the last send, how long pending requests may still run
    request_timeout_s: float = 600.0
    slo: SLO = SLO()
    endpoint: str = "/v1/completions"
    # Closed loop (traces/replay_closed.py): a session's turn waits for its previous turn plus the
    # tool pause; decode_tps is the decode speed the trace assumed (None: 50 tokens/s).
    closed_loop: bool = False
    decode_tps: float | None = None


# --- the plan: which requests, when, with which body -----------------------------------------


class Planned(msgspec.Struct, frozen=True):
    req: TraceRequest
    at_s: float  # scheduled send, seconds after the start
    body: bytes


_enc = msgspec.json.Encoder()


def select_requests(trace: Trace, cfg: ReplayConfig) -> list[TraceRequest]:
    """The requests a run sends: trace order, cut by ``max_requests`` and ``duration_s``."""
    out: list[TraceRequest] = []
    for r in trace.requests:
        if cfg.max_requests is not None and len(out) >= cfg.max_requests:
            break
        if cfg.duration_s is not None and r.timestamp_s / cfg.speedup > cfg.duration_s:
            break
        out.append(r)
    return out


def plan(trace: Trace, cfg: ReplayConfig, model: str) -> list[Planned]:
    """Encode every body up front: building a 100k-token prompt must not delay its send."""
    if cfg.speedup <= 0:
        raise ValueError("speedup must be > 0")
    synth = PromptSynth(block_tokens=max(trace.block_tokens, 1))
    planned: list[Planned] = []
    for r in select_requests(trace, cfg):
        prompt: Any = synth.token_ids(r) if cfg.prompt == "tokens" else synth.text(r)
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": max(r.output_length, 1),
            # The trace's output length is the work the engine must do: no early EOS.
            "min_tokens": max(r.output_length, 1),
            "ignore_eos": True,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        planned.append(Planned(req=r, at_s=r.timestamp_s / cfg.speedup, body=_enc.encode(body)))
    return planned


# --- one request ----------------------------------------------------------------------------------


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    text: str | None = None  # /v1/completions
    delta: _Delta | None = None  # /v1/chat/completions


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = []
    usage: dict[str, Any] | None = None


def _read_usage(rec: RequestRecord, usage: dict[str, Any]) -> None:
    if usage.get("completion_tokens") is not None:
        rec.output_tokens = int(usage["completion_tokens"])
    if usage.get("prompt_tokens") is not None:
        rec.prompt_tokens = int(usage["prompt_tokens"])
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict) and details.get("cached_tokens") is not None:
        rec.cached_tokens = int(details["cached_tokens"])


_chunk_dec = msgspec.json.Decoder(_Chunk)


def _headers(r: TraceRequest) -> dict[str, str]:
    return _BASE_HEADERS if r.session_id is None else {**_BASE_HEADERS, SESSION_HEADER: r.session_id}


async def _send_one(  # noqa: C901 -- one SSE read loop: status, framing, usage and timing in order
    session: aiohttp.ClientSession,
    target: Target,
    cfg: ReplayConfig,
    p: Planned,
    t0: float,
    rec: RequestRecord,
) -> None:
    """Fill ``rec`` in place, so a cancelled request keeps what it had received."""
    start = time.perf_counter()
    rec.send_s = start - t0
    last: float | None = None
    chunks = 0
    try:
        async with session.post(
            target.url + cfg.endpoint,
            data=p.body,
            headers=_headers(p.req),
        ) as resp:
            rec.status = resp.status
            rec.replica = resp.headers.get(REPLICA_HEADER)
            if resp.status != 200:
                text = (await resp.content.read(2000)).decode(errors="replace")
                rec.error = f"HTTP {resp.status}: {text.strip()[:300]}"
                return
            done = False
            buf = b""
            # iter_any: whatever bytes arrived, often several SSE events at once under load, so
            # the client spends one wakeup per network read rather than one per token. Tokens
            # that arrive in one read share its timestamp (an inter-token latency of 0): that is
            # what a client of this server sees.
            async for data_in in resp.content.iter_any():
                now = time.perf_counter()
                buf += data_in
                *lines, buf = buf.split(b"\n")
                for raw in lines:
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = True
                        break
                    try:
                        chunk = _chunk_dec.decode(data)
                    except msgspec.DecodeError:
                        rec.error = f"bad SSE data: {data[:120]!r}"
                        return
                    if chunk.usage:
                        _read_usage(rec, chunk.usage)
                    if any(c.text or (c.delta is not None and c.delta.content) for c in chunk.choices):
                        chunks += 1
                        if last is None:
                            rec.ttft_s = now - start
                        else:
                            rec.itl_s.append(now - last)
                        last = now
                if done:
                    break
            end = time.perf_counter()
            if not done:
                rec.error = "stream ended without [DONE]"
            if rec.output_tokens == 0:
                rec.output_tokens = chunks
            if rec.ttft_s is None and rec.error is None:
                rec.error = "no tokens received"
            rec.e2e_s = end - start
    except asyncio.CancelledError:
        rec.error = rec.error or "cancelled: still running when the grace period ended"
        raise
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        if rec.error is not None:
            rec.e2e_s = None  # records.py: e2e is None for failed requests (a partial TTFT is kept)
            if rec.output_tokens == 0:
                rec.output_tokens = chunks


# --- one target -----------------------------------------------------------------------------------


class TargetRun(msgspec.Struct, kw_only=True):
    target: Target
    records: list[RequestRecord]
    wall_s: float  # start -> last request settled
    lateness_p99_s: float  # actual send - scheduled send
    lateness_max_s: float
    cancelled: int


def new_session(limit: int = 0) -> aiohttp.ClientSession:
    # limit=0: no connection cap, every request in flight gets its own connection.
    conn = aiohttp.TCPConnector(limit=limit, limit_per_host=0, force_close=False, enable_cleanup_closed=True)
    return aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))


async def run_target(  # noqa: C901 -- the open-loop send schedule and its settle/cancel ends together
    target: Target,
    planned: Sequence[Planned],
    cfg: ReplayConfig,
    *,
    session: aiohttp.ClientSession | None = None,
    progress: Callable[[str], None] | None = None,
) -> TargetRun:
    """Send ``planned`` to one target on the trace clock; return when every request has settled."""
    own = session is None
    sess = session or new_session()
    if cfg.closed_loop:
        from .replay_closed import run_target_closed

        try:
            return await run_target_closed(target, planned, cfg, sess=sess, progress=progress)
        finally:
            if own:
                await sess.close()
    records: list[RequestRecord] = []
    tasks: list[asyncio.Task[None]] = []
    lateness: list[float] = []
    sem = asyncio.Semaphore(cfg.concurrency_limit) if cfg.concurrency_limit else None
    timeout = cfg.request_timeout_s

    async def one(p: Planned, rec: RequestRecord) -> None:
        if sem is None:
            await asyncio.wait_for(_send_one(sess, target, cfg, p, t0, rec), timeout)
            return
        async with sem:  # a client-side cap: queueing here counts in TTFT (measured from now)
            await asyncio.wait_for(_send_one(sess, target, cfg, p, t0, rec), timeout)

    async def guarded(p: Planned, rec: RequestRecord) -> None:
        try:
            await one(p, rec)
        except TimeoutError:
            rec.error = f"timeout after {timeout:g} s"  # wait_for's cancel set a 'cancelled' message
            rec.e2e_s = None

    try:
        t0 = time.perf_counter()
        next_report = t0 + 5.0
        for i, p in enumerate(planned):
            delay = t0 + p.at_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.perf_counter()
            lateness.append(max(0.0, now - t0 - p.at_s))
            rec = RequestRecord(
                request_id=p.req.request_id,
                target=target.name,
                send_s=now - t0,
                prompt_tokens=p.req.input_length,
            )
            records.append(rec)
            tasks.append(asyncio.create_task(guarded(p, rec)))
            if progress is not None and now >= next_report:
                running = sum(1 for t in tasks if not t.done())
                progress(
                    f"  {target.name}: sent {i + 1}/{len(planned)}, {running} in flight, t={now - t0:.0f}s"
                )
                next_report = now + 5.0
        cancelled = 0
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=cfg.grace_s)
            for t in pending:
                t.cancel()
            cancelled = len(pending)
            if pending:
                await asyncio.wait(pending, timeout=5.0)
        wall = time.perf_counter() - t0
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        if own:
            await sess.close()
    return finish_run(target, records, wall, lateness, cancelled)


def finish_run(
    target: Target, records: list[RequestRecord], wall_s: float, lateness: list[float], cancelled: int
) -> TargetRun:
    """One target's run as the report reads it (open and closed loop): a request cancelled at the end
    has no end-to-end time, and how late the sends were is summarised."""
    for rec in records:
        if rec.error is not None and rec.error.startswith("cancelled"):
            rec.e2e_s = None
    return TargetRun(
        target=target,
        records=records,
        wall_s=wall_s,
        lateness_p99_s=percentile(lateness, 99) if lateness else 0.0,
        lateness_max_s=max(lateness, default=0.0),
        cancelled=cancelled,
    )


# --- engine metrics ---------------------------------------------------------------------------------

ENGINE_COUNTERS = (
    "vllm:prefix_cache_hits_total",
    "vllm:prefix_cache_queries_total",
    "vllm:request_success_total",
    "vllm:prompt_tokens_total",
    # The simulator's engine-loop lag (absent on real vLLM: stays 0): how late steps woke up, so a
    # report can tell when the simulated fleet fell behind real time (e.g. a CPU-starved machine).
    "kvrouter_sim_step_lag_seconds_sum",
    "kvrouter_sim_step_lag_seconds_count",
    # PD fleets: one NIXL read per split request on its decode replica (real vLLM and the sim).
    "vllm:nixl_xfer_time_seconds_count",
)


def engine_base(url: str) -> str:
    url = url.rstrip("/")
    return url[: -len("/metrics")] if url.endswith("/metrics") else url


def parse_prometheus(text: str, names: Sequence[str] = ENGINE_COUNTERS) -> dict[str, float]:
    """Sum each named sample over its label sets (one engine per replica; DP ranks add up)."""
    out = dict.fromkeys(names, 0.0)
    for name, _labels, value in samples(text, names=out):
        out[name] += value
    return out


def parse_cache_config(text: str) -> dict[str, str]:
    """Labels of ``vllm:cache_config_info`` (block_size, num_gpu_blocks, ...); empty if absent."""
    for line in text.splitlines():
        if line.startswith("vllm:cache_config_info{"):
            return parse_labels(line[line.index("{") + 1 : line.rindex("}")])
    return {}


async def scrape(session: aiohttp.ClientSession, urls: Sequence[str]) -> dict[str, str]:
    """Raw /metrics text per engine base URL; an unreachable engine maps to ''."""

    async def one(u: str) -> tuple[str, str]:
        try:
            async with session.get(engine_base(u) + "/metrics", timeout=aiohttp.ClientTimeout(total=10)) as r:
                return u, await r.text() if r.status == 200 else ""
        except (TimeoutError, aiohttp.ClientError, OSError):
            return u, ""

    return dict(await asyncio.gather(*(one(u) for u in urls)))


def engine_delta(before: dict[str, str], after: dict[str, str]) -> dict[str, Any]:
    """Prefix-cache hit ratio and per-replica requests from counter deltas over one target's run."""
    per: dict[str, dict[str, float]] = {}
    for u in after:
        b, a = parse_prometheus(before.get(u, "")), parse_prometheus(after[u])
        per[engine_base(u)] = {k: a[k] - b[k] for k in ENGINE_COUNTERS}
    hits = sum(d["vllm:prefix_cache_hits_total"] for d in per.values())
    queries = sum(d["vllm:prefix_cache_queries_total"] for d in per.values())
    lag_sum = sum(d["kvrouter_sim_step_lag_seconds_sum"] for d in per.values())
    lag_n = sum(d["kvrouter_sim_step_lag_seconds_count"] for d in per.values())
    return {
        "hit_ratio": hits / queries if queries else math.nan,
        "sim_step_lag_mean_s": lag_sum / lag_n if lag_n else None,
        "hits_tokens": hits,
        "queries_tokens": queries,
        "kv_transfers": sum(d["vllm:nixl_xfer_time_seconds_count"] for d in per.values()),
        "requests_per_replica": {u: d["vllm:request_success_total"] for u, d in per.items()},
        "prompt_tokens_per_replica": {u: d["vllm:prompt_tokens_total"] for u, d in per.items()},
    }


def fleet_cache_tokens(metrics: dict[str, str]) -> int | None:
    """Total GPU KV capacity of the engines (tokens), from ``vllm:cache_config_info``."""
    total = 0
    for text in metrics.values():
        cfg = parse_cache_config(text)
        try:
            # vLLM reserves one null block, so usable blocks are num_gpu_blocks - 1.
            total += int(cfg["block_size"]) * max(int(cfg["num_gpu_blocks"]) - 1, 0)
        except (KeyError, ValueError):
            return None
    return total or None


async def reset_prefix_cache(session: aiohttp.ClientSession, urls: Sequence[str], attempts: int = 50) -> None:
    """POST /reset_prefix_cache on every engine; vLLM refuses while blocks are in use, so retry briefly."""
    for u in urls:
        for i in range(attempts):
            try:
                async with session.post(engine_base(u) + "/reset_prefix_cache") as r:
                    if r.status == 200:
                        break
            except (aiohttp.ClientError, OSError):
                pass
            if i == attempts - 1:
                raise RuntimeError(f"{u}: reset_prefix_cache kept failing")
            await asyncio.sleep(0.1)


async def wait_idle(session: aiohttp.ClientSession, urls: Sequence[str], timeout_s: float = 30.0) -> bool:
    """Wait until no engine runs or queues a request (leftovers of the previous target: a router
    may keep an upstream request going after its client gave up). False if still busy at the end."""
    names = ("vllm:num_requests_running", "vllm:num_requests_waiting")
    deadline = time.monotonic() + timeout_s
    while True:
        texts = await scrape(session, urls)
        busy = sum(sum(parse_prometheus(t, names).values()) for t in texts.values())
        if busy == 0:
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.2)


async def detect_model(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url.rstrip("/") + "/v1/models", timeout=aiohttp.ClientTimeout(total=10)) as r:
        body = await r.json(content_type=None)
    return str(body["data"][0]["id"])


# --- a whole replay -----------------------------------------------------------------------------------


def target_summary(run: TargetRun, cfg: ReplayConfig, engine: dict[str, Any] | None) -> dict[str, Any]:
    s = summarize(run.records, slo=cfg.slo)
    s["client"] = {
        "wall_s": run.wall_s,
        "send_lateness_p99_s": run.lateness_p99_s,
        "send_lateness_max_s": run.lateness_max_s,
        "cancelled": run.cancelled,
    }
    if engine is not None:
        s["engine"] = engine
        s["engine_hit_ratio"] = engine["hit_ratio"]
        if engine.get("kv_transfers") and run.records:  # a PD fleet: the share of requests split
            s["split_share"] = engine["kv_transfers"] / len(run.records)
    return s


async def replay(
    trace: Trace,
    targets: Sequence[Target],
    cfg: ReplayConfig,
    *,
    engine_urls: Sequence[str] = (),
    reset_between: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Replay ``trace`` against each target in turn. Returns ``{"runs": {name: TargetRun}, "summary": ...}``."""
    async with new_session() as session:
        model = cfg.model or await detect_model(session, targets[0].url)
        planned = plan(trace, cfg, model)
        runs: dict[str, TargetRun] = {}
        summaries: dict[str, Any] = {}
        fleet_tokens: int | None = None
        for tgt in targets:
            if engine_urls and not await wait_idle(session, engine_urls) and progress is not None:
                progress("  warning: engines still busy with the previous target's requests after 30 s")
            if reset_between and engine_urls:
                await reset_prefix_cache(session, engine_urls)
            before = await scrape(session, engine_urls) if engine_urls else {}
            if fleet_tokens is None and before:
                fleet_tokens = fleet_cache_tokens(before)
            if progress is not None:
                progress(
                    f"replaying {len(planned)} requests to {tgt.name} ({tgt.url}), speed-up {cfg.speedup:g}"
                )
            run = await run_target(tgt, planned, cfg, session=session, progress=progress)
            engine = engine_delta(before, await scrape(session, engine_urls)) if engine_urls else None
            runs[tgt.name] = run
            summaries[tgt.name] = target_summary(run, cfg, engine)
            reqs = [p.req for p in planned]
            if any(r.session_id is not None for r in reqs):
                recs = {r.request_id: r for r in run.records}
                summaries[tgt.name].update(session_completion(reqs, recs))
        return {
            "runs": runs,
            "summary": {
                "trace": trace.name,
                "requests": len(planned),
                "model": model,
                "config": msgspec.to_builtins(cfg),
                "fleet_cache_tokens": fleet_tokens,
                "targets": summaries,
            },
            "requests": [p.req for p in planned],
        }


def run_sync(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return asyncio.run(coro)


# --- `kvrouter replay` ----------------------------------------------------------------------------------


def write_outputs(
    out_dir: str,
    trace: Trace,
    result: dict[str, Any],
    *,
    title: str = "kvrouter replay",
    notes: Sequence[str] = (),
    plots: bool = True,
) -> dict[str, str]:
    """``DIR/<target>.jsonl`` records, ``DIR/summary.json`` and the report (markdown, PNGs, JSON)."""
    import json
    import os

    from .records import write_records
    from .report import _jsonable, oracle, write_report

    os.makedirs(out_dir, exist_ok=True)
    runs: dict[str, TargetRun] = result["runs"]
    summary = result["summary"]
    oracle_info = oracle(trace, result["requests"], summary.get("fleet_cache_tokens"))
    summary["oracle"] = oracle_info
    for name, run in runs.items():
        write_records(os.path.join(out_dir, f"{name}.jsonl"), run.records)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(_jsonable(summary), f, indent=1, sort_keys=True)
    return write_report(
        out_dir,
        summary,
        {n: r.records for n, r in runs.items()},
        oracle_info=oracle_info,
        title=title,
        notes=notes,
        plots=plots,
    )


def cmd_replay(args: Any) -> int:
    import sys

    from .loaders import TraceFormatError, load_trace
    from .report import text_table

    try:
        targets = [Target.parse(t) for t in args.target]
    except ValueError as exc:
        print(f"kvrouter replay: {exc}", file=sys.stderr)
        return 2
    if len({t.name for t in targets}) != len(targets):
        print("kvrouter replay: target names must be unique", file=sys.stderr)
        return 2
    try:
        trace, _report = load_trace(args.trace)
    except (TraceFormatError, OSError) as exc:
        print(f"kvrouter replay: {exc}", file=sys.stderr)
        return 2
    cfg = ReplayConfig(
        speedup=args.speedup,
        max_requests=args.max_requests,
        duration_s=args.duration,
        prompt=args.prompt,
        model=args.model,
        concurrency_limit=args.concurrency_limit,
        grace_s=args.grace,
        request_timeout_s=args.request_timeout,
        slo=SLO(ttft_s=args.slo_ttft, tpot_s=args.slo_tpot),
        endpoint=args.endpoint,
        closed_loop=getattr(args, "closed_loop", False),
        decode_tps=getattr(args, "decode_tps", None),
    )
    try:
        result = run_sync(
            replay(
                trace,
                targets,
                cfg,
                engine_urls=args.engine_metrics or (),
                reset_between=args.reset_prefix_cache,
                progress=lambda m: print(m, file=sys.stderr, flush=True),
            )
        )
    except (ValueError, RuntimeError, aiohttp.ClientError, OSError) as exc:
        print(f"kvrouter replay: {exc}", file=sys.stderr)
        return 1
    files = write_outputs(args.out, trace, result, plots=not args.no_plots)
    print(text_table(result["summary"]["targets"]))
    print(f"report: {files['markdown']}", file=sys.stderr)
    return 0
