"""router/pd/decision.py: the split rule compares two TTFT estimates; the threshold rule is the baseline."""

from __future__ import annotations

import math

import pytest

from router.pd.decision import (
    LOCAL_CACHED,
    LOCAL_FASTER,
    LOCAL_N,
    LOCAL_NO_PREFILL,
    LOCAL_RULE,
    LOCAL_SHORT,
    LOCAL_THRESHOLD,
    SPLIT,
    DecisionParams,
    DecodeView,
    LinkModel,
    PrefillView,
    decide,
    imposed_delay,
    local_ttft,
    pick_decode,
    prefill_cost,
    remote_ttft,
)

P = DecisionParams()
LINK = LinkModel(bandwidth_bytes_s=10e9, latency_s=1e-4, kv_bytes_per_token=100_000)
IDLE_P = PrefillView(cached_tokens=0, prefill_tps=20_000)


def test_estimates_follow_the_documented_formulas() -> None:
    d = DecodeView(cached_tokens=1000, running=8, pending_prefill_tokens=2000, prefill_tps=10_000)
    p = PrefillView(cached_tokens=3000, pending_prefill_tokens=500, prefill_tps=20_000)
    loc, stall, unc = local_ttft(5000, d, P)
    assert unc == 4000
    assert loc == pytest.approx((2000 + 4000) / 10_000 + P.step_s * 8)
    assert stall == pytest.approx(4000 / 10_000 * 8)
    rem, xfer, unc_p = remote_ttft(5000, d, p, LINK, P)
    assert unc_p == 2000
    # only the 4000 tokens D lacks cross the link
    assert xfer == pytest.approx(1e-4 + 4000 * 100_000 / 10e9)
    ready = ((500 + 2000) / 20_000 + P.handoff_overhead_s + xfer) * (1 + P.leg1_drift)
    assert rem == pytest.approx(max(ready, 2000 / 10_000) + P.step_s * 8)


def test_long_uncached_prompt_on_a_busy_decode_replica_splits() -> None:
    d = DecodeView(cached_tokens=0, running=32, prefill_tps=20_000)
    dec = decide(8000, d, IDLE_P, LINK, P)
    assert dec.split and dec.outcome == SPLIT
    assert (
        dec.remote_ttft_s is not None and dec.remote_ttft_s < dec.local_ttft_s + P.stall_weight * dec.stall_s
    )
    assert dec.chosen_ttft_s == dec.remote_ttft_s


def test_short_prompt_stays_local() -> None:
    dec = decide(40, DecodeView(cached_tokens=0, running=4), IDLE_P, LINK, P)
    assert not dec.split and dec.outcome == LOCAL_SHORT


def test_prompt_cached_on_decode_replica_stays_local() -> None:
    dec = decide(8000, DecodeView(cached_tokens=7968, running=32), IDLE_P, LINK, P)
    assert not dec.split and dec.outcome == LOCAL_CACHED
    assert dec.uncached_decode == 32


def test_mostly_cached_on_decode_but_not_prefill_is_local_cached() -> None:
    # D holds 6000 of 8000; P holds nothing: P must compute 8000, D only 2000 -> local wins.
    d = DecodeView(cached_tokens=6000, running=0, prefill_tps=20_000)
    dec = decide(8000, d, IDLE_P, LINK, P)
    assert not dec.split and dec.outcome == LOCAL_CACHED


def test_idle_decode_replica_and_slow_link_is_local_faster() -> None:
    slow = LinkModel(bandwidth_bytes_s=1e8, latency_s=1e-3, kv_bytes_per_token=131_072)
    dec = decide(4000, DecodeView(cached_tokens=0, running=0), IDLE_P, slow, P)
    assert not dec.split and dec.outcome == LOCAL_FASTER
    assert dec.remote_ttft_s is not None and dec.remote_ttft_s > dec.local_ttft_s


def test_busy_prefill_queue_keeps_it_local() -> None:
    p = PrefillView(cached_tokens=0, pending_prefill_tokens=200_000, prefill_tps=20_000)
    dec = decide(4000, DecodeView(cached_tokens=0, running=2), p, LINK, P)
    assert not dec.split and dec.outcome == LOCAL_FASTER


