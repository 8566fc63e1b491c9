"""make bench-proxy: what the router costs on the request path, next to its peers, in one run.

Targets, all in front of the same fake OpenAI backends on loopback:

* ``direct``: the load generator talks to one backend (the floor every router is measured from);
* ``kvrouter`` (``kvrouter serve``, one worker, and ``--workers N`` variants when asked for);
* ``kvrouter-compiled`` (``--compiled``): the same command from the mypyc build of this checkout
  (setup.py, tools/build_compiled.py), the build the container image ships;
* ``sglang`` (``python -m sglang_router.launch_router``) and ``vllm-router`` (the Rust binary of
  the vllm-router wheel), from ``.venv-peers``; installed there under ``flock .venv-peers.lock``
  when missing. A peer that cannot start is reported with the reason and skipped;
* ``python-floor`` (``--floor``): floor_proxy.py, bytes relayed by asyncio callbacks with no
  routing or validation, the least a Python proxy on uvloop costs per request.

For each of non-streaming and streaming (16 SSE chunks), at each concurrency: req/s, p50/p99
latency and the latency *added* over ``direct`` at the same mode and concurrency, the router's CPU
(utime+stime from /proc/<pid>/stat over the measured window, summed over its process tree, so
forked workers count) per request and as a share of one core, and its RSS (summed over the tree).

Fairness on a small machine: the router runs on ``--router-cpus`` and the load generator and the
backends on ``--client-cpus`` (``taskset``), the same for every router. The backends are a raw
asyncio protocol with canned responses and the load generator is ``wrk`` (C, keep-alive), so
neither is what limits the routers: ``direct`` shows how far they go on their own. Without
``wrk`` a raw-asyncio keep-alive client in this file stands in (slower; the table says which).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: make the tests package importable
    sys.path.insert(0, str(ROOT))

from tests.support.proc_stats import cpu_ticks, process_tree  # noqa: E402
from tools.build_compiled import build  # noqa: E402

PEERS_VENV = ROOT / ".venv-peers"
PEERS_LOCK = ROOT / ".venv-peers.lock"
MODEL = "fake-model"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# ---- backend: raw asyncio HTTP/1.1, canned answers ---------------------------------------------


def _sse(obj: object) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _canned(chunks: int) -> tuple[bytes, list[bytes]]:
    """(non-streaming response, streaming response writes). Same shapes
    as tests/support/fake_openai.py: per-chunk completion events, a usage event, [DONE]."""
    usage = {
        "prompt_tokens": 10,
        "completion_tokens": chunks,
        "total_tokens": 10 + chunks,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    text = "".join(f"t{i} " for i in range(chunks))
    body = json.dumps(
        {
            "id": "cmpl-fake",
            "object": "text_completion",
            "model": MODEL,
            "choices": [{"index": 0, "text": text, "finish_reason": "length"}],
            "usage": usage,
        },
        separators=(",", ":"),
    ).encode()
    plain = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
    events = [
        _sse(
            {
                "id": "cmpl-fake",
                "object": "text_completion",
                "model": MODEL,
                "choices": [{"index": 0, "text": f"t{i} ", "finish_reason": None}],
            }
        )
        for i in range(chunks)
    ]
    events.append(
        _sse({"id": "cmpl-fake", "object": "text_completion", "model": MODEL, "choices": [], "usage": usage})
    )
    writes = [head] + [_chunked(e) for e in events] + [_chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n"]
    return plain, writes


def _json_200(obj: object) -> bytes:
    body = json.dumps(obj).encode()
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )


_STREAM_RE = re.compile(rb'"stream"\s*:\s*true')
_PREFILL_RE = re.compile(rb'"do_remote_decode"\s*:\s*true')


def _prefill_answer() -> bytes:
    """Leg 1 of a NIXL handoff (``--pd``): a one-token completion with vLLM's top-level
    ``kv_transfer_params``, so the router really sends leg 2 with them."""
    params = {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_block_ids": [[1, 2]],
        "remote_engine_id": "bench",
        "remote_request_id": "cmpl-bench-0",
        "remote_host": "localhost",
        "remote_port": 5600,
        "tp_size": 1,
        "dcp_size": 1,
        "pp_size": 1,
        "remote_num_tokens": 40,
        "remote_blocks_expiry_time": None,
        "transfer_mode": "pull",
    }
    body = json.dumps(
        {
            "id": "cmpl-bench-0",
            "object": "text_completion",
            "model": MODEL,
            "choices": [{"index": 0, "text": "x", "finish_reason": "length"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
            "kv_transfer_params": params,
        },
        separators=(",", ":"),
    ).encode()
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )


_PREFILL_ANSWER = _prefill_answer()


class _BackendProtocol(asyncio.Protocol):
    """Pipelining-safe HTTP/1.1: parse every complete request in the buffer, answer in order.
    Streaming answers are one ``write`` per SSE event (separate segments with TCP_NODELAY), like
    an engine that emits tokens as it makes them."""

    def __init__(self, plain: bytes, stream: list[bytes], gets: dict[bytes, bytes]) -> None:
        self.plain = plain
        self.stream = stream
        self.gets = gets
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        t = self.transport
        assert t is not None
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[:end].lower()
            start = end + 4
            i = head.find(b"content-length:")
            if i >= 0:
                j = head.find(b"\r\n", i)
                total = start + int(head[i + 15 : j if j >= 0 else len(head)])
            elif b"chunked" in head:
                k = buf.find(b"\r\n0\r\n\r\n", start - 2)
                if k < 0:
                    break
                total = k + 7
            else:
                total = start
            if len(buf) < total:
                break
            line = head[: head.find(b"\r\n")]
            if line.startswith(b"post"):
                if _PREFILL_RE.search(buf, start, total):
                    t.write(_PREFILL_ANSWER)
                elif _STREAM_RE.search(buf, start, total):
                    for w in self.stream:
                        t.write(w)
                else:
                    t.write(self.plain)
            else:
                path = line.split(b" ")[1].split(b"?")[0] if b" " in line else b"/"
                t.write(self.gets.get(path, self.gets[b"*"]))
            buf = buf[total:]
        self.buf = buf


def serve_backends(ports: Sequence[int], chunks: int) -> None:
    plain, stream = _canned(chunks)
    metrics = (
        f'vllm:num_requests_running{{model_name="{MODEL}"}} 0\n'
        f'vllm:num_requests_waiting{{model_name="{MODEL}"}} 0\n'
        f'vllm:kv_cache_usage_perc{{model_name="{MODEL}"}} 0\n'
    ).encode()
    gets = {
        b"/health": _json_200({"status": "ok"}),
        b"/v1/models": _json_200(
            {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "fake"}]}
        ),
        b"/metrics": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
        % (len(metrics), metrics),
        b"/kv_event_sources": b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
        b"*": _json_200({}),
    }

    async def main() -> None:
        loop = asyncio.get_running_loop()
        servers = [
            await loop.create_server(
                lambda: _BackendProtocol(plain, stream, gets), "127.0.0.1", p, backlog=4096
            )
            for p in ports
        ]
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print("ready", flush=True)
        await stop.wait()
        for s in servers:
            s.close()

    _run_loop(main())


def _run_loop(coro: object) -> None:
    try:
        import uvloop

        uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]


# ---- load generators ------------------------------------------------------------------------------


@dataclass(slots=True)
class LoadResult:
    requests: int
    seconds: float
    errors: int
    p50_us: float
    p99_us: float
    max_us: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


_WRK_LUA = """
wrk.method = "POST"
wrk.body = [[%s]]
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('BENCHJSON {"requests":%%d,"duration_us":%%d,"errors":%%d,"p50":%%d,"p99":%%d,"max":%%d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def run_wrk(
    wrk: str, url: str, body: bytes, conc: int, seconds: float, cpus: str | None, tmp: Path
) -> LoadResult:
    script = tmp / "post.lua"
    script.write_text(_WRK_LUA % body.decode())
    cmd = [
        wrk,
        "-t1",
        f"-c{conc}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
    ]
    out = subprocess.run(_pinned(cmd, cpus), capture_output=True, text=True, timeout=seconds + 30)
    for line in out.stdout.splitlines():
        if line.startswith("BENCHJSON "):
            d = json.loads(line[len("BENCHJSON ") :])
            return LoadResult(
                d["requests"], d["duration_us"] / 1e6, d["errors"], d["p50"], d["p99"], d["max"]
            )
    raise RuntimeError(f"wrk gave no result: {out.stdout[-500:]} {out.stderr[-500:]}")


