"""KV-event ingest rate on one core: decode + re-hash + map + index update, in blocks/s.

    .venv/bin/python tests/bench/bench_kv_events.py [--blocks 400000] [--block-size 16]

Streams are pre-encoded with router/kv/wire.py exactly as vLLM 0.32 sends them (and in the legacy
array shape), so only the router's side is timed. Two sinks: a no-op (decode, re-hash and map alone)
and the router's PrefixIndex. Target: >= 200k blocks/s.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry

from router.index import PrefixIndex
from router.kv import wire as kv_wire
from router.kv.apply import IndexSink
from router.kv.metrics import KVEventMetrics
from router.kv.stream import ReplicaEvents
from router.types import BlockHash, ReplicaId, Tier


class NullSink:
    """An IndexSink that does nothing, so the timing is the applier's alone. Not tests/router's
    FakeIndex: that one counts and checks every call, which is the cost this sink leaves out."""

    def store(
        self,
        replica: ReplicaId,
        hashes: Sequence[BlockHash],
        tier: Tier = Tier.GPU,
        *,
        speculative: bool = False,
    ) -> None:
        pass

    def remove(self, replica: ReplicaId, hashes: Sequence[BlockHash], tier: Tier = Tier.GPU) -> None:
        pass

    def clear(self, replica: ReplicaId, tier: Tier | None = None) -> None:
        pass


def real_index() -> PrefixIndex:
    """The router's own PrefixIndex: the ingest rate that matters is into the real structure."""
    index = PrefixIndex(capacity_per_replica=1 << 20)
    index.add_replica(ReplicaId("bench"))
    return index


def make_stream(
    total_blocks: int, bs: int, cache_blocks: int, legacy: bool, seed: int = 1
) -> tuple[list[bytes], int]:
    """vLLM-like batches: prompts of 8..64 new blocks (half extend a shared system prompt), one-block
    decode continuations, and LRU evictions once the simulated cache is full."""
    rng = random.Random(seed)
    next_hash = 1 << 63  # engine hashes above i64, as vLLM's u64 ints often are
    cached: list[int] = []
    system = [rng.randrange(32000) for _ in range(bs * 8)]
    out: list[bytes] = []
    blocks = 0
    ts = 1.0e9
    while blocks < total_blocks:
        events: list[kv_wire.KVEvent] = []
        n = rng.randint(8, 64)
        tokens = (system if rng.random() < 0.5 else []) + [rng.randrange(32000) for _ in range(n * bs)]
        n = len(tokens) // bs
        hashes = list(range(next_hash, next_hash + n))
        next_hash += n
        events.append(kv_wire.BlockStored(hashes, None, tokens, bs, None, "GPU", None, [None] * n, 0))
        events.append(
            kv_wire.BlockStored([next_hash], hashes[-1], tokens[:bs], bs, None, "GPU", None, [None], 0)
        )
        cached.extend(hashes)
        cached.append(next_hash)
        next_hash += 1
        blocks += n + 1
        if len(cached) > cache_blocks:
            evict, cached = cached[: len(cached) - cache_blocks], cached[len(cached) - cache_blocks :]
            events.extend(kv_wire.BlockRemoved([h], "GPU", 0) for h in evict)
        ts += 0.01
        out.append(kv_wire.encode_batch(ts, events, 0, legacy=legacy))
    return out, blocks


def run(payloads: list[bytes], sink: IndexSink, capacity: int) -> float:
    ev = ReplicaEvents(
        ReplicaId("bench"), sink, model="m", capacity=capacity, metrics=KVEventMetrics(CollectorRegistry())
    )
    t0 = time.perf_counter()
    for seq, p in enumerate(payloads):
        ev.on_message(seq, p)
    dt = time.perf_counter() - t0
    assert ev.stats.orphans == 0 and ev.stats.decode_errors == 0 and ev.stats.gaps == 0
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=400_000)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--cache-blocks", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    for legacy in (False, True):
        payloads, blocks = make_stream(args.blocks, args.block_size, args.cache_blocks, legacy)
        mb = sum(map(len, payloads)) / 1e6
        sinks: tuple[tuple[str, Callable[[], IndexSink]], ...] = (
            ("null-sink", NullSink),
            ("PrefixIndex", real_index),
        )
        for name, mk in sinks:
            best = min(run(payloads, mk(), args.cache_blocks * 2) for _ in range(args.repeat))
            print(
                f"{'legacy' if legacy else 'v0.32 '} {name}: {blocks} stored blocks in {len(payloads)} batches "
                f"({mb:.1f} MB) -> {blocks / best / 1e3:,.0f}k blocks/s, {len(payloads) / best:,.0f} batches/s"
            )


if __name__ == "__main__":
    main()
