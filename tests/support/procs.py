"""Start real processes on loopback for integration tests: fake backends, sim fleets, routers.

Every process gets a free port, a log file, and is killed (process group) at teardown. Processes,
HTTP readiness and the sim launcher are traces/fleetproc.py's, the ones the demo uses.
"""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from traces.fleetproc import PY, ROOT, Proc, SimReplica, free_port, sim_command, wait_http, wait_sim_ready

__all__ = [
    "PY",
    "ROOT",
    "Backend",
    "Proc",
    "RouterProc",
    "SimFleet",
    "SimReplica",
    "free_port",
    "http",
    "quiet_router",
    "stopping",
    "wait_for",
    "wait_http",
]

T = TypeVar("T")


def http(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None, timeout: float = 10.0
) -> tuple[int, dict[str, str], bytes]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def wait_for(
    pred: Callable[[], T], timeout: float = 10.0, what: str = "condition", interval: float = 0.05
) -> T:
    """Poll ``pred`` until it returns something truthy and return that; AssertionError naming
    ``what`` and the last value after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        last = pred()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


def _ready(proc: Proc, *urls: str) -> None:
    """Wait until every URL answers 200; a process that does not get there is stopped, not leaked."""
    try:
        for url in urls:
            wait_http(url, proc)
    except BaseException:
        proc.stop()
        raise


class Backend:
    def __init__(
        self, log_dir: Path, name: str, model: str = "fake-model", chunks: int = 16, chunk_delay: float = 0.0
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = Proc(
            [
                PY,
                "-m",
                "tests.support.fake_openai",
                "--port",
                str(self.port),
                "--name",
                name,
                "--model",
                model,
                "--chunks",
                str(chunks),
                "--chunk-delay",
                str(chunk_delay),
            ],
            name,
            log_dir,
        )
        _ready(self.proc, self.url + "/health")

    def control(self, **kw: Any) -> None:
        http("POST", self.url + "/_control", kw)

    def stats(self) -> dict[str, Any]:
        return json.loads(http("GET", self.url + "/_stats")[2])


class RouterProc:
    def __init__(
        self,
        log_dir: Path,
        backends: Sequence[str],
        *extra: str,
        name: str = "router",
        env: dict[str, str] | None = None,
        wait_ready: bool = True,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [PY, "-m", "router", "serve", "--port", str(self.port), "--probe-interval", "0.2"]
        for b in backends:
            args += ["--backend", b]
        self.proc = Proc([*args, *extra], name, log_dir, env)
        _ready(self.proc, self.url + "/health", *([self.url + "/ready"] if wait_ready else []))

    def metrics(self) -> str:
        return http("GET", self.url + "/metrics")[2].decode()


def quiet_router(log_dir: Path, backends: Sequence[str], *extra: str, name: str) -> RouterProc:
    """A router for tests of the request path alone: no KV events, no metric scrapes, no drain grace
    (so a stop is immediate)."""
    return RouterProc(
        log_dir,
        backends,
        "--kv-events",
        "off",
        "--scrape-metrics",
        "false",
        "--drain-grace",
        "0",
        *extra,
        name=name,
    )


@contextlib.contextmanager
def stopping(*procs: Proc) -> Iterator[None]:
    try:
        yield
    finally:
        for p in procs:
            p.stop()


class SimFleet:
    """`kvrouter sim` in a subprocess: N simulated vLLM replicas with KV events, on free ports."""

    def __init__(
        self,
        log_dir: Path,
        replicas: int = 2,
        *extra: str,
        profile: str = "tiny",
        name: str = "sim",
        timeout: float = 30.0,
    ) -> None:
        self.proc = Proc(sim_command(replicas, profile=profile, extra=extra), name, log_dir)
        self.replicas: list[SimReplica] = wait_sim_ready(self.proc, replicas, timeout)
        _ready(self.proc, *(u + "/health" for u in self.urls))

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]
