"""Engine model: vLLM prefix-hit accounting, chunked prefill within the token budget,
preemption, CPU tier, fast-forward equal to stepping, time_scale, events."""

from __future__ import annotations

import math

import pytest

from engines.sim.model.engine import EngineModel
from engines.sim.model.profiles import H100_LLAMA3_8B, TINY
from engines.sim.model.structs import EngineConfig, SimRequest, StepOutput
from router.kv.wire import AllBlocksCleared, BlockStored


def tokens(n: int, base: int = 0) -> list[int]:
    return [base + i for i in range(n)]


def run(e: EngineModel, t: float = 0.0, max_steps: int = 100_000) -> list[StepOutput]:
    outs = []
    for _ in range(max_steps):
        if not e.has_work():
            break
        o = e.step(t)
        e.check_invariants()
        outs.append(o)
        t = o.end
    return outs


def sim_req(
    rid: str, prompt_len: int, max_tokens: int, bs: int, arrival: float = 0.0, salt: int = 0
) -> SimRequest:
    # Chained ids stand in for engine hashes: a shared `salt` means a shared prefix.
    return SimRequest(
        rid,
        max_tokens=max_tokens,
        prompt_len=prompt_len,
        block_hashes=[salt * 1_000_003 + j + 1 for j in range(prompt_len // bs)],
        arrival=arrival,
    )


@pytest.mark.parametrize(
    ("prompt_len", "bs", "expected_hit"), [(487, 32, 480), (487, 16, 480), (480, 16, 464)]
)
def test_prefix_hit_is_whole_blocks_minus_last_token(prompt_len: int, bs: int, expected_hit: int) -> None:
    e = EngineModel(EngineConfig(num_gpu_blocks=200, block_size=bs), TINY)
    e.add_request(SimRequest("a", max_tokens=2, token_ids=tokens(prompt_len)), 0.0)
    run(e)
    e.add_request(SimRequest("b", max_tokens=2, token_ids=tokens(prompt_len)), 1.0)
    outs = run(e, 1.0)
    assert outs[0].cached_tokens["b"].local == expected_hit
    snap = e.snapshot()
    assert (snap.prefix_cache_queries, snap.prefix_cache_hits) == (2 * prompt_len, expected_hit)
    assert snap.prompt_tokens == 2 * prompt_len and snap.prompt_tokens_cached == expected_hit
    assert snap.request_success == 2 and snap.generation_tokens == 4
    # The recomputed tail is prefilled after the hit: one chunk of prompt_len - hit tokens.
    assert outs[0].num_scheduled_tokens == prompt_len - expected_hit


def test_chunked_prefill_splits_within_budget_and_decodes_go_first() -> None:
    e = EngineModel(EngineConfig(num_gpu_blocks=100, block_size=16, max_num_batched_tokens=32), TINY)
    e.add_request(SimRequest("a", max_tokens=5, token_ids=tokens(20)), 0.0)
    e.add_request(SimRequest("b", max_tokens=1, token_ids=tokens(70, 1000)), 0.0)
    outs = run(e)
    # step 1: a's 20 tokens + 12 of b; step 2: a decodes (1) + 31 of b; step 3: a + 27 of b (done)
    assert [o.num_scheduled_tokens for o in outs[:3]] == [32, 32, 28]
    assert "b" not in outs[0].new_tokens and "b" not in outs[1].new_tokens
    assert outs[2].finished == {"b": "length"}
    assert [len(o.new_tokens.get("a", [])) for o in outs] == [1, 1, 1, 1, 1]
    # Step time follows the model with the chunk's context: step 2 = prefill 31 after 12, one decode.
    s = TINY.step
    expected = s.step_ms(31, 31 * (12 + 31 / 2), 1, 21) / 1000
    assert outs[1].duration == pytest.approx(expected)


def test_max_num_seqs_limits_running() -> None:
    e = EngineModel(EngineConfig(num_gpu_blocks=100, block_size=16, max_num_seqs=2), TINY)
    for i in range(4):
        e.add_request(SimRequest(f"r{i}", max_tokens=3, token_ids=tokens(10, 100 * i)), 0.0)
    o = e.step(0.0)
    assert set(o.new_tokens) == {"r0", "r1"} and e.num_running == 2 and e.num_waiting == 2


def test_preemption_frees_last_admitted_and_requeues_it_at_head() -> None:
    # 8 usable blocks of 4 tokens. a and b each hold 3 blocks after prefill; decoding grows both.
    cfg = EngineConfig(num_gpu_blocks=9, block_size=4, max_num_batched_tokens=64)
    e = EngineModel(cfg, TINY)
    e.add_request(SimRequest("a", max_tokens=10, token_ids=tokens(12)), 0.0)
    e.add_request(SimRequest("b", max_tokens=10, token_ids=tokens(12, 50)), 0.0)
    e.add_request(SimRequest("c", max_tokens=1, token_ids=tokens(3, 90)), 0.0)
    outs = run(e)
    assert sum(o.num_preemptions for o in outs) >= 1
    first = next(i for i, o in enumerate(outs) if o.num_preemptions)
    # b (admitted after a) was the victim; a kept decoding in that step.
    assert "a" in outs[first].new_tokens and "b" not in outs[first].new_tokens
    assert e.snapshot().num_preemptions == sum(o.num_preemptions for o in outs)
    assert e.snapshot().request_success == 3
    assert e.kv_cache_usage == 0.0
    done = {f.request_id: f for o in outs for f in o.finished_requests}
    assert done["b"].num_preemptions >= 1 and done["b"].output_tokens == 10


def test_finished_request_blocks_go_to_queue_tail_first() -> None:
    e = EngineModel(EngineConfig(num_gpu_blocks=20, block_size=4, emit_events=False), TINY)
    e.add_request(SimRequest("a", max_tokens=1, token_ids=tokens(10)), 0.0)
    run(e)
    # 10 prompt tokens + 1 computed: 3 blocks (1, 2, 3). The two full ones are cached and go to
    # the queue tail, tail first; the partial one (3) holds no hash and, as in vLLM 0.32, is
    # prepended so it is reused before any cached block is evicted.
    q = e.pool.free_queue()
    assert q[-2:] == [2, 1]
    assert q[0] == 3


def test_cpu_tier_hit_loads_instead_of_recomputing() -> None:
    bs = 16
    cfg = EngineConfig(
        num_gpu_blocks=1 + 10,
        block_size=bs,
        cpu_tier_tokens=4096,
        cpu_chunk_tokens=64,
        emit_cpu_events=True,
        cpu_save_unfull_chunk=True,  # older LMCache: the partial last chunk is kept too
    )
    e = EngineModel(cfg, TINY)
    e.add_request(sim_req("a", 160, 1, bs, salt=1), 0.0)  # 10 blocks, stored to CPU as it prefills
    run(e)
    e.add_request(sim_req("b", 160, 1, bs, 1.0, salt=2), 1.0)  # evicts a's blocks from the GPU
    run(e, 1.0)
    assert e.pool.find_longest_cache_hit([1_000_003 + 1], 1) == []
    e.add_request(sim_req("c", 160, 1, bs, 2.0, salt=1), 2.0)
    o = e.step(2.0)
    # CPU holds a's 10 blocks (2 full chunks of 4 + a partial chunk of 2); hit capped at 159.
    assert e.num_waiting == 1 and e.num_running == 0 and o.duration == 0.0
    load_s = TINY.step.cpu_load_ms(159) / 1000
    assert e.next_event_time() == pytest.approx(2.0 + load_s)
    outs = run(e, e.next_event_time() or 0.0)
    assert outs[0].cached_tokens["c"].external == 159
    assert outs[0].cached_tokens["c"].local == 0 and outs[0].num_scheduled_tokens == 1
    fin = outs[-1].finished_requests[0]
    assert fin.first_token_time == pytest.approx(2.0 + load_s + TINY.step.step_ms(1, 1 * 159.5, 0, 0) / 1000)
    snap = e.snapshot()
    assert snap.external_prefix_cache_hits == 159
    cpu_events = [ev for o in outs for ev in o.events if isinstance(ev, BlockStored) and ev.medium == "CPU"]
    assert cpu_events == []  # c's chunks were already on the CPU: insert-if-absent


def test_cpu_tier_keeps_whole_chunks_only_like_lmcache_056() -> None:
    # LMCache 0.5.6 (save_unfull_chunk false, and its MP server) stores whole chunks only: a
    # 160-token prompt in chunks of 64 leaves 128 tokens on the CPU tier, loaded as 2 chunks.
    bs = 16
    cfg = EngineConfig(num_gpu_blocks=1 + 10, block_size=bs, cpu_tier_tokens=4096, cpu_chunk_tokens=64)
    e = EngineModel(cfg, TINY)
    e.add_request(sim_req("a", 160, 1, bs, salt=1), 0.0)
    run(e)
    e.add_request(sim_req("b", 160, 1, bs, 1.0, salt=2), 1.0)  # evicts a's blocks from the GPU
    run(e, 1.0)
    e.add_request(sim_req("c", 160, 1, bs, 2.0, salt=1), 2.0)
    e.step(2.0)
    outs = run(e, e.next_event_time() or 0.0)
    assert outs[0].cached_tokens["c"].external == 128
    assert e.cpu is not None and len(e.cpu) == 4  # a's and b's two whole chunks each


def test_fast_forward_equals_step_by_step() -> None:
    cfg = EngineConfig(num_gpu_blocks=400, block_size=16, max_num_batched_tokens=256)

    def load(e: EngineModel) -> None:
        for i, (p, m) in enumerate([(300, 90), (40, 250), (129, 170), (16, 33)]):
            e.add_request(sim_req(f"r{i}", p, m, 16, arrival=0.0, salt=i), 0.0)

    a = EngineModel(cfg, H100_LLAMA3_8B)
    b = EngineModel(cfg, H100_LLAMA3_8B)
    load(a)
    load(b)
    stepped_outs = run(a)
    stepped = {f.request_id: f for o in stepped_outs for f in o.finished_requests}
    adv = b.run_until(math.inf)
    b.check_invariants()
    fast = {f.request_id: f for f in adv.finished}
    assert stepped.keys() == fast.keys()
    for rid, f in stepped.items():
        assert fast[rid].finish_time == pytest.approx(f.finish_time, abs=1e-6)
        assert fast[rid].first_token_time == pytest.approx(f.first_token_time, abs=1e-6)
    ma, mb = a.metrics, b.metrics
    assert ma.generation_tokens == mb.generation_tokens
    assert ma.itl.counts == mb.itl.counts and ma.itl.sum == pytest.approx(mb.itl.sum)
    # Same blocks cached (generated blocks included), in the same eviction order by hash.
    order_a = [a.pool.block_hash[x] for x in a.pool.free_queue()]
    order_b = [b.pool.block_hash[x] for x in b.pool.free_queue()]
    assert sorted(h for h in order_a if h is not None) == sorted(h for h in order_b if h is not None)
    assert adv.steps == len(stepped_outs)


def test_run_until_stops_before_t_and_resumes() -> None:
    e = EngineModel(EngineConfig(num_gpu_blocks=100, block_size=16), H100_LLAMA3_8B)
    e.add_request(sim_req("a", 64, 100, 16), 0.0)
    out = e.run_until(0.1)
    assert out.finished == [] and e.now >= 0.1 and out.now == e.now
    # every step started before 0.1: the last one ended at most one step later
    assert e.now - 0.1 < 0.01
    rest = e.run_until(math.inf)
    assert [f.request_id for f in rest.finished] == ["a"]
    ref = EngineModel(EngineConfig(num_gpu_blocks=100, block_size=16), H100_LLAMA3_8B)
    ref.add_request(sim_req("a", 64, 100, 16), 0.0)
    assert rest.finished[0].finish_time == pytest.approx(ref.run_until(math.inf).finished[0].finish_time)


def test_fast_forward_stops_when_blocks_run_out_then_preempts_like_stepping() -> None:
    cfg = EngineConfig(num_gpu_blocks=1 + 10, block_size=16, emit_events=False)

    def load(e: EngineModel) -> None:
        e.add_request(sim_req("a", 32, 60, 16, salt=1), 0.0)
        e.add_request(sim_req("b", 32, 60, 16, salt=2), 0.0)

    a, b = EngineModel(cfg, TINY), EngineModel(cfg, TINY)
    load(a)
    load(b)
    stepped = {f.request_id: f.finish_time for o in run(a) for f in o.finished_requests}
    fast = {f.request_id: f.finish_time for f in b.run_until(math.inf).finished}
    assert stepped == pytest.approx(fast, abs=1e-9)
    assert a.metrics.num_preemptions == b.metrics.num_preemptions >= 1


def test_time_scale_divides_durations() -> None:
    durations = []
    for scale in (1.0, 4.0):
        e = EngineModel(EngineConfig(num_gpu_blocks=100, block_size=16, time_scale=scale), H100_LLAMA3_8B)
        e.add_request(sim_req("a", 1000, 3, 16), 0.0)
        durations.append([o.duration for o in run(e)])
    assert durations[1] == pytest.approx([d / 4 for d in durations[0]])
    assert durations[0][0] == pytest.approx(H100_LLAMA3_8B.step.prefill_ms(1000) / 1000)


def test_generated_blocks_are_cached_with_chained_parent() -> None:
    e = EngineModel(EngineConfig(num_gpu_blocks=50, block_size=4), TINY)
    e.add_request(SimRequest("a", max_tokens=6, token_ids=tokens(6)), 0.0)
    outs = run(e)
    stored = [ev for o in outs for ev in o.events if isinstance(ev, BlockStored)]
    # prompt block [0..3] at admission; block [4..7] (2 prompt + 2 generated) once computed
    assert [len(ev.block_hashes) for ev in stored] == [1, 1]
    assert stored[1].parent_block_hash == stored[0].block_hashes[0]
    out_ids = [t for o in outs for t in o.new_tokens["a"]]
    assert stored[1].token_ids == [4, 5, *out_ids[:2]]


def test_reset_prefix_cache_emits_event_on_next_step() -> None:
    e = EngineModel(EngineConfig(num_gpu_blocks=50, block_size=4), TINY)
    e.add_request(SimRequest("a", max_tokens=1, token_ids=tokens(8)), 0.0)
    run(e)
    assert e.reset_prefix_cache() and e.has_pending_events()
    o = e.step(1.0)
    assert o.events == [AllBlocksCleared()] and o.duration == 0.0


def test_abort_frees_blocks() -> None:
    e = EngineModel(EngineConfig(num_gpu_blocks=50, block_size=4), TINY)
    e.add_request(SimRequest("a", max_tokens=100, token_ids=tokens(30)), 0.0)
    e.step(0.0)
    fin = e.abort_request("a")
    assert fin is not None and fin.finish_reason == "abort"
    assert e.kv_cache_usage == 0.0 and not e.has_work() and e.abort_request("a") is None
    assert e.snapshot().request_success == 0
    e.check_invariants()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prompt_len": 20, "block_hashes": [1, 2]}, "block_hashes"),
        ({"prompt_len": 0, "block_hashes": []}, "prompt_len"),
        ({"prompt_len": 10_000, "block_hashes": list(range(625))}, "KV capacity"),
        ({"prompt_len": 20}, "needs block_hashes or token_ids"),
    ],
)
def test_add_request_rejects(kwargs: dict[str, object], match: str) -> None:
    e = EngineModel(EngineConfig(num_gpu_blocks=50, block_size=16), TINY)
    with pytest.raises(ValueError, match=match):
        e.add_request(SimRequest("x", max_tokens=1, **kwargs), 0.0)  # type: ignore[arg-type]


