"""Start N simulated vLLM replicas in one process and one event loop (tests, demo, ``kvrouter sim``).

    async with start_fleet(FleetConfig(n=2, profile="tiny")) as fleet:
        fleet.replicas[0].url                 # http://127.0.0.1:PORT
        fleet.replicas[0].events_endpoint     # where a SUB connects (the PUB binds)
        fleet.replicas[0].replay_endpoint     # ROUTER for replay
        await fleet.replicas[1].set_faults(FaultConfig(error_rate=1.0))
        fleet.replicas[0].model               # the EngineModel (cache state, queues)

Ports: ``port`` 0 (default) gives every replica its own free port; a fixed ``port`` P gives
P..P+N-1, and likewise ``events_port`` Q and ``replay_port`` R. Every socket is on ``host``
(loopback by default); the PUB socket binds there (a concrete host with vLLM's heuristic would
connect, which is not what a stand-alone fleet wants).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import zmq.asyncio

from .model.profiles import get_profile
from .model.structs import EngineConfig
from .replica.config import ReplicaConfig
from .replica.faults import FaultConfig
from .replica.http_api import build_app
from .replica.runtime import ReplicaRuntime
from .replica.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

# How much lower than the engine loop ZMQ's own threads run (Linux nice levels, see below).
ZMQ_THREAD_NICE = 10


@dataclass
class Fleet:
    replicas: list[ReplicaRuntime]

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    def __len__(self) -> int:
        return len(self.replicas)

    def __getitem__(self, i: int) -> ReplicaRuntime:
        return self.replicas[i]


def engine_config(
    profile: str = "tiny",
    *,
    time_scale: float = 1.0,
    block_size: int | None = None,
    num_gpu_blocks: int | None = None,
    cpu_tier_tokens: int | None = None,
) -> EngineConfig:
    """An engine config from a named profile plus the overrides the CLI exposes.
    ``time_scale`` divides step durations (2 = twice as fast)."""
    prof = get_profile(profile)
    return EngineConfig.from_profile(
        prof,
        block_size=block_size,
        time_scale=time_scale,
        num_gpu_blocks=num_gpu_blocks,
        cpu_tier_tokens=cpu_tier_tokens,
    )


# Context length per profile: the tiny test model's 2048, Llama-3.1-8B's 128k.
MAX_MODEL_LEN = {"tiny": 2048, "h100-llama3-8b": 131_072}


def _port(base: int | None, i: int) -> int:
    return 0 if not base else base + i


@dataclass(frozen=True)
class FleetConfig:
    """What ``start_fleet`` runs: ``n`` replicas of one engine profile, and their settings.

    ``events_port=None`` disables KV events; ``replay_port=None`` disables the replay socket.
    Replica ``i`` uses seed ``seed + i``. ``first_index``: the replicas are named
    ``r{first_index}``... (one worker of several). ``max_model_len`` None: the profile's
    (``MAX_MODEL_LEN``). ``tokenizer``: a loaded one, a path, or None for the built-in one."""

    n: int = 1
    profile: str = "tiny"
    model: str = "tiny"
    host: str = "127.0.0.1"
    port: int = 0
    events_port: int | None = 0
    replay_port: int | None = 0
    time_scale: float = 1.0
    block_size: int | None = None
    num_gpu_blocks: int | None = None
    cpu_tier_tokens: int | None = None
    legacy_events: bool = False
    int_block_hashes: bool = True
    kv_event_hashes: str = "vllm"
    topic: str = "kv-events"
    buffer_steps: int = 10_000
    max_model_len: int | None = None
    tokenizer: str | Tokenizer | None = None
    faults: FaultConfig | None = None
    seed: int = 0
    stream_interval: int = 1
    first_index: int = 0
    role: str = "both"  # PD role of every replica (nixl.py)
    kv_lease_s: float = 30.0
    kv_load_failure_policy: str = "fail"

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"invalid n: must be >= 1 (current value: {self.n})")
        if self.stream_interval < 1:
            raise ValueError(f"invalid stream_interval: must be >= 1 (current value: {self.stream_interval})")

    def replica_config(self, i: int) -> ReplicaConfig:
        """Replica ``i``'s settings: its ports, its seed, the rest shared."""
        host = self.host
        ev = None if self.events_port is None else f"tcp://{host}:{_port(self.events_port, i) or '*'}"
        rp = None if self.replay_port is None else f"tcp://{host}:{_port(self.replay_port, i) or '*'}"
        return ReplicaConfig(
            model=self.model,
            host=host,
            port=_port(self.port, i),
            events_endpoint=ev,
            events_bind=True,
            replay_endpoint=rp,
            topic=self.topic,
            buffer_steps=self.buffer_steps,
            legacy_events=self.legacy_events,
            int_block_hashes=self.int_block_hashes,
            kv_event_hashes=self.kv_event_hashes,
            max_model_len=self.max_model_len or MAX_MODEL_LEN.get(self.profile, 2048),
            faults=self.faults or FaultConfig(),
            seed=self.seed + i,
            stream_interval=self.stream_interval,
            role=self.role,
            kv_lease_s=self.kv_lease_s,
            kv_load_failure_policy=self.kv_load_failure_policy,
        )


