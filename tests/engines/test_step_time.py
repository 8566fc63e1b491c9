"""Step-time model: hand-computed values, closed-form sums equal to step-by-step sums."""

from __future__ import annotations

import pytest

from engines.sim.model.profiles import H100_LLAMA3_8B, TINY, get_profile
from engines.sim.model.stats import Histogram
from engines.sim.model.step_time import StepTimeModel, chunk_attn_pairs, series_bucket_counts

M = H100_LLAMA3_8B.step


@pytest.mark.parametrize(
    ("prefill", "pairs", "d", "ctx", "expected_ms"),
    [
        (0, 0.0, 1, 8192, 6.37 + 0.07 + 4.37e-5 * 8192),  # batch-1 decode at 8K
        (512, chunk_attn_pairs(512, 0), 0, 0, 6.37 + 0.0226 * 512 + 9.2e-7 * 512 * 256),
        (
            100,
            chunk_attn_pairs(100, 1000),
            8,
            8000,
            6.37 + 2.26 + 9.2e-7 * 100 * 1050 + 0.56 + 4.37e-5 * 8000,
        ),
    ],
)
def test_step_ms_hand_computed(prefill: int, pairs: float, d: int, ctx: int, expected_ms: float) -> None:
    assert M.step_ms(prefill, pairs, d, ctx) == pytest.approx(expected_ms, rel=1e-12)


def test_prefill_ms_matches_reference_table() -> None:
    # reference/h100-llama3-8b.md §1 "model §7" column: 10K -> 285 ms, 100K -> 6944 ms.
    # 10K = chunk 8192 (p=0) + chunk 1808 (p=8192), hand-computed:
    c1 = 6.37 + 0.0226 * 8192 + 9.2e-7 * 8192 * 4096
    c2 = 6.37 + 0.0226 * 1808 + 9.2e-7 * 1808 * (8192 + 904)
    assert M.prefill_ms(10_000) == pytest.approx(c1 + c2)
    assert M.prefill_ms(10_000) == pytest.approx(285, abs=1)
    assert M.prefill_ms(100_000) == pytest.approx(6944, abs=2)


def test_decode_stretch_equals_sum_of_steps() -> None:
    b, ctx0 = 7, 12_345
    steps = [M.step_ms(0, 0.0, b, ctx0 + b * j) for j in range(50)]
    assert M.decode_stretch_ms(50, b, ctx0) == pytest.approx(sum(steps), rel=1e-12)
    assert M.decode_stretch_ms(0, b, ctx0) == 0.0


def test_steps_starting_before() -> None:
    b, ctx0 = 3, 1000
    starts = [M.decode_stretch_ms(j, b, ctx0) for j in range(100)]
    for budget in (0.0, 1e-9, starts[1], starts[1] + 1e-9, starts[40] + 0.5, 1e9):
        expected = min(100, sum(1 for s in starts if s < budget))
        assert M.steps_starting_before(budget, b, ctx0, 100) == expected


def test_cpu_load_cost() -> None:
    assert M.cpu_load_ms(10_000) == pytest.approx(10 + 30)
    assert M.cpu_load_ms(0) == 0.0


def test_series_bucket_counts_and_histogram_bulk_match_brute_force() -> None:
    bounds = (0.01, 0.02, 0.05)
    vals = [0.008 + 0.003 * j for j in range(20)]
    assert series_bucket_counts(0.008, 0.003, 20, bounds) == [sum(v <= u for v in vals) for u in bounds]
    h1, h2 = Histogram(bounds), Histogram(bounds)
    h1.observe_series(0.008, 0.003, 20)
    for v in vals:
        h2.observe(v)
    assert h1.counts == h2.counts and h1.count == h2.count
    assert h1.sum == pytest.approx(h2.sum)


def test_profiles() -> None:
    assert get_profile("tiny") is TINY
    # 420.9k tokens: ≈26.3k blocks of 16 plus vLLM's null block; coarse blocks keep the memory.
    assert H100_LLAMA3_8B.num_gpu_blocks() == 26_307
    assert H100_LLAMA3_8B.num_gpu_blocks(512) == 823
    assert (H100_LLAMA3_8B.max_num_batched_tokens, H100_LLAMA3_8B.max_num_seqs) == (8192, 1024)
    with pytest.raises(ValueError, match="invalid profile"):
        get_profile("nope")
    assert isinstance(TINY.step, StepTimeModel)
