"""Faults on demand for reliability tests: what a sick vLLM replica does to a router.

A ``FaultConfig`` is plain data (JSON over ``POST /sim/faults``, CLI flags, or the fleet API);
``Faults`` holds the live config plus a seeded RNG, so a test that fixes ``seed`` sees the same
requests fail every run. Knobs:

* ``refuse_connections``: the replica stops listening (connect() is refused, like a dead process);
  it re-listens on the same port when cleared. ``refuse_for_s`` > 0 clears it by itself after that
  long, which is the only way to clear it over HTTP (the control endpoint is on the same port).
* ``error_rate``: that fraction of completion requests gets HTTP 500 with an OpenAI error body.
* ``stall_s``: wait that long before the first response byte; ``stall_forever`` waits until the
  fault is cleared or the client goes away.
* ``die_after_chunks``: a streaming response is cut (TCP abort, no ``[DONE]``, no chunked-encoding
  terminator) after that many SSE chunks; non-streaming responses are cut before the body.
* ``restart``: an action, not a state: the engine restarts now: in-flight requests are cut, the
  KV cache is empty, KV-event seq starts again at 0, and no AllBlocksCleared is sent (a real
  restart just starts over).
* ``slow_factor``: every engine step takes that many times longer (thermal throttling, a noisy
  neighbour): TTFT and inter-token latency grow, ``/health`` is unaffected.
* ``stuck``: the engine loop stops (no step runs, nothing streams) while ``/health`` stays 200,
  like a hung vLLM engine core; clearing it resumes the loop.
* ``stop_after_chunks``: a streaming response stops after that many SSE chunks with the
  connection left open (no RST, no terminator) until the client goes away or the fault changes.
* ``preemption_rate``: that fraction of engine steps preempts a running request: the step takes
  twice as long (its KV is recomputed) and ``vllm:num_preemptions_total`` counts it.
* ``health_stall_s``: ``GET /health`` answers 200 after that long (a loaded host: probes time
  out while requests are served).
* ``malformed_event_rate`` / ``reorder_event_rate``: that fraction of KV-event batches is sent as
  undecodable bytes / swapped with the next batch (seq n+1 arrives before seq n).
"""

from __future__ import annotations

import asyncio
import math
import random

import msgspec


class FaultConfig(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    refuse_connections: bool = False
    refuse_for_s: float = 0.0
    error_rate: float = 0.0
    stall_s: float = 0.0
    stall_forever: bool = False
    die_after_chunks: int | None = None
    malformed_event_rate: float = 0.0
    reorder_event_rate: float = 0.0
    restart: bool = False
    slow_factor: float = 1.0
    stuck: bool = False
    stop_after_chunks: int | None = None
    preemption_rate: float = 0.0
    health_stall_s: float = 0.0

    def validate(self) -> None:
        if not (1.0 <= self.slow_factor <= 1000.0):
            raise ValueError(
                f"invalid fault slow_factor: must be within [1, 1000] (current value: {self.slow_factor})"
            )
        if self.stop_after_chunks is not None and self.stop_after_chunks < 0:
            raise ValueError(
                f"invalid fault stop_after_chunks: must be >= 0 (current value: {self.stop_after_chunks})"
            )
        for name in ("error_rate", "malformed_event_rate", "reorder_event_rate", "preemption_rate"):
            v = getattr(self, name)
            if not (0.0 <= v <= 1.0) or math.isnan(v):
                raise ValueError(f"invalid fault {name}: must be within [0, 1] (current value: {v})")
        for name in ("refuse_for_s", "stall_s", "health_stall_s"):
            v = getattr(self, name)
            if not (v >= 0.0) or math.isinf(v):
                raise ValueError(f"invalid fault {name}: must be a finite number >= 0 (current value: {v})")
        if self.die_after_chunks is not None and self.die_after_chunks < 0:
            raise ValueError(
                f"invalid fault die_after_chunks: must be >= 0 (current value: {self.die_after_chunks})"
            )


_decoder = msgspec.json.Decoder(FaultConfig)


def parse_faults(body: bytes) -> FaultConfig:
    """JSON body -> validated config (raises ValueError with field, value and reason)."""
    try:
        cfg = _decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise ValueError(f"invalid fault config: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise ValueError(f"invalid fault config JSON: {exc}") from exc
    cfg.validate()
    return cfg


class Faults:
    """Live fault state of one replica. Only the event loop touches it."""

    def __init__(self, config: FaultConfig | None = None, seed: int = 0) -> None:
        self.config = config or FaultConfig()
        self.config.validate()
        self.rng = random.Random(seed)
        # Set on every change, so an open-ended stall ends as soon as the fault is cleared.
        self._changed = asyncio.Event()
        self.injected: dict[str, int] = {}

    def set(self, config: FaultConfig) -> None:
        config.validate()
        # ``restart`` is one-shot: whoever applies the config performs it; it is never stored.
        self.config = msgspec.structs.replace(config, restart=False)
        self._changed.set()
        self._changed = asyncio.Event()

    def clear(self) -> None:
        self.set(FaultConfig())

    def count(self, kind: str) -> None:
        self.injected[kind] = self.injected.get(kind, 0) + 1

    def _roll(self, rate: float) -> bool:
        return rate > 0.0 and (rate >= 1.0 or self.rng.random() < rate)

    def should_fail(self) -> bool:
        hit = self._roll(self.config.error_rate)
        if hit:
            self.count("error")
        return hit

    def malformed_event(self) -> bool:
        hit = self._roll(self.config.malformed_event_rate)
        if hit:
            self.count("malformed_event")
        return hit

    def reorder_event(self) -> bool:
        hit = self._roll(self.config.reorder_event_rate)
        if hit:
            self.count("reorder_event")
        return hit

    def stalls(self) -> bool:
        """Whether ``stall()`` would wait now."""
        return self.config.stall_forever or self.config.stall_s > 0

    async def stall(self) -> None:
        """Hold the response before its first byte, as configured (bounded unless stall_forever)."""
        cfg = self.config
        if not cfg.stall_forever and cfg.stall_s <= 0:
            return
        self.count("stall")
        changed = self._changed
        timeout = None if cfg.stall_forever else cfg.stall_s
        # Ends at the timeout, when faults change (stall_forever), or when the handler is cancelled
        # because the client disconnected.
        try:
            await asyncio.wait_for(changed.wait(), timeout)
        except TimeoutError:
            pass

    def die_after(self) -> int | None:
        return self.config.die_after_chunks

    def stop_after(self) -> int | None:
        return self.config.stop_after_chunks

    def preempts(self) -> bool:
        hit = self._roll(self.config.preemption_rate)
        if hit:
            self.count("preemption")
        return hit

    async def until_changed(self) -> None:
        """Wait for the next fault change (stuck engines and stopped streams wait here)."""
        await self._changed.wait()
