"""Start and stop simulated fleets and routers as subprocesses, for the demo, the comparison and
the multi-process tests (tests/support/procs.py, tests/support/harness.py build on this).

Every process gets its own session (process group) and log file and is stopped with SIGTERM,
then SIGKILL, by ``Proc.stop()`` or ``ProcGroup.close()``, which the demo calls in ``finally``
(also on Ctrl-C). Ports are picked free on loopback; ``kvrouter sim`` binds port 0 itself and
announces what it got (``replica NAME url=URL events=ENDPOINT ...`` lines, then ``ready``), which
``wait_sim_ready`` parses.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]


_handed_out: set[int] = set()


def _explicit_port_range() -> range:
    """Ports below the kernel's ephemeral range: the kernel never picks them for a ``bind(0)`` or an
    outgoing connection, so a port handed out here can only be taken by another explicit bind."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    # Hosts that widen the ephemeral range (e.g. 1024-65535) leave few ports below it: use what
    # there is, or the ports above it when it ends early.
    if low - 10000 >= 1000:
        return range(10000, low)
    if low - 1024 >= 1000:
        return range(1024, low)
    return range(1024, 65536)


def _bindable(port: int) -> bool:
    # The wildcard address: engines (ZMQ publishers, NIXL side channels) bind every interface.
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


_PORTS = _explicit_port_range()
# Each process walks the range from its own place so two test runs on one machine rarely meet.
_next_port = [_PORTS.start + (os.getpid() * 7919) % len(_PORTS)]


def free_port() -> int:
    """A port free now, never handed out before by this process, and outside the kernel's
    ephemeral range: an ephemeral port that is free when asked for can be taken a moment later by a
    starting engine's own sockets (a vLLM replica's KV-event port was lost that way in CI)."""
    for _ in range(len(_PORTS)):
        port = _next_port[0]
        _next_port[0] = port + 1 if port + 1 < _PORTS.stop else _PORTS.start
        if port not in _handed_out and _bindable(port):
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port that was not handed out before")