def test_n_greater_than_one_and_no_prefill_and_never() -> None:
    d = DecodeView(cached_tokens=0, running=32)
    assert decide(8000, d, IDLE_P, LINK, P, n=2).outcome == LOCAL_N
    none = decide(8000, d, None, LINK, P)
    assert none.outcome == LOCAL_NO_PREFILL and none.remote_ttft_s is None
    assert decide(8000, d, IDLE_P, LINK, DecisionParams(rule="never")).outcome == LOCAL_RULE
    assert decide(10, d, IDLE_P, LINK, DecisionParams(rule="always")).outcome == SPLIT


def test_threshold_rule_llm_d_style() -> None:
    t = DecisionParams(rule="threshold", threshold_tokens=2048)
    idle = DecodeView(cached_tokens=0, running=0)
    assert decide(2048, idle, IDLE_P, LINK, t).outcome == SPLIT
    assert decide(2047, idle, IDLE_P, LINK, t).outcome == LOCAL_THRESHOLD
    # uncached on the chosen D counts, not the raw prompt
    assert decide(5000, DecodeView(cached_tokens=3000, running=0), IDLE_P, LINK, t).outcome == LOCAL_THRESHOLD


def test_threshold_rule_dynamo_isl_bounding() -> None:
    t = DecisionParams(rule="threshold", threshold_tokens=2048, threshold_max_cached_ratio=0.7)
    # eff 1000 < 2048 and 1000/5000 = 0.2 < 0.7 -> local
    assert decide(5000, DecodeView(cached_tokens=4000, running=0), IDLE_P, LINK, t).outcome == LOCAL_THRESHOLD
    # eff 1000 < 2048 but 1000/1200 = 0.83 >= 0.7 -> split
    assert decide(1200, DecodeView(cached_tokens=200, running=0), IDLE_P, LINK, t).outcome == SPLIT


def test_auto_beats_threshold_where_the_threshold_is_blind() -> None:
    # 1500 uncached tokens on a decode replica running 64 sequences: the threshold keeps it local
    # and stalls the batch; auto sends it to the idle prefill replica.
    d = DecodeView(cached_tokens=0, running=64)
    assert decide(1500, d, IDLE_P, LINK, DecisionParams(rule="threshold")).split is False
    assert decide(1500, d, IDLE_P, LINK, P).split is True


def test_pick_decode_prefers_cached_prefix_then_headroom() -> None:
    ds = [
        DecodeView(cached_tokens=0, running=10, kv_free=0.5),
        DecodeView(cached_tokens=6000, running=10, kv_free=0.5),
        DecodeView(cached_tokens=8000, running=10, kv_free=0.01),  # no KV headroom
    ]
    ch = pick_decode(8000, ds, IDLE_P, LINK, P)
    assert ch.index == 1
    # all out of headroom: still picks one (never nothing)
    tight = [
        DecodeView(cached_tokens=0, running=3, kv_free=0.0),
        DecodeView(cached_tokens=0, running=1, kv_free=0.0),
    ]
    assert pick_decode(8000, tight, IDLE_P, LINK, P).index == 1
    with pytest.raises(ValueError):
        pick_decode(10, [], IDLE_P, LINK, P)


def test_decision_as_dict_has_both_estimates() -> None:
    d = decide(8000, DecodeView(cached_tokens=0, running=32), IDLE_P, LINK, P).as_dict()
    assert {"local_ttft_s", "remote_ttft_s", "outcome", "reason", "transfer_s"} <= set(d)


def test_remote_waits_for_the_decode_replicas_own_queue() -> None:
    # Leg 2 queues on D behind D's pending prefill: remote can never beat D draining its queue.
    d = DecodeView(cached_tokens=0, running=0, pending_prefill_tokens=40_000, prefill_tps=20_000)
    rem, _, _ = remote_ttft(1000, d, IDLE_P, LINK, P)
    assert rem >= 40_000 / 20_000


