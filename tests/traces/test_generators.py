"""Generators: seeded determinism, chained-prefix ids, session structure, arrivals, CLI round trip."""

from __future__ import annotations

import random
from pathlib import Path

import msgspec
import pytest

from router.cli import main
from traces.generators import (
    AgentParams,
    ChatParams,
    RagParams,
    SharedPromptParams,
    Zipf,
    agent_sessions,
    block_ids,
    generate,
    geometric,
    lognormal_tokens,
    multi_turn_chat,
    shared_system_prompts,
    zipf_documents,
)
from traces.loaders import load_trace
from traces.model import ChainedIds, Trace
from traces.stats import cache_stats

SMALL = {
    "chat": {"sessions": 30},
    "agent": {"sessions": 8},
    "shared-prompt": {"requests": 200, "users": 40},
    "rag": {"requests": 200, "documents": 50},
}


def _check_chained(trace: Trace) -> None:
    """An id stands for its prefix: the same id never appears after two different parents."""
    parent_of: dict[int, int] = {}
    for r in trace.requests:
        assert len(r.hash_ids) == -(-r.input_length // trace.block_tokens)
        prev = -1
        for h in r.hash_ids:
            assert parent_of.setdefault(h, prev) == prev
            prev = h


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_seeded_sorted_chained(kind: str) -> None:
    a = generate(kind, seed=7, **SMALL[kind])
    assert a == generate(kind, seed=7, **SMALL[kind])
    assert a.requests != generate(kind, seed=8, **SMALL[kind]).requests
    ts = [r.timestamp_s for r in a.requests]
    assert ts == sorted(ts) and ts[0] == 0.0
    assert a.meta["generator"] == kind and a.meta["seed"] == 7 and a.block_tokens == 16
    _check_chained(a)
    assert len({r.request_id for r in a.requests}) == len(a)


def test_block_ids_partial_block_changes_when_extended() -> None:
    ids = ChainedIds()
    t1 = block_ids([("sys", 20), ("u1", 10)], 16, ids)  # 30 tokens: 1 full + 1 partial block
    t2 = block_ids([("sys", 20), ("u1", 10), ("a1", 5)], 16, ids)
    assert len(t1) == 2 and len(t2) == 3
    assert t1[0] == t2[0] and t1[1] != t2[1]  # the partial block gained tokens: new content
    assert block_ids([("sys", 20), ("u1", 10)], 16, ids) == t1
    assert block_ids([("x", 0), ("sys", 20), ("u1", 10)], 16, ids) == t1  # empty segments vanish


def test_chat_turns_extend_the_previous_prompt() -> None:
    t = multi_turn_chat(ChatParams(sessions=20, turns_mean=5, seed=1, think_time_s=0.0))
    by_id = {r.request_id: r for r in t.requests}
    multi = 0
    for r in t.requests:
        if r.parent_id is None:
            assert r.turn == 1
            continue
        multi += 1
        prev = by_id[r.parent_id]
        assert r.session_id == prev.session_id and r.turn == prev.turn + 1  # type: ignore[operator]
        # prompt = previous prompt + previous answer + new message
        assert r.input_length > prev.input_length + prev.output_length
        full = prev.input_length // t.block_tokens
        assert r.hash_ids[:full] == prev.hash_ids[:full]
        # without think time the next turn comes exactly after the previous answer's decode time
        assert r.timestamp_s - prev.timestamp_s == pytest.approx(prev.output_length / 50.0)
    assert multi > 20


def test_chat_respects_max_input_tokens() -> None:
    t = multi_turn_chat(ChatParams(sessions=20, turns_mean=50, max_input_tokens=3000, seed=2))
    assert max(r.input_length for r in t.requests) <= 3000


def test_agent_bursts_and_pauses() -> None:
    p = AgentParams(sessions=30, seed=3, tool_latency_s=1.0, pause_s=100.0, decode_tps=1e9)
    t = agent_sessions(p)
    gaps = []
    by_id = {r.request_id: r for r in t.requests}
    for r in t.requests:
        if r.parent_id:
            prev = by_id[r.parent_id]
            gaps.append(r.timestamp_s - prev.timestamp_s)
            assert r.hash_ids[: len(prev.hash_ids) - 1] == prev.hash_ids[:-1]
            assert r.hash_ids[0] == prev.hash_ids[0]  # shared agent system prompt
    # Two populations: short tool latencies inside bursts and long pauses between them.
    short = [g for g in gaps if g < 20]
    long = [g for g in gaps if g >= 20]
    assert len(short) > 2 * len(long) > 0
    assert sum(short) / len(short) < 3 and sum(long) / len(long) > 50


def test_shared_prompts_few_heads_many_users() -> None:
    p = SharedPromptParams(requests=400, users=100, system_prompts=3, system_tokens=1024, seed=4)
    t = shared_system_prompts(p)
    heads = {r.hash_ids[:64] for r in t.requests}  # 1024 tokens = 64 blocks of 16
    assert len(heads) <= 3
    assert len({r.session_id for r in t.requests}) > 50
    c = cache_stats(t, lru_sizes=())
    assert c.frac_hit_ge1 > 0.95


def test_rag_zipf_popularity_drives_reuse() -> None:
    skewed = zipf_documents(RagParams(requests=300, documents=200, zipf_s=1.5, seed=5))
    flat = zipf_documents(RagParams(requests=300, documents=200, zipf_s=0.0, seed=5))
    assert cache_stats(skewed, ()).prefix_hit_inf > cache_stats(flat, ()).prefix_hit_inf + 0.1


def test_poisson_rate() -> None:
    t = zipf_documents(RagParams(requests=2000, rate=10.0, documents=10, seed=6))
    assert len(t) / t.duration_s == pytest.approx(10.0, rel=0.1)


def test_distributions() -> None:
    rng = random.Random(0)
    xs = [lognormal_tokens(rng, 200, 1.0) for _ in range(20000)]
    assert sum(xs) / len(xs) == pytest.approx(200, rel=0.05) and min(xs) >= 1
    assert lognormal_tokens(rng, 7.4, 0) == 7
    gs = [geometric(rng, 4.0) for _ in range(20000)]
    assert sum(gs) / len(gs) == pytest.approx(4.0, rel=0.05) and min(gs) == 1
    z = Zipf(10, 1.0)
    draws = [z.draw(rng) for _ in range(20000)]
    assert draws.count(0) / draws.count(1) == pytest.approx(2.0, rel=0.15)
    assert set(draws) <= set(range(10))


def test_bad_parameters_name_the_field() -> None:
    with pytest.raises(msgspec.ValidationError, match="rate"):
        generate("chat", rate=0)
    with pytest.raises(msgspec.ValidationError, match="bogus"):
        generate("chat", bogus=1)
    with pytest.raises(ValueError, match="unknown generator"):
        generate("nope")


def test_cli_generate_then_stats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "chat.jsonl"
    rc = main(["trace", "generate", "chat", "--out", str(out), "--sessions", "10", "--seed", "3"])
    assert rc == 0
    trace, report = load_trace(out)
    assert report.ok and report.format == "kvrouter"
    assert trace.requests == generate("chat", sessions=10, seed=3).requests
    capsys.readouterr()
    assert main(["trace", "stats", str(out), "--lru", "100,1000", "--json"]) == 0
    stats = msgspec.json.decode(capsys.readouterr().out)["stats"]
    assert stats["requests"] == len(trace) and set(stats["cache"]["lru_prefix_hit"]) == {"100", "1000"}
    assert main(["trace", "generate", "rag", "--out", str(out), "--rate", "-1"]) == 2