def http_get(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


class Proc:
    def __init__(
        self, args: Sequence[str], name: str, log_dir: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.args = list(args)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.p = subprocess.Popen(
            self.args,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,  # Ctrl-C in the terminal reaches us only; we stop the group
        )

    def log(self, tail: int | None = 3000) -> str:
        """The last ``tail`` characters of the log (for error messages); ``None``: all of it."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text if tail is None else text[-tail:]

    def alive(self) -> bool:
        return self.p.poll() is None

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the whole process group (the process and anything it started)."""
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
        if not self._log.closed:
            self._log.close()
        return self.p.returncode


class ProcGroup:
    """Everything one run started; ``close()`` stops it in reverse order."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[Proc] = []

    def start(self, args: Sequence[str], name: str, env: dict[str, str] | None = None) -> Proc:
        p = Proc(args, name, self.log_dir, env)
        self.procs.append(p)
        return p

    def close(self, timeout: float = 5.0) -> None:
        # SIGTERM everything first, then wait: stopping in parallel keeps Ctrl-C snappy.
        for p in reversed(self.procs):
            if p.alive():
                p.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in reversed(self.procs):
            p.stop(timeout=max(deadline - time.monotonic(), 0.1))
        self.procs.clear()

    def __enter__(self) -> ProcGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_http(
    url: str,
    proc: Proc | None = None,
    timeout: float = 30.0,
    ok: Sequence[int] = (200,),
    interval: float = 0.05,
) -> None:
    """Poll ``GET url`` until it answers one of ``ok``; fails early if ``proc`` exits meanwhile."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.p.returncode}:\n{proc.log()}")
        try:
            code = http_get(url, timeout=1.0)
            if code in ok:
                return
            last = code
        except (OSError, urllib.error.URLError) as exc:
            last = exc
        time.sleep(interval)
    where = f"{proc.name}: " if proc is not None else ""
    raise TimeoutError(
        f"{where}{url} not {'/'.join(map(str, ok))} after {timeout:g} s (last: {last})"
        + (f"\n{proc.log()}" if proc is not None else "")
    )


_REPLICA = re.compile(r"^replica (\S+) url=(\S+) events=(\S+)", re.M)
_READY = re.compile(r"^ready$", re.M)


@dataclass(frozen=True)
class SimReplica:
    """One replica as ``kvrouter sim`` announces it."""

    name: str
    url: str
    events: str  # its KV-event ZMQ endpoint ("None" with --no-events)


def sim_command(
    replicas: int,
    *,
    profile: str,
    model: str | None = None,
    time_scale: float | None = None,
    num_gpu_blocks: int | None = None,
    block_size: int | None = None,
    extra: Sequence[str] = (),
    prefix: Sequence[str] = (),
) -> list[str]:
    """``kvrouter sim`` on port 0 for HTTP and KV events (the sim binds free ports itself, so tests
    running side by side never race for a port range); ``extra`` comes last and so wins.
    ``prefix`` goes before the interpreter: a launcher such as ``taskset -c 1``."""
    args = [
        *prefix,
        PY,
        "-m",
        "router",
        "sim",
        "--replicas",
        str(replicas),
        "--port",
        "0",
        "--events-port",
        "0",
        "--profile",
        profile,
    ]
    if time_scale is not None:
        args += ["--time-scale", str(time_scale)]
    if model:
        args += ["--model", model]
    if num_gpu_blocks is not None:
        args += ["--num-gpu-blocks", str(num_gpu_blocks)]
    if block_size is not None:
        args += ["--block-size", str(block_size)]
    return [*args, *extra]


def wait_sim_ready(proc: Proc, replicas: int, timeout: float = 30.0) -> list[SimReplica]:
    """The replicas a ``kvrouter sim`` process announced, once it printed ``ready``.

    On any failure (the process exited, ``timeout`` passed, the wrong number of replica lines) the
    process is stopped, SIGKILL if need be, before the error is raised: nothing outlives a failed start.
    """
    deadline = time.monotonic() + timeout
    while True:
        text = proc.log(tail=None)
        if _READY.search(text):
            found = [SimReplica(*m.groups()) for m in _REPLICA.finditer(text)]
            if len(found) == replicas:
                return found
            error: Exception = RuntimeError(
                f"{proc.name} printed {len(found)} replica lines, expected {replicas}:\n{text[-3000:]}"
            )
        elif not proc.alive():
            error = RuntimeError(f"{proc.name} exited with {proc.p.returncode}:\n{text[-3000:]}")
        elif time.monotonic() > deadline:
            error = TimeoutError(f"{proc.name} not ready after {timeout:g} s:\n{text[-3000:]}")
        else:
            time.sleep(0.05)
            continue
        proc.stop()
        raise error


def start_sim(
    group: ProcGroup,
    *,
    replicas: int,
    profile: str = "h100-llama3-8b",
    model: str | None = None,
    time_scale: float = 1.0,
    num_gpu_blocks: int | None = None,
    block_size: int | None = None,
    extra: Sequence[str] = (),
    timeout: float = 30.0,
    prefix: Sequence[str] = (),
) -> tuple[Proc, list[str]]:
    """``kvrouter sim`` on free ports; returns the process and the replica URLs once it says ``ready``.
    ``extra`` and ``prefix`` as in ``sim_command``."""
    args = sim_command(
        replicas,
        profile=profile,
        model=model,
        time_scale=time_scale,
        num_gpu_blocks=num_gpu_blocks,
        block_size=block_size,
        extra=extra,
        prefix=prefix,
    )
    proc = group.start(args, "sim")
    return proc, [r.url for r in wait_sim_ready(proc, replicas, timeout)]


def start_kvrouter(
    group: ProcGroup, backends: Sequence[str], policy: str, name: str, extra: Sequence[str] = ()
) -> tuple[Proc, str]:
    port = free_port()
    # No drain grace: nothing deregisters a demo router, and stopping should take no time. No
    # generation canary: its one-token requests to idle replicas would enter the engines' counters
    # that the replay report compares with the router's own.
    args = [
        PY,
        "-m",
        "router",
        "serve",
        "--port",
        str(port),
        "--policy",
        policy,
        "--probe-interval",
        "0.5",
        "--drain-grace",
        "0",
        "--drain-timeout",
        "2",
        "--canary-after",
        "0",
    ]
    for b in backends:
        args += ["--backend", b]
    proc = group.start([*args, *extra], name)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/ready", proc)
    return proc, url


# --- peer routers (make compare), run from their own virtualenv ------------------------------------------

PEERS_VENV = ROOT / ".venv-peers"
PEER_PACKAGES = ("sglang-router", "vllm-router")


def ensure_peers_venv(venv: Path = PEERS_VENV, log: Path | None = None) -> str | None:
    """Create ``venv`` with the peer routers if it lacks them; a separate venv, so their pins
    never touch ours. Returns None when ready, else the error text."""
    py = venv / "bin" / "python"
    check = [str(py), "-c", "import sglang_router, vllm_router"]
    if py.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return None
    steps = [[PY, "-m", "venv", str(venv)], [str(py), "-m", "pip", "install", "-q", *PEER_PACKAGES]]
    for cmd in steps:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            return f"{' '.join(cmd)} failed ({r.returncode}):\n{(r.stdout + r.stderr)[-2000:]}"
    r = subprocess.run(check, capture_output=True, text=True)
    return None if r.returncode == 0 else r.stderr[-2000:]


def start_sglang_router(
    group: ProcGroup,
    backends: Sequence[str],
    policy: str = "cache_aware",
    venv: Path = PEERS_VENV,
    name: str = "sglang-router",
) -> tuple[Proc, str]:
    """SGLang Model Gateway (pip ``sglang-router``) in its plain HTTP-proxy mode (no tokenizer)."""
    command = [str(venv / "bin" / "python"), "-m", "sglang_router.launch_router"]
    return _start_peer_router(group, command, backends, policy, "warn", name)


def start_vllm_router(
    group: ProcGroup,
    backends: Sequence[str],
    policy: str = "cache_aware",
    venv: Path = PEERS_VENV,
    name: str = "vllm-router",
) -> tuple[Proc, str]:
    """vLLM router (pip ``vllm-router``, a fork of the SGLang router) with its cache_aware policy.

    In 0.1.17 cache_aware routes on token ids: before each text-prompt request it POSTs the body to
    ``/v1/completions/render`` on every worker, then ``/tokenize`` where that is 404 (the sim),
    with a 1 s budget; no flag turns this off. Token-id prompts skip it."""
    return _start_peer_router(group, [str(venv / "bin" / "vllm-router")], backends, policy, "warning", name)


def _start_peer_router(
    group: ProcGroup, command: Sequence[str], backends: Sequence[str], policy: str, log_level: str, name: str
) -> tuple[Proc, str]:
    """The SGLang router and its vllm-router fork share their flags (only the log-level names differ)."""
    port = free_port()
    args = [
        *command,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--policy",
        policy,
        "--worker-urls",
        *backends,
    ]
    args += ["--prometheus-port", str(free_port()), "--log-level", log_level]
    proc = group.start(args, name)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", proc, timeout=60)
    return proc, url


def write_word_tokenizer(folder: Path) -> Path:
    """A word-level ``tokenizer.json`` over ``traces.synth.WORDS``: one token per word, spaces split.

    Text prompts from ``PromptSynth.text`` then have exactly the trace's token counts in the sim
    (whose built-in tokenizer makes every space a token too, doubling them) and in a router given
    the same file (``kvrouter serve --tokenizer``). Ids 0-5 are the sim's special tokens, as in
    its built-in tokenizer. Needs the ``tokenizers`` package (the ``tokenizer`` extra)."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers

    from .synth import WORDS

    try:
        from engines.sim.replica.tokenizer import SPECIAL_TOKENS
    except ImportError:  # pragma: no cover - engines/ ships with traces/
        SPECIAL_TOKENS = (
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|pad|>",
            "<|user|>",
            "<|assistant|>",
            "<|system|>",
        )
    vocab = {t: i for i, t in enumerate((*SPECIAL_TOKENS, *WORDS, "[UNK]"))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"bos_token": SPECIAL_TOKENS[0], "eos_token": SPECIAL_TOKENS[1], "add_bos_token": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder
