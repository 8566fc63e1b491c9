"""Start N simulated vLLM replicas in one process and one event loop (tests, demo, ``kvrouter sim``).

    async with start_fleet(2, profile="tiny") as fleet:
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
from collections.abc import AsyncIterator
from dataclasses import dataclass

import zmq.asyncio

from .engine import EngineConfig
from .faults import FaultConfig
from .profiles import get_profile
from .server import Replica, ReplicaConfig
from .tokenizer import Tokenizer, load_tokenizer


@dataclass
class Fleet:
    replicas: list[Replica]

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    def __len__(self) -> int:
        return len(self.replicas)

    def __getitem__(self, i: int) -> Replica:
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


@contextlib.asynccontextmanager
async def start_fleet(
    n: int = 1,
    profile: str = "tiny",
    *,
    model: str = "tiny",
    host: str = "127.0.0.1",
    port: int = 0,
    events_port: int | None = 0,
    replay_port: int | None = 0,
    time_scale: float = 1.0,
    block_size: int | None = None,
    num_gpu_blocks: int | None = None,
    cpu_tier_tokens: int | None = None,
    legacy_events: bool = False,
    int_block_hashes: bool = True,
    kv_event_hashes: str = "vllm",
    topic: str = "kv-events",
    buffer_steps: int = 10_000,
    max_model_len: int | None = None,
    tokenizer: str | Tokenizer | None = None,
    faults: FaultConfig | None = None,
    seed: int = 0,
    stream_interval: int = 1,
) -> AsyncIterator[Fleet]:
    """Run ``n`` replicas until the block exits. ``events_port=None`` disables KV events;
    ``replay_port=None`` disables the replay socket. Replica ``i`` uses seed ``seed + i``."""
    if n < 1:
        raise ValueError(f"invalid n: must be >= 1 (current value: {n})")
    if stream_interval < 1:
        raise ValueError(f"invalid stream_interval: must be >= 1 (current value: {stream_interval})")
    tok = tokenizer if tokenizer is not None and not isinstance(tokenizer, str) else load_tokenizer(tokenizer)
    ctx = zmq.asyncio.Context()
    replicas: list[Replica] = []
    prep_lock = asyncio.Lock()  # one long request preparation at a time, fleet-wide
    try:
        for i in range(n):
            ec = engine_config(
                profile,
                time_scale=time_scale,
                block_size=block_size,
                num_gpu_blocks=num_gpu_blocks,
                cpu_tier_tokens=cpu_tier_tokens,
            )
            ev = None if events_port is None else f"tcp://{host}:{_port(events_port, i) or '*'}"
            rp = None if replay_port is None else f"tcp://{host}:{_port(replay_port, i) or '*'}"
            cfg = ReplicaConfig(
                model=model,
                host=host,
                port=_port(port, i),
                events_endpoint=ev,
                events_bind=True,
                replay_endpoint=rp,
                topic=topic,
                buffer_steps=buffer_steps,
                legacy_events=legacy_events,
                int_block_hashes=int_block_hashes,
                kv_event_hashes=kv_event_hashes,
                max_model_len=max_model_len or MAX_MODEL_LEN.get(profile, 2048),
                faults=faults or FaultConfig(),
                seed=seed + i,
                stream_interval=stream_interval,
            )
            rep = Replica(cfg, ec, tok, name=f"r{i}", zmq_ctx=ctx, prep_lock=prep_lock)
            replicas.append(rep)
            await rep.start()
        yield Fleet(replicas)
    finally:
        for rep in replicas:
            await rep.stop()
        ctx.destroy(linger=0)
