"""Events that do not lie (audit #39, #41, #44, #45): vLLM 0.32 batch shapes that used to be lost
or to over-claim, fed to a replica's stream with the real PrefixIndex, then matched like routing
does."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from router.hashing import hash_token_blocks, model_seed
from router.index import PrefixIndex
from router.kv import wire as kv_wire
from router.kv.metrics import KVEventMetrics
from router.kv.stream import ReplicaEvents
from router.types import ReplicaId
from tests.support.kv_fixtures import payload, removed, stored

R = ReplicaId("r1")
MODEL = "tiny"
BS = 4
TOKENS = list(range(100, 132))  # 8 blocks of 4
ENGINE = list(range(1, 9))  # engine hashes of those blocks


def setup() -> tuple[ReplicaEvents, PrefixIndex, CollectorRegistry]:
    index = PrefixIndex(1000)
    index.add_replica(R)
    reg = CollectorRegistry()
    ev = ReplicaEvents(R, index, model=MODEL, block_size=BS, metrics=KVEventMetrics(reg))
    return ev, index, reg


def gpu_match(index: PrefixIndex, salt: str | None = None) -> int:
    return index.match(hash_token_blocks(TOKENS, BS, model_seed(MODEL, salt)))[0][0]


def any_match(index: PrefixIndex, salt: str | None = None) -> int:
    return index.match(hash_token_blocks(TOKENS, BS, model_seed(MODEL, salt)))[1][0]


def placeholder() -> kv_wire.BlockStored:
    """OffloadingConnector without self-describing events (offloading/events.py _placeholder_stored)."""
    return kv_wire.BlockStored(ENGINE, None, [], 0, None, "CPU", None, None)


def test_offload_placeholders_do_not_lose_the_gpu_events_of_their_batch() -> None:
    ev, index, reg = setup()
    ev.on_message(0, payload([stored(ENGINE, TOKENS), placeholder()]))
    assert gpu_match(index) == 8
    assert ev.stats.decode_errors == 0 and not ev.uncertain
    ev.on_message(1, payload([removed(ENGINE), placeholder()]))  # the removals arrive too
    assert gpu_match(index) == 0 and any_match(index) == 0
    assert not ev.uncertain
    assert (reg.get_sample_value("kvrouter_kv_events_unmodeled_blocks_total") or 0) >= 8


def test_masked_sliding_window_blocks_are_skipped_not_decode_errors() -> None:
    ev, index, _ = setup()
    # an SWA group with blocks 0-5 masked: 2 hashes for 8 blocks' worth of tokens
    swa = kv_wire.BlockStored([7, 8], None, TOKENS, BS, None, "GPU", None, None, group_idx=1)
    ev.on_message(0, payload([stored(ENGINE, TOKENS), swa]))
    assert ev.stats.decode_errors == 0 and not ev.uncertain
    assert gpu_match(index) == 8


def test_report_mode_full_reannouncements_do_not_inflate_refcounts() -> None:
    ev, index, _ = setup()
    ev.on_message(0, payload([stored(ENGINE, TOKENS)]))
    for seq in (1, 2, 3):  # three requests reuse the prefix with kv_cache_report_mode="full"
        ev.on_message(seq, payload([stored(ENGINE, TOKENS)]))
    ev.on_message(4, payload([removed(ENGINE)]))  # one eviction: vLLM holds none of it
    assert gpu_match(index) == 0


def test_salted_prompts_cpu_copies_keep_the_salt() -> None:
    ev, index, _ = setup()
    salted = stored(ENGINE, TOKENS, extra_keys=[["tenantA"]] + [None] * 7)
    cpu_copy = stored(ENGINE, TOKENS, medium="CPU")  # self-describing offload event: extra_keys None
    ev.on_message(0, payload([salted, cpu_copy]))
    assert gpu_match(index, "tenantA") == 8
    assert any_match(index) == 0  # another tenant (unsalted) gets no CPU-tier hit
    ev.on_message(1, payload([removed(ENGINE)]))  # GPU copy evicted, the CPU copy stays
    assert gpu_match(index, "tenantA") == 0 and any_match(index, "tenantA") == 8
    assert any_match(index) == 0


def test_cpu_copy_extending_a_known_chain_continues_it() -> None:
    ev, index, _ = setup()
    salted = stored(ENGINE[:4], TOKENS[:16], extra_keys=[["tenantA"], None, None, None])
    cpu = stored(ENGINE, TOKENS, medium="CPU")  # 4 known blocks, then 4 the GPU never announced
    ev.on_message(0, payload([salted, cpu]))
    assert any_match(index, "tenantA") == 8 and any_match(index) == 0
