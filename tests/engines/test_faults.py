"""Fault configuration: validation, seeded determinism, one-shot restart, bounded stalls."""

from __future__ import annotations

import asyncio
import time

import pytest

from engines.sim.replica.faults import FaultConfig, Faults, parse_faults
from engines.sim.replica.tokenizer import EOS_ID, SimTokenizer, render_simple_chat


def test_parse_and_validate() -> None:
    cfg = parse_faults(b'{"error_rate": 0.5, "die_after_chunks": 3}')
    assert cfg.error_rate == 0.5 and cfg.die_after_chunks == 3
    for bad in (b'{"error_rate": 2}', b'{"stall_s": -1}', b'{"nope": 1}', b"[", b'{"die_after_chunks": -2}'):
        with pytest.raises(ValueError):
            parse_faults(bad)


def test_same_seed_same_failures() -> None:
    a, b = Faults(FaultConfig(error_rate=0.3), seed=7), Faults(FaultConfig(error_rate=0.3), seed=7)
    seq_a = [a.should_fail() for _ in range(200)]
    assert seq_a == [b.should_fail() for _ in range(200)]
    assert 20 < sum(seq_a) < 100  # loose: the rate is roughly honoured
    assert a.injected["error"] == sum(seq_a)
    assert not any(Faults(FaultConfig(), seed=1).should_fail() for _ in range(50))
    assert all(Faults(FaultConfig(error_rate=1.0)).should_fail() for _ in range(50))


async def test_restart_is_one_shot_and_stall_ends_when_cleared() -> None:
    f = Faults()
    f.set(FaultConfig(restart=True, stall_forever=True))
    assert f.config.restart is False and f.config.stall_forever
    t0 = time.monotonic()
    task = asyncio.create_task(f.stall())
    await asyncio.sleep(0.02)
    assert not task.done()
    f.clear()
    await asyncio.wait_for(task, 1.0)
    assert time.monotonic() - t0 < 1.0
    f.set(FaultConfig(stall_s=0.03))
    t0 = time.monotonic()
    await f.stall()
    assert 0.025 <= time.monotonic() - t0 < 0.5


def test_sim_tokenizer_is_deterministic_and_prefix_stable() -> None:
    a, b = SimTokenizer(), SimTokenizer()
    text = "The quick brown fox, again: the quick brown fox!"
    ids = a.encode(text)
    assert ids == b.encode(text)
    assert all(6 <= t < 4096 for t in ids)
    # Appending text never changes the ids of the earlier pieces (prefix caching depends on it).
    assert a.encode(text + " and more")[: len(ids) - 1] == ids[:-1]
    assert a.encode("fox") == a.encode("fox") and a.encode("fox") != a.encode("box")
    # Chat template of the tiny model: BOS, role tokens recognised, generation prompt last.
    chat = a.encode(render_simple_chat([{"role": "user", "content": "hi"}]), add_special_tokens=False)
    assert chat[0] == 0 and chat[1] == 3 and chat[-2] == 4
    assert a.decode([EOS_ID]) == ""  # special tokens are skipped like vLLM's detokenizer
    assert a.decode([100, 200]) == a.decode([100]) + a.decode([200]) != ""