def test_rates_of_one_gpu_kind_compare_as_one() -> None:
    # D reads 25% slower than P (noise of the prompts each served): no split for that alone.
    d = DecodeView(cached_tokens=0, running=0, prefill_tps=16_000)
    dec = decide(8000, d, PrefillView(cached_tokens=0, prefill_tps=20_000), LINK, P)
    assert not dec.split and dec.local_rate_tps == dec.remote_rate_tps
    # A 3x faster prefill GPU is a real difference: its rate is kept, and it wins.
    fast = decide(8000, DecodeView(cached_tokens=0, running=0, prefill_tps=10_000),
                  PrefillView(cached_tokens=0, prefill_tps=30_000), LINK, P)  # fmt: skip
    assert fast.split and fast.remote_rate_tps == 30_000


def test_a_both_replica_lending_prefill_prices_its_own_decode_batch() -> None:
    busy_d = DecodeView(cached_tokens=0, running=16, prefill_tps=20_000)
    idle_both = PrefillView(cached_tokens=0, prefill_tps=20_000, running=0)
    busy_both = PrefillView(cached_tokens=0, prefill_tps=20_000, running=16)
    assert decide(8000, busy_d, idle_both, LINK, P).split
    dec = decide(8000, busy_d, busy_both, LINK, P)
    assert not dec.split and dec.remote_stall_s == pytest.approx(8000 / 20_000 * 16)
    assert prefill_cost(8000, idle_both, P) < prefill_cost(8000, busy_both, P)


def test_pick_decode_uses_the_next_prefill_replica_for_the_one_that_is_best_at_prefill() -> None:
    # Two both replicas: 0 is busy decoding, 1 is idle. For candidate 1 the best prefill replica
    # would be itself; its split option is replica 0, which is busy, so it runs locally.
    d0 = DecodeView(cached_tokens=0, running=16, prefill_tps=20_000)
    d1 = DecodeView(cached_tokens=0, running=0, prefill_tps=20_000)
    v0 = PrefillView(cached_tokens=0, prefill_tps=20_000, running=16)
    v1 = PrefillView(cached_tokens=0, prefill_tps=20_000, running=0)
    choice = pick_decode(8000, [d0, d1], v1, LINK, P, prefill_for=[v1, v0])
    assert choice.index == 1 and not choice.decision.split


def test_imposed_delay_prices_later_arrivals_on_a_both_helper() -> None:
    # 8000 tokens at 20k tok/s = 0.4 s on P, behind 0.1 s of queue; 2 arrivals/s: every one in the
    # next 0.1 s waits 0.4 s, every one during the prefill on average 0.2 s.
    assert imposed_delay(8000, 2000, 20_000, 2.0) == pytest.approx(2.0 * 0.4 * (0.1 + 0.2))
    d = DecodeView(cached_tokens=0, running=0, pending_prefill_tokens=12_000, prefill_tps=20_000)
    quiet = PrefillView(cached_tokens=0, prefill_tps=20_000, decodes=True)
    assert decide(8000, d, quiet, LINK, P).split
    # The same helper with its own clients arriving at 2/s: the split's margin (local 1.0 s less
    # 30%, against remote 0.60 s) is less than the 0.16 s it adds to theirs: local.
    crowded = PrefillView(cached_tokens=0, prefill_tps=20_000, decodes=True, arrival_rate=2.0)
    dec = decide(8000, d, crowded, LINK, P)
    assert not dec.split and dec.imposed_s == pytest.approx(2.0 * 0.4 * 0.2)
    assert dec.as_dict()["imposed_s"] == pytest.approx(dec.imposed_s, abs=1e-6)
    # A prefill-only replica's arrivals are leg 1s, each chosen knowing its queue: not priced.
    only = PrefillView(cached_tokens=0, prefill_tps=20_000, arrival_rate=8.0)
    assert decide(8000, d, only, LINK, P).imposed_s == 0.0


def _measured(tps: float, se2: float) -> dict[str, float]:
    return {"prefill_tps": tps, "rate_log": math.log(tps), "rate_log_se2": se2}


