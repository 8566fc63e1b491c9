"""Start real processes on loopback for integration tests: fake backends, sim fleets, routers.

Every process gets a free port, a log file, and is killed (process group) at teardown.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from traces.fleetproc import free_port

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


def http(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None, timeout: float = 10.0
         ) -> tuple[int, dict[str, str], bytes]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


class Proc:
    def __init__(self, args: Sequence[str], name: str, log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.p = subprocess.Popen(
            list(args), cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.p.poll() is None

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.p.pid, sig)

    def stop(self, timeout: float = 5.0) -> int | None:
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.p.wait(5)
        self._log.close()
        return self.p.returncode


def wait_http(url: str, timeout: float = 20.0, status: int = 200, proc: Proc | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.log()[-3000:]}")
        try:
            code, _, _ = http("GET", url, timeout=1.0)
            if code == status:
                return
            last = code
        except (OSError, urllib.error.URLError) as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{url} not {status} after {timeout}s (last: {last})" + (f"\n{proc.log()[-3000:]}" if proc else ""))


class Backend:
    def __init__(self, log_dir: Path, name: str, model: str = "fake-model", chunks: int = 16, chunk_delay: float = 0.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = Proc(
            [PY, "-m", "tests.support.fake_openai", "--port", str(self.port), "--name", name, "--model", model,
             "--chunks", str(chunks), "--chunk-delay", str(chunk_delay)],
            name, log_dir,
        )
        wait_http(self.url + "/health", proc=self.proc)

    def control(self, **kw: Any) -> None:
        http("POST", self.url + "/_control", kw)

    def stats(self) -> dict[str, Any]:
        return json.loads(http("GET", self.url + "/_stats")[2])


class RouterProc:
    def __init__(self, log_dir: Path, backends: Sequence[str], *extra: str, name: str = "router",
                 env: dict[str, str] | None = None, wait_ready: bool = True) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [PY, "-m", "router", "serve", "--port", str(self.port), "--probe-interval", "0.2"]
        for b in backends:
            args += ["--backend", b]
        self.proc = Proc([*args, *extra], name, log_dir, env)
        wait_http(self.url + "/health", proc=self.proc)
        if wait_ready:
            wait_http(self.url + "/ready", proc=self.proc)

    def metrics(self) -> str:
        return http("GET", self.url + "/metrics")[2].decode()


@contextlib.contextmanager
def stopping(*procs: Proc) -> Iterator[None]:
    try:
        yield
    finally:
        for p in procs:
            p.stop()


class SimFleet:
    """`kvrouter sim` in a subprocess: N simulated vLLM replicas with KV events."""

    def __init__(self, log_dir: Path, replicas: int = 2, *extra: str, profile: str = "tiny", name: str = "sim") -> None:
        # Port 0 everywhere: the sim binds free ports itself and prints them (no races between
        # consecutive port ranges of parallel tests).
        args = [PY, "-m", "router", "sim", "--replicas", str(replicas), "--port", "0",
                "--profile", profile, "--events-port", "0", *extra]
        self.proc = Proc(args, name, log_dir)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = self.proc.log()
            if "ready" in text.split():
                break
            if not self.proc.alive():
                self.proc.stop()
                raise RuntimeError(f"sim exited:\n{text[-3000:]}")
            time.sleep(0.05)
        else:
            raise TimeoutError(f"sim not ready:\n{self.proc.log()[-3000:]}")
        self.urls = [tok.split("=", 1)[1] for tok in self.proc.log().split() if tok.startswith("url=")]
        assert len(self.urls) == replicas, self.proc.log()
        for u in self.urls:
            wait_http(u + "/health", proc=self.proc)