@contextlib.asynccontextmanager
async def start_fleet(config: FleetConfig) -> AsyncIterator[Fleet]:
    """Run ``config.n`` replicas until the block exits."""
    c = config
    tok = (
        c.tokenizer
        if c.tokenizer is not None and not isinstance(c.tokenizer, str)
        else load_tokenizer(c.tokenizer)
    )
    io_before = _zmq_io_threads()
    ctx = zmq.asyncio.Context()  # its I/O threads start with its first socket
    replicas: list[ReplicaRuntime] = []
    prep_lock = asyncio.Lock()  # one long request preparation at a time, fleet-wide
    try:
        for i in range(c.n):
            ec = engine_config(
                c.profile,
                time_scale=c.time_scale,
                block_size=c.block_size,
                num_gpu_blocks=c.num_gpu_blocks,
                cpu_tier_tokens=c.cpu_tier_tokens,
            )
            rep = ReplicaRuntime(
                c.replica_config(i), ec, tok, name=f"r{c.first_index + i}", zmq_ctx=ctx, prep_lock=prep_lock
            )
            replicas.append(rep)
            await rep.start(build_app(rep))
        if c.events_port is not None:  # the publishers' sockets start the context's I/O thread
            await _zmq_io_thread_started(io_before)
        lower_zmq_threads(ZMQ_THREAD_NICE)
        yield Fleet(replicas)
    finally:
        for rep in replicas:
            await rep.stop()
        ctx.destroy(linger=0)


def _zmq_threads() -> dict[int, str]:
    """This process's ZMQ background threads: thread id -> name (``ZMQbg/IO/0``, ``ZMQbg/Reaper``);
    empty where threads are not listed (not Linux), or before a thread has named itself."""
    try:
        names = os.listdir("/proc/self/task")
    except OSError:  # not Linux
        return {}
    out: dict[int, str] = {}
    for name in names:
        with contextlib.suppress(OSError), open(f"/proc/self/task/{name}/comm") as f:
            comm = f.read().strip()
            if comm.startswith("ZMQbg/"):
                out[int(name)] = comm
    return out


def _zmq_io_threads() -> int:
    return sum(comm.startswith("ZMQbg/IO") for comm in _zmq_threads().values())


async def _zmq_io_thread_started(before: int, timeout: float = 1.0) -> None:
    """Wait (at most ``timeout``) until there are more ZMQ I/O threads than ``before``: libzmq
    starts a context's I/O thread with its first socket, and the thread names itself only when
    it first runs, so on a busy core ``lower_zmq_threads`` could otherwise miss it (it did: a
    flaky test under CI load). Counted, not listed by id, since a thread id can be reused."""
    if not os.path.isdir("/proc/self/task"):  # not Linux: nothing to wait for, nothing lowered
        return
    deadline = time.monotonic() + timeout
    while _zmq_io_threads() <= before and time.monotonic() < deadline:
        await asyncio.sleep(0.002)


def lower_zmq_threads(nice: int) -> list[int]:
    """Run this process's ZMQ background threads (the I/O thread sends every KV-event batch)
    ``nice`` levels below the calling thread (the event loop's); returns the thread ids set
    (Linux only, nothing elsewhere). Idempotent: the level is relative to the caller, not to the
    thread's current one, so a second fleet in the same process (tests) does not lower the
    first one's threads again, and no list of threads "from before" is needed (a thread id
    can be reused as soon as its thread ends).

    Why: the fleet's replicas share one core (``kvrouter sim`` is pinned to one in the capacity
    bench), and at the same priority every ZMQ send woke the I/O thread, which preempted the
    engine loop at once: ~74 us of the loop's wall time per send on average, up to ms. Ten
    levels lower it runs when the loop waits, and still gets a fair (~10%) share of a saturated
    core, so events are not starved (``SCHED_IDLE`` was measured too: it can starve). Measured:
    in four interleaved pairs, 94.7-97.5% of steps within 5 ms against 92.4-95.6%.
    """
    changed: list[int] = []
    threads = _zmq_threads()
    if not threads:  # none yet, or not Linux (no per-thread nice levels)
        return changed
    level = min(19, os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) + nice)
    for tid in threads:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, level)
            changed.append(tid)
        except OSError as exc:  # the thread ended, or no permission: leave it
            log.debug("could not lower ZMQ thread %s: %s", tid, exc)
    return changed
