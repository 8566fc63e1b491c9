"""Hostile-client costs of a router build, next to a baseline build, in one run (issue 21).

    PYTHONPATH=. python tests/bench/bench_hostile.py --baseline /tmp/main-export

``--baseline`` is another source tree of kvrouter (e.g. ``git archive main | tar -x -C DIR``);
each tree's router is started with that tree as its working directory. Measured per tree:

* F1: router RSS before and at the peak of 20 unauthenticated uploads of 32 MiB (``--api-key``);
* F2: how long a request head trickled at one byte per second keeps its connection (capped);
* F3: the worst ``/health`` latency while a 16.7 M-id (32 MB) prompt is handled (one sim
  replica, ``max_model_len`` 2048).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from tests.support.proc_stats import rss_mb
from tests.support.procs import PY, ROOT, Proc, SimFleet, free_port, http, wait_http


def start_router(
    tree: Path, backends: list[str], log: Path, *extra: str
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    args = [PY, "-m", "router", "serve", "--port", str(port), "--kv-events", "off", "--drain-grace", "0"]
    for b in backends:
        args += ["--backend", b]
    p = subprocess.Popen(
        [*args, *extra],
        cwd=tree,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(tree)},
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/ready", timeout=30)
    return p, url


def f1(tree: Path, backend: str, log: Path) -> tuple[float, float]:
    p, url = start_router(tree, [backend], log, "--api-key", "K")
    try:
        before = rss_mb(p.pid)
        port = int(url.rsplit(":", 1)[1])
        socks = []
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 33554431\r\n\r\n")
            socks.append(s)
        chunk = b"\0" * (1 << 20)
        for s in socks:
            try:
                for _ in range(31):
                    s.sendall(chunk)
            except OSError:
                pass
        time.sleep(0.3)
        peak = rss_mb(p.pid)
        for s in socks:
            s.close()
        return before, peak
    finally:
        p.terminate()
        p.wait(10)


def f2(tree: Path, backend: str, log: Path, cap_s: float) -> float:
    p, url = start_router(tree, [backend], log)
    try:
        port = int(url.rsplit(":", 1)[1])
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=cap_s) as s:
            head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 1000
            s.settimeout(1.0)
            for b in head:
                if time.monotonic() - t0 > cap_s:
                    break
                try:
                    s.sendall(bytes([b]))
                    if s.recv(4096) == b"":
                        break
                    break  # answered: the router is closing
                except TimeoutError:
                    continue
                except OSError:
                    break
        return time.monotonic() - t0
    finally:
        p.terminate()
        p.wait(10)


def f3(tree: Path, sim_url: str, log: Path) -> tuple[float, float]:
    p, url = start_router(tree, [sim_url], log)
    try:
        time.sleep(2.5)  # model cards learned
        model = json.loads(http("GET", url + "/v1/models")[2])["data"][0]["id"]
        body = b'{"model":"' + model.encode() + b'","prompt":[' + b"1," * 16_777_000 + b"1]}"
        took: list[float] = []

        def send() -> None:
            t0 = time.monotonic()
            http("POST", url + "/v1/completions", body, {"Content-Type": "application/json"}, timeout=60)
            took.append(time.monotonic() - t0)

        t = threading.Thread(target=send)
        t.start()
        worst = 0.0
        while t.is_alive():
            t0 = time.monotonic()
            http("GET", url + "/health", timeout=30)
            worst = max(worst, time.monotonic() - t0)
            time.sleep(0.01)
        t.join()
        return worst, took[0] if took else float("nan")
    finally:
        p.terminate()
        p.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", type=Path, required=True, help="source tree of the baseline router")
    ap.add_argument("--trickle-cap", type=float, default=20.0, help="seconds F2 waits at most")
    a = ap.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="bench-hostile-"))
    backend = Proc(
        [PY, "-m", "tests.support.fake_openai", "--port", str(port := free_port())], "backend", logs
    )
    sim = SimFleet(logs, 1, name="sim")
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        rows = []
        for name, tree in (("baseline", a.baseline.resolve()), ("this tree", ROOT)):
            b1, p1 = f1(tree, f"http://127.0.0.1:{port}", logs / f"{name}-f1.log")
            held = f2(tree, f"http://127.0.0.1:{port}", logs / f"{name}-f2.log", a.trickle_cap)
            worst, took = f3(tree, sim.urls[0], logs / f"{name}-f3.log")
            rows.append((name, b1, p1, held, worst, took))
        print(
            "| router | F1 RSS idle -> 20 x 32 MiB unauthenticated (MB) | F2 trickled head held (s) "
            "| F3 /health worst during 16.7M ids (ms) | F3 answer (s) |"
        )
        print("| --- | --- | --- | --- | --- |")
        for name, b1, p1, held, worst, took in rows:
            capped = "+" if held >= a.trickle_cap else ""
            print(f"| {name} | {b1:.0f} -> {p1:.0f} | {held:.1f}{capped} | {worst * 1000:.0f} | {took:.2f} |")
    finally:
        backend.stop()
        sim.proc.stop()


if __name__ == "__main__":
    main()