def test_config_validation_names_field() -> None:
    with pytest.raises(ValueError, match="invalid max_num_seqs: 0"):
        EngineConfig(num_gpu_blocks=10, max_num_seqs=0)
    cfg = EngineConfig.from_profile(H100_LLAMA3_8B, block_size=512, cpu_tier_tokens=None)
    assert (cfg.num_gpu_blocks, cfg.block_size, cfg.cpu_tier_tokens, cfg.profile) == (
        823,
        512,
        0,
        "h100-llama3-8b",
    )


def test_fast_forward_reaches_t_in_one_stretch(monkeypatch: pytest.MonkeyPatch) -> None:
    # Regression: the time budget was converted to ms wrongly, so stretches stopped ~1000x short.
    e = EngineModel(EngineConfig(num_gpu_blocks=100, block_size=512), H100_LLAMA3_8B)
    e.add_request(sim_req("a", 1024, 1000, 512), 0.0)
    e.run_until(0.5)  # prefill + first decode steps
    calls = 0
    real = e._step

    def counting(*args: object) -> bool:
        nonlocal calls
        calls += 1
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(e, "_step", counting)
    out = e.run_until(3.0)  # ~300 decode steps of ~7 ms
    assert out.steps > 250 and calls <= 2 and 3.0 <= e.now < 3.0 + 0.01