async def _py_load(host: str, port: int, path: str, body: bytes, conc: int, seconds: float) -> LoadResult:
    """Fallback client: ``conc`` keep-alive connections, one request in flight on each."""
    req = (
        b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (path.encode(), host.encode(), port, len(body), body)
    )
    lat: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def one() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                writer.write(req)
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200"):
                    errors += 1
                low = head.lower()
                i = low.find(b"content-length:")
                if i >= 0:
                    await reader.readexactly(int(low[i + 15 : low.find(b"\r\n", i)]))
                else:  # chunked: read chunks to the terminating zero-size one
                    while True:
                        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                        await reader.readexactly(size + 2)
                        if size == 0:
                            break
                lat.append(time.perf_counter() - t0)
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(conc)))
    took = time.perf_counter() - t0
    lat.sort()

    def pick(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1e6 if lat else 0.0

    return LoadResult(len(lat), took, errors, pick(0.5), pick(0.99), lat[-1] * 1e6 if lat else 0.0)


def run_py_load(url: str, body: bytes, conc: int, seconds: float) -> LoadResult:
    u = urllib.parse.urlsplit(url)
    result: list[LoadResult] = []

    async def main() -> None:
        result.append(await _py_load(u.hostname or "127.0.0.1", u.port or 80, u.path, body, conc, seconds))

    _run_loop(main())
    return result[0]


# ---- processes ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pinned(cmd: list[str], cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus, *cmd] if cpus and shutil.which("taskset") else cmd


def memory_bytes(pid: int) -> tuple[int, int]:
    """(RSS, PSS) summed over the tree. RSS double-counts pages forked workers share with their
    supervisor; PSS splits shared pages between their users, so it sums honestly."""
    rss = pss = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/statm", "rb") as f:
                rss += int(f.read().split()[1]) * PAGE
            with open(f"/proc/{p}/smaps_rollup", "rb") as f:
                for line in f:
                    if line.startswith(b"Pss:"):
                        pss += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return rss, pss


class Proc:
    def __init__(self, cmd: list[str], name: str, log_dir: Path, cpus: str | None, cwd: Path = ROOT) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.p = subprocess.Popen(
            _pinned(cmd, cpus),
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-1500:]

    def stop(self) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(5)
        self._log.close()


def post_ok(url: str, body: bytes, timeout: float = 2.0) -> bool:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            return bool(r.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def kvrouter_serve(py: str) -> list[str]:
    """``kvrouter serve`` as every kvrouter target of the benches starts it: loopback, the port
    filled in per run, no KV events (the fake backends publish none), quiet logs."""
    serve = [py, "-m", "router", "serve", "--host", "127.0.0.1", "--port", "{port}"]
    return [*serve, "--kv-events", "off", "--log-level", "warning"]


def _kvrouter_python() -> str:
    """The interpreter kvrouter targets run with: the project venv's when there is one."""
    venv_py = ROOT / ".venv" / "bin" / "python"
    return str(venv_py) if venv_py.exists() else sys.executable


def _one_worker(py: str, urls: Sequence[str]) -> list[str]:
    """``kvrouter serve`` with one worker in front of ``urls`` (the checkout is its cwd's)."""
    return [*kvrouter_serve(py), "--workers", "1", *[a for u in urls for a in ("--backend", u)]]


def wait_serving(proc: Proc, url: str, body: bytes, timeout: float) -> None:
    """Ready = a real completion goes through (every router has its own idea of /health)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited: {proc.tail()}")
        if post_ok(url, body):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{proc.name} did not serve within {timeout:g}s: {proc.tail()}")


def ensure_peers(log: Path) -> str | None:
    """Returns why the peers are unavailable, or None. Installs into .venv-peers (never .venv)
    under the lock `make compare` shares, only when the venv or a package is missing."""
    py = PEERS_VENV / "bin" / "python"
    probe = "import importlib.util as u, sys; sys.exit(0 if u.find_spec('sglang_router') else 1)"

    def ok() -> bool:
        return (
            py.exists()
            and (PEERS_VENV / "bin" / "vllm-router").exists()
            and subprocess.run([str(py), "-c", probe], capture_output=True).returncode == 0
        )

    if ok():
        return None
    with open(PEERS_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not ok():
            with open(log, "ab") as out:
                if not py.exists():
                    base = shutil.which("python3.11") or sys.executable
                    subprocess.run([base, "-m", "venv", str(PEERS_VENV)], stdout=out, stderr=out, check=False)
                subprocess.run(
                    [str(py), "-m", "pip", "install", "-q", "sglang-router", "vllm-router"],
                    stdout=out,
                    stderr=out,
                    check=False,
                    timeout=900,
                )
    return None if ok() else f"pip install sglang-router vllm-router into .venv-peers failed (see {log})"


# ---- the run --------------------------------------------------------------------------------------


@dataclass(slots=True)
class Cell:
    target: str
    stream: bool
    conc: int
    load: LoadResult
    cpu_s: float
    rss: int
    pss: int
    loadavg: float


@dataclass(slots=True)
class Target:
    name: str
    url: str
    proc: Proc | None
    note: str = ""
    cells: list[Cell] = field(default_factory=list)


def _body(stream: bool, prompt: str) -> bytes:
    return json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 16, "stream": stream}).encode()


def measure(t: Target, args: argparse.Namespace, loadgen: str | None, tmp: Path, prompt: str) -> None:
    for stream in (False, True):
        body = _body(stream, prompt)
        for conc in args.concurrency:
            # A short warm-up at the same concurrency: pools, JIT-free but cache-warm paths.
            _load(loadgen, t.url, body, conc, args.warmup, args.client_cpus, tmp)
            before = cpu_ticks(t.proc.pid) if t.proc else 0
            loadavg = os.getloadavg()[0]
            res = _load(loadgen, t.url, body, conc, args.duration, args.client_cpus, tmp)
            cpu = (cpu_ticks(t.proc.pid) - before) / CLK_TCK if t.proc else 0.0
            rss, pss = memory_bytes(t.proc.pid) if t.proc else (0, 0)
            t.cells.append(Cell(t.name, stream, conc, res, cpu, rss, pss, loadavg))
            print(
                f"  {t.name:<14} {'stream' if stream else 'plain ':6} c={conc:<4} {res.rps:9.0f} req/s  "
                f"p50 {res.p50_us / 1000:7.3f} ms  p99 {res.p99_us / 1000:7.3f} ms  errors {res.errors}  "
                f"cpu {cpu:.2f}s  load {loadavg:.2f}",
                flush=True,
            )


def _load(
    loadgen: str | None, url: str, body: bytes, conc: int, seconds: float, cpus: str | None, tmp: Path
) -> LoadResult:
    if loadgen:
        return run_wrk(loadgen, url, body, conc, seconds, cpus, tmp)
    return run_py_load(url, body, conc, seconds)


def render(targets: list[Target], args: argparse.Namespace, loadgen_name: str) -> str:
    direct = next(t for t in targets if t.name == "direct")
    base = {(c.stream, c.conc): c for c in direct.cells}
    routers = [t for t in targets if t.name != "direct" and t.cells]
    lines = [
        f"load generator: {loadgen_name}; "
        + (
            f"router on CPU {args.router_cpus}, load generator + backends on CPU {args.client_cpus}; "
            if args.router_cpus
            else "not pinned (every process on every CPU); "
        )
        + f"{args.backends} backends; {args.duration:g}s per cell; "
        f"1-min load average {min(c.loadavg for t in targets for c in t.cells):.2f}-"
        f"{max(c.loadavg for t in targets for c in t.cells):.2f} on {os.cpu_count()} CPUs",
        "",
        "| mode | conc | target | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | CPU % of a core | CPU us/req | RSS MiB | PSS MiB | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for stream in (False, True):
        for conc in args.concurrency:
            for t in [direct, *routers]:
                c = next((c for c in t.cells if c.stream == stream and c.conc == conc), None)
                if c is None:
                    continue
                d = base[(stream, conc)]
                r = c.load
                added = "" if t is direct else f"{(r.p50_us - d.load.p50_us) / 1000:.3f}"
                added99 = "" if t is direct else f"{(r.p99_us - d.load.p99_us) / 1000:.3f}"
                cpu = "" if t is direct else f"{100 * c.cpu_s / r.seconds:.0f}"
                per = "" if t is direct or not r.requests else f"{1e6 * c.cpu_s / r.requests:.0f}"
                rss = "" if t is direct else f"{c.rss / 2**20:.0f}"
                pss = "" if t is direct else f"{c.pss / 2**20:.0f}"
                lines.append(
                    f"| {'stream' if stream else 'plain'} | {conc} | {t.name} | {r.rps:.0f} | "
                    f"{r.p50_us / 1000:.3f} | {r.p99_us / 1000:.3f} | {added} | {added99} | {cpu} | "
                    f"{per} | {rss} | {pss} | {r.errors} |"
                )
    kv = [t for t in routers if t.name.startswith("kvrouter")]
    peers = [t for t in routers if not t.name.startswith("kvrouter")]
    if kv and peers:
        lines += [
            "",
            "Ratios kvrouter / peer (req/s: >1 is faster; CPU per request and PSS: <1 is cheaper):",
            "",
            "| mode | conc | kvrouter | peer | req/s | CPU us/req | PSS |",
            "|---|---|---|---|---|---|---|",
        ]
        for stream in (False, True):
            for conc in args.concurrency:
                for k in kv:
                    kc = next((c for c in k.cells if c.stream == stream and c.conc == conc), None)
                    for p in peers:
                        pc = next((c for c in p.cells if c.stream == stream and c.conc == conc), None)
                        if kc is None or pc is None or not pc.load.requests or not kc.load.requests:
                            continue
                        kper, pper = kc.cpu_s / kc.load.requests, pc.cpu_s / pc.load.requests
                        lines.append(
                            f"| {'stream' if stream else 'plain'} | {conc} | {k.name} | {p.name} | "
                            f"{kc.load.rps / pc.load.rps:.2f} | {kper / pper if pper else float('nan'):.2f} | "
                            f"{kc.pss / pc.pss if pc.pss else float('nan'):.2f} |"
                        )
    notes = [f"* {t.name}: {t.note}" for t in targets if t.note]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def one_run(
    args: argparse.Namespace, wrk: str | None, tmp: Path, prompt: str, probe: bytes, loadgen_name: str
) -> list[Target]:
    """Backends, direct, then each router in turn; every process stopped before it returns."""
    ports = [free_port() for _ in range(args.backends)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    procs: list[Proc] = []
    targets: list[Target] = []
    print(f"bench-proxy: {loadgen_name}; uptime: {os.getloadavg()}; logs in {tmp}", flush=True)
    try:
        be = Proc(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--chunks",
                str(args.chunks),
                "--serve-backends",
                *map(str, ports),
            ],
            "backends",
            tmp,
            args.client_cpus,
        )
        procs.append(be)
        wait_serving(be, urls[0] + "/v1/completions", probe, 20)
        targets.append(Target("direct", urls[0] + "/v1/completions", None))
        measure(targets[-1], args, wrk, tmp, prompt)

        plan: list[tuple[str, list[str], Path]] = []  # name, command, cwd (the checkout it imports)
        kv_py = _kvrouter_python()
        for w in args.kvrouter_workers:
            name = "kvrouter" if w == 1 else f"kvrouter-w{w}"
            plan.append(
                (
                    name,
                    [
                        *kvrouter_serve(kv_py),
                        "--workers",
                        str(w),
                        *[a for u in urls for a in ("--backend", u)],
                    ],
                    ROOT,
                )
            )
        if args.compiled is not None:
            # the same command from the compiled build (setup.py): the tree imports its extensions
            base = _one_worker(kv_py, urls)
            plan.append(("kvrouter-compiled", base, args.compiled))
        if args.baseline_tree is not None:
            # the same command from another checkout (python -m router imports the cwd's tree)
            base = _one_worker(kv_py, urls)
            plan.append(("kvrouter-baseline", base, args.baseline_tree.resolve()))
        if args.floor:
            # the yardstick: bytes relayed by callbacks and nothing else (floor_proxy.py)
            floor = [kv_py, str(ROOT / "tests" / "bench" / "floor_proxy.py"), "--port", "{port}"]
            plan.append(("python-floor", [*floor, *[a for u in urls for a in ("--backend", u)]], ROOT))
        if args.pd and len(urls) >= 2:
            # every request split: leg 1 (prefill, one token, kv_transfer_params back) then leg 2
            plan.append(
                (
                    "kvrouter-pd",
                    [
                        *kvrouter_serve(kv_py),
                        "--pd-rule",
                        "always",
                        "--prefill",
                        urls[0],
                        "--decode",
                        urls[1],
                    ],
                    ROOT,
                )
            )
        why_not = ensure_peers(tmp / "peers-install.log") if args.peers else None
        peer_py = str(PEERS_VENV / "bin" / "python")
        if "sglang" in args.peers:
            plan.append(
                (
                    "sglang",
                    [
                        peer_py,
                        "-m",
                        "sglang_router.launch_router",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        "{port}",
                        "--log-level",
                        "warn",
                        "--worker-urls",
                        *urls,
                    ],
                    ROOT,
                )
            )
        if "vllm-router" in args.peers:
            plan.append(
                (
                    "vllm-router",
                    [
                        str(PEERS_VENV / "bin" / "vllm-router"),
                        "--host",
                        "127.0.0.1",
                        "--port",
                        "{port}",
                        "--log-level",
                        "warning",
                        "--worker-urls",
                        *urls,
                    ],
                    ROOT,
                )
            )
        for name, cmd, cwd in plan:
            if why_not and not name.startswith("kvrouter") and name != "python-floor":
                targets.append(Target(name, "", None, note=f"skipped: {why_not}"))
                print(f"  {name}: skipped: {why_not}", flush=True)
                continue
            port = free_port()
            proc = Proc([a.replace("{port}", str(port)) for a in cmd], name, tmp, args.router_cpus, cwd)
            procs.append(proc)
            url = f"http://127.0.0.1:{port}/v1/completions"
            t = Target(name, url, proc)
            targets.append(t)
            try:
                wait_serving(proc, url, probe, 60)
                measure(t, args, wrk, tmp, prompt)
            except (RuntimeError, subprocess.SubprocessError) as exc:
                t.note = f"could not run: {str(exc).strip().splitlines()[0][:300]}"
                print(f"  {name}: {t.note}", flush=True)
            finally:
                proc.stop()
    finally:
        for p in procs:
            p.stop()
    return targets


def ab_run(args: argparse.Namespace, wrk: str | None, tmp: Path, prompt: str, probe: bytes) -> str:
    """``--ab N``: kvrouter from this checkout (A) and from ``--baseline-tree`` (B) run side by
    side on the router CPU, and each cell is N rounds of one load window against each, the order
    alternating. Only one router is loaded at a time; a round's two windows are seconds apart, so
    the per-round ratio of CPU per request cancels most of a shared host's drift, which separate
    runs minutes apart (``--runs``) do not."""
    import statistics

    ports = [free_port() for _ in range(args.backends)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    kv_py = _kvrouter_python()
    backend_cmd = [sys.executable, str(Path(__file__).resolve()), "--chunks", str(args.chunks)]
    procs = [Proc([*backend_cmd, "--serve-backends", *map(str, ports)], "backends", tmp, args.client_cpus)]
    tree_a = args.compiled if args.compiled is not None else ROOT  # --compiled: A is this checkout's build
    lines = [
        f"A/B: kvrouter from {tree_a} (A) and from {args.baseline_tree.resolve()} (B), {args.ab} rounds of "
        f"{args.duration:g}s per router and cell, order alternating; router CPU per request from /proc",
        "",
        "| mode | conc | A us/req (median) | B us/req (median) | A/B CPU per request (median of rounds) "
        "| A/B req/s (median of rounds) | rounds A/B CPU |",
        "|---|---|---|---|---|---|---|",
    ]
    try:
        wait_serving(procs[0], urls[0] + "/v1/completions", probe, 20)
        routers: list[Target] = []
        for name, cwd in (("A", tree_a), ("B", args.baseline_tree.resolve())):
            port = free_port()
            cmd = _one_worker(kv_py, urls)
            proc = Proc(
                [a.replace("{port}", str(port)) for a in cmd], f"kvrouter-{name}", tmp, args.router_cpus, cwd
            )
            procs.append(proc)
            routers.append(Target(name, f"http://127.0.0.1:{port}/v1/completions", proc))
            wait_serving(proc, routers[-1].url, probe, 60)
        for stream in (False, True):
            body = _body(stream, prompt)
            for conc in args.concurrency:
                per_req: dict[str, list[float]] = {"A": [], "B": []}
                rps: dict[str, list[float]] = {"A": [], "B": []}
                for t in routers:
                    _load(wrk, t.url, body, conc, args.warmup, args.client_cpus, tmp)
                for rnd in range(args.ab):
                    for t in routers if rnd % 2 == 0 else routers[::-1]:
                        assert t.proc is not None
                        before = cpu_ticks(t.proc.pid)
                        res = _load(wrk, t.url, body, conc, args.duration, args.client_cpus, tmp)
                        cpu = (cpu_ticks(t.proc.pid) - before) / CLK_TCK
                        per_req[t.name].append(1e6 * cpu / max(1, res.requests))
                        rps[t.name].append(res.rps)
                ratios = [a / b for a, b in zip(per_req["A"], per_req["B"], strict=True) if b]
                speed = [a / b for a, b in zip(rps["A"], rps["B"], strict=True) if b]
                mode = "stream" if stream else "plain"
                row = (
                    f"| {mode} | {conc} | {statistics.median(per_req['A']):.0f} | "
                    f"{statistics.median(per_req['B']):.0f} | {statistics.median(ratios):.3f} | "
                    f"{statistics.median(speed):.3f} | {', '.join(f'{r:.2f}' for r in ratios)} |"
                )
                print("  " + row, flush=True)
                lines.append(row)
    finally:
        for p in procs:
            p.stop()
    return "\n".join(lines)


def per_core_summary(runs: list[list[Target]], args: argparse.Namespace) -> str:
    """Median over runs of req/s and of requests per CPU-second of the router (req/s per core),
    and kvrouter / peer ratios of those medians."""
    import statistics

    def cells(name: str, stream: bool, conc: int) -> list[Cell]:
        return [
            c
            for ts in runs
            for t in ts
            if t.name == name
            for c in t.cells
            if c.stream == stream and c.conc == conc
        ]

    names = [t.name for t in runs[-1] if t.name != "direct"]
    lines = [
        f"Median of {len(runs)} runs (req/s per core = requests per CPU-second of the router's process tree):",
        "",
        "| mode | conc | target | req/s | req/s per core | runs (req/s per core) |",
        "|---|---|---|---|---|---|",
    ]
    med: dict[tuple[str, bool, int], float] = {}
    for stream in (False, True):
        for conc in args.concurrency:
            for name in names:
                cs = [c for c in cells(name, stream, conc) if c.cpu_s > 0 and c.load.requests]
                if not cs:
                    continue
                per_core = [c.load.requests / c.cpu_s for c in cs]
                med[(name, stream, conc)] = statistics.median(per_core)
                lines.append(
                    f"| {'stream' if stream else 'plain'} | {conc} | {name} | "
                    f"{statistics.median(c.load.rps for c in cs):.0f} | {med[(name, stream, conc)]:.0f} | "
                    f"{', '.join(f'{v:.0f}' for v in per_core)} |"
                )
    peers = [n for n in names if not n.startswith("kvrouter") or n == "kvrouter-baseline"]
    ours = [n for n in ("kvrouter", "kvrouter-compiled") if n in names]
    if peers:
        lines += [
            "",
            "| mode | conc | build | kvrouter / " + " | kvrouter / ".join(peers) + " (req/s per core) |",
            "|---|---|---|" + "---|" * len(peers),
        ]
        for stream in (False, True):
            for conc in args.concurrency:
                for name in ours:
                    k = med.get((name, stream, conc))
                    vals = [
                        f"{k / med[(p, stream, conc)]:.2f}" if k and (p, stream, conc) in med else "n/a"
                        for p in peers
                    ]
                    build = "compiled" if name == "kvrouter-compiled" else "pure Python"
                    mode = "stream" if stream else "plain"
                    lines.append(f"| {mode} | {conc} | {build} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=3.0, help="seconds measured per cell")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up load before each cell")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32, 256])
    ap.add_argument("--backends", type=int, default=2)
    ap.add_argument("--chunks", type=int, default=16, help="SSE chunks per streamed response")
    ap.add_argument(
        "--kvrouter-workers", type=int, nargs="+", default=[1], help="one kvrouter target per value"
    )
    ap.add_argument(
        "--pd",
        action="store_true",
        help="add kvrouter-pd: --prefill backend 1 --decode backend 2 --pd-rule always (two legs)",
    )
    ap.add_argument("--peers", nargs="*", default=["sglang", "vllm-router"], help="peers to include")
    ap.add_argument(
        "--floor",
        action="store_true",
        help="add python-floor: the least a Python proxy on uvloop costs (floor_proxy.py), as a yardstick",
    )
    ap.add_argument("--router-cpus", default="1" if (os.cpu_count() or 1) > 1 else None)
    ap.add_argument("--client-cpus", default="0" if (os.cpu_count() or 1) > 1 else None)
    ap.add_argument("--no-pin", action="store_true", help="let every process use every CPU")
    ap.add_argument("--python-loadgen", action="store_true", help="use the asyncio client even if wrk exists")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "bench-proxy.md")
    ap.add_argument("--runs", type=int, default=1, help="repeat the whole sequence; >1 adds a median summary")
    ap.add_argument(
        "--peers-venv", type=Path, help="venv with sglang-router / vllm-router (default .venv-peers)"
    )
    ap.add_argument(
        "--baseline-tree",
        type=Path,
        help="also run kvrouter-baseline: the same kvrouter command from this checkout (e.g. main)",
    )
    ap.add_argument(
        "--ab",
        type=int,
        metavar="ROUNDS",
        help="with --baseline-tree: only this checkout vs that one, interleaved, ROUNDS windows each per cell",
    )
    ap.add_argument(
        "--compiled",
        nargs="?",
        type=Path,
        const=ROOT / ".cache" / "compiled",
        help="also run kvrouter-compiled: the mypyc build of this checkout (tools/build_compiled.py; "
        "built into PATH, default .cache/compiled, unless it is up to date)",
    )
    ap.add_argument("--serve-backends", type=int, nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_backends:
        serve_backends(args.serve_backends, args.chunks)
        return 0
    if args.compiled is not None:
        print(f"bench-proxy: compiled build in {args.compiled} (mypyc, ~1 min unless up to date)", flush=True)
        args.compiled = build(args.compiled.resolve())
    if args.peers_venv is not None:
        global PEERS_VENV, PEERS_LOCK
        PEERS_VENV, PEERS_LOCK = args.peers_venv, args.peers_venv.with_suffix(".lock")
    if args.no_pin:
        args.router_cpus = args.client_cpus = None
    if args.client_cpus and shutil.which("taskset"):
        os.sched_setaffinity(0, {int(c) for c in args.client_cpus.split(",")})
    wrk = None if args.python_loadgen else shutil.which("wrk")
    loadgen_name = "wrk -t1 (keep-alive)" if wrk else "python asyncio keep-alive client (wrk not found)"
    tmp = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    prompt = "You are a helpful assistant. " * 8 + "Summarise the following text in one sentence."
    probe = _body(False, prompt)
    if args.ab:
        if args.baseline_tree is None:
            ap.error("--ab needs --baseline-tree")
        table = ab_run(args, wrk, tmp, prompt, probe)
        print("\n" + table)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")
        print(f"\nwritten to {args.out}")
        return 0
    runs: list[list[Target]] = []
    for run in range(args.runs):
        if args.runs > 1:
            print(f"run {run + 1}/{args.runs}", flush=True)
        runs.append(one_run(args, wrk, tmp, prompt, probe, loadgen_name))
    targets = runs[-1]
    table = render(targets, args, loadgen_name)
    print("\n" + table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n")
    if args.runs > 1:
        summary = per_core_summary(runs, args)
        print("\n" + summary)
        table += "\n\n" + summary
        args.out.write_text(table + "\n")
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
