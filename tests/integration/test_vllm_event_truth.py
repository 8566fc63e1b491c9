"""Events that do not lie, from a real vLLM 0.32 CPU capture (audit #41): requests with
``vllm_xargs={"kv_cache_report_mode": "full"}`` make the engine re-announce the prefix they reuse.
The raw frames are replayed into the router's stream and index: after vLLM evicts the prefix, the
router must hold none of it either (each re-announcement used to add a reference that no
BlockRemoved ever took back)."""

from __future__ import annotations

import threading
import time

import pytest
import zmq
from prometheus_client import CollectorRegistry

from router.hashing import hash_token_blocks, model_seed
from router.index import PrefixIndex
from router.kv.decode import BlockStoredView, decode_batch
from router.kv.metrics import KVEventMetrics
from router.kv.stream import ReplicaEvents
from router.types import ReplicaId
from tests.integration.vllm_fixtures import (
    BLOCK_SIZE,
    CACHE_BLOCKS,
    Replica,
    cached_tokens,
    complete,
    http,
    token_prompt,
)

pytestmark = pytest.mark.vllm
PROMPT_BLOCKS = 20


@pytest.fixture(scope="module")
def replica(vllm_pair: list[Replica]) -> Replica:
    """One plain replica with an empty prefix cache (conftest.py's shared pair, reset for this module)."""
    return vllm_pair[1]


class RawFrames:
    def __init__(self, endpoint: str) -> None:
        self.frames: list[tuple[int, bytes]] = []
        self._ctx = zmq.Context()
        self._sock: zmq.Socket[bytes] = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.connect(endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._sock.poll(100):
                _topic, seq, payload = self._sock.recv_multipart()
                self.frames.append((int.from_bytes(seq, "big"), payload))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()
        self._ctx.term()


def test_report_mode_full_reannouncements_leave_no_stale_blocks(replica: Replica) -> None:
    raw = RawFrames(replica.events_endpoint)
    try:
        time.sleep(1.0)  # slow joiner: the subscription must reach the publisher first
        prompt = token_prompt(4242, PROMPT_BLOCKS * BLOCK_SIZE + 1)
        complete(replica.url, prompt)
        for _ in range(3):  # reuse the prefix with report mode "full": vLLM re-announces it
            body = {
                "model": "tiny",
                "prompt": prompt,
                "max_tokens": 1,
                "temperature": 0,
                "vllm_xargs": {"kv_cache_report_mode": "full"},
            }
            reply = http("POST", f"{replica.url}/v1/completions", body)
            assert reply.status == 200, reply.body
            assert cached_tokens(reply) == PROMPT_BLOCKS * BLOCK_SIZE
        for seed in range(CACHE_BLOCKS // PROMPT_BLOCKS + 2):  # fill the cache: the prefix is evicted
            complete(replica.url, token_prompt(9000 + seed, PROMPT_BLOCKS * BLOCK_SIZE + 1))
        time.sleep(1.0)
        frames = list(raw.frames)
    finally:
        raw.close()

    index = PrefixIndex(10_000)
    rid = ReplicaId("r0")
    index.add_replica(rid)
    stream = ReplicaEvents(
        rid, index, model="tiny", block_size=BLOCK_SIZE, metrics=KVEventMetrics(CollectorRegistry())
    )
    for seq, payload in sorted(frames):
        stream.on_message(seq, payload)
    assert stream.stats.decode_errors == 0 and not stream.uncertain
    keys = hash_token_blocks(prompt, BLOCK_SIZE, model_seed("tiny"))
    # the capture holds the re-announcements: the prompt's first block stored 1 + 3 times
    head = prompt[:BLOCK_SIZE]
    announced = sum(
        1
        for _, payload in frames
        for ev in decode_batch(payload).events
        if isinstance(ev, BlockStoredView)
        and ev.parent_block_hash is None
        and ev.token_ids[:BLOCK_SIZE] == head
    )
    assert announced == 4
    router_holds = index.match(keys)[0][0]
    vllm_holds = cached_tokens(complete(replica.url, prompt)) // BLOCK_SIZE
    assert router_holds == vllm_holds == 0