def test_both_replicas_rates_differ_only_beyond_their_measured_spread() -> None:
    # Standard error 0.3 each in ln rate: a 2x difference (ln 2 = 0.69) is within 2 standard
    # errors of the difference (0.42): one GPU kind, one rate, no split for it.
    d = DecodeView(cached_tokens=0, running=0, **_measured(10_000, 0.09))
    noisy = PrefillView(cached_tokens=0, decodes=True, **_measured(20_000, 0.09))
    dec = decide(8000, d, noisy, LINK, P)
    assert not dec.split and dec.local_rate_tps == dec.remote_rate_tps
    # Steady samples (standard error 0.05): 2x is a real difference and is kept.
    steady = PrefillView(cached_tokens=0, decodes=True, **_measured(20_000, 0.0025))
    d_steady = DecodeView(cached_tokens=0, running=0, **_measured(10_000, 0.0025))
    assert decide(8000, d_steady, steady, LINK, P).remote_rate_tps == 20_000
    # The test reads the log-space estimates: an arithmetic rate thrown off by one absurd sample
    # (P reads 6x D, its log estimate only 1.2x) is not a different GPU.
    outlier = PrefillView(cached_tokens=0, decodes=True, prefill_tps=200_000, rate_log=math.log(38_000),
                          rate_log_se2=0.03)  # fmt: skip
    d_calm = DecodeView(cached_tokens=0, running=0, **_measured(32_000, 0.001))
    assert not decide(8000, d_calm, outlier, LINK, P).split
    # Unknown spread (under two samples): not told apart.
    fresh = PrefillView(cached_tokens=0, decodes=True, prefill_tps=40_000)
    assert decide(8000, d_steady, fresh, LINK, P).remote_rate_tps == pytest.approx(20_000)
    # A prefill-only replica differs from a decoder systematically: only same_rate_ratio applies.
    only = PrefillView(cached_tokens=0, **_measured(20_000, 0.09))
    assert decide(8000, d, only, LINK, P).remote_rate_tps == 20_000


def test_an_unmeasured_both_replica_takes_the_measured_ones_rate() -> None:
    d = DecodeView(cached_tokens=0, running=0, prefill_tps=0.0)
    dec = decide(8000, d, PrefillView(cached_tokens=0, prefill_tps=40_000, decodes=True), LINK, P)
    assert dec.local_rate_tps == dec.remote_rate_tps == 40_000
    # Not across roles: a prefill-only replica's rate says little about a decoder's.
    dec = decide(8000, d, PrefillView(cached_tokens=0, prefill_tps=40_000), LINK, P)
    assert dec.local_rate_tps == P.default_prefill_tps and dec.remote_rate_tps == 40_000


def test_replica_measures_its_arrival_rate_and_rate_spread() -> None:
    from router.index import PrefixIndex
    from router.replicas.registry import ReplicaRegistry
    from router.types import ReplicaSpec

    rep = ReplicaRegistry(PrefixIndex(100)).add(ReplicaSpec(url="http://r0:8000", name="r0"))
    for i in range(300):  # 2 requests/s for 150 s: the decayed count settles at rate x tau
        rep.add_arrival(i * 0.5, 30.0)
    assert rep.arrival_rate(149.5, 30.0) == pytest.approx(2.0, rel=0.02)
    assert rep.arrival_rate(179.5, 30.0) == pytest.approx(2.0 / math.e, rel=0.02)
    assert rep.prefill_compute_log_se2 == math.inf
    for _ in range(20):  # identical samples: no spread
        rep.observe_ttft(0.5, 10_000)
    assert rep.prefill_compute_tps == pytest.approx(20_000)
    assert rep.prefill_compute_log_tps == pytest.approx(math.log(20_000))
    assert rep.prefill_compute_log_se2 < 1e-9
    for ttft in (0.25, 1.0) * 20:  # samples 2x either side of 20k: ln 2 around the mean
        rep.observe_ttft(ttft, 10_000)
    spread = math.log(2) ** 2 * 0.2 / 1.8  # the samples' variance x the EWMA's squared weights
    assert rep.prefill_compute_log_se2 == pytest.approx(spread, rel=0.3)  # the mean moves too
    se2 = rep.prefill_compute_log_se2
    rep.observe_ttft(5.0, 10_000, ahead_tokens=40_000)  # queued behind others: not a compute sample
    assert rep.prefill_compute_log_se2 == se2
