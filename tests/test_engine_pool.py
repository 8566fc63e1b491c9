"""tests/support/engine_pool.py: one start per resource, a stop right after its last user, the next one
started in the background, a failed start not retried."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.support.engine_pool import EnginePool


class Recorder:
    def __init__(self) -> None:
        self.log: list[str] = []

    @contextmanager
    def resource(self, key: str) -> Iterator[str]:
        self.log.append(f"start {key}")
        try:
            yield f"{key}-handle"
        finally:
            self.log.append(f"stop {key}")


def test_each_resource_starts_once_and_stops_after_its_last_user() -> None:
    rec, pool = Recorder(), EnginePool()
    pool.plan([("t0", ["a"]), ("t1", ["a", "b"]), ("t2", []), ("t3", ["b"])])
    assert pool.get("a", lambda: rec.resource("a")) == "a-handle"
    pool.release_after("t0")
    assert pool.get("a", lambda: rec.resource("a")) == "a-handle"
    assert pool.get("b", lambda: rec.resource("b")) == "b-handle"
    pool.release_after("t1")
    pool.join_stops()
    assert rec.log == ["start a", "start b", "stop a"]
    pool.release_after("t2")
    pool.release_after("not-planned")
    pool.join_stops()
    assert rec.log == ["start a", "start b", "stop a"]
    pool.release_after("t3")
    pool.join_stops()
    assert rec.log == ["start a", "start b", "stop a", "stop b"]
    pool.close()
    assert pool.started == ["a", "b"]


def test_close_stops_what_an_interrupted_run_left() -> None:
    rec, pool = Recorder(), EnginePool()
    pool.plan([("t0", ["a"]), ("t1", ["a"])])
    pool.get("a", lambda: rec.resource("a"))
    pool.close()
    assert rec.log == ["start a", "stop a"]


def test_the_next_resource_starts_in_the_background_while_the_one_before_is_in_use() -> None:
    rec, pool = Recorder(), EnginePool(max_live=2)
    pool.plan([("t0", []), ("t1", ["a"]), ("t2", ["b"]), ("t3", ["c"]), ("t4", ["d"])])
    for key in "abcd":
        pool.register(key, functools.partial(rec.resource, key), prefetch=key != "d")
    pool.prefetch()  # nothing needed yet by t0, but "a" is next: it starts now
    pool.prefetch()  # one start at a time: "b" waits for "a"
    assert pool.get("a") == "a-handle"  # waits for the prefetch, then lets "b" start
    pool.release_after("t0")
    assert pool.get("b") == "b-handle"
    assert rec.log == ["start a", "start b"]  # two up: "c" waits for room
    pool.release_after("t1")
    pool.join_stops()
    assert "stop a" in rec.log  # "a" stops, "c" may start
    assert pool.get("c") == "c-handle"
    pool.release_after("t2")
    pool.release_after("t3")
    pool.close()
    assert sorted(rec.log[:2]) == ["start a", "start b"] and rec.log.count("start c") == 1
    assert pool.started == ["a", "b", "c"]  # "d" is not prefetched, and no test asked for it
    assert {"stop a", "stop b", "stop c"} <= set(rec.log)


def test_a_failed_start_is_not_retried() -> None:
    pool, attempts = EnginePool(), []

    @contextmanager
    def broken() -> Iterator[str]:
        attempts.append(1)
        raise OSError("replica exited before it became healthy")
        yield "never"

    for _ in range(2):
        with pytest.raises(RuntimeError, match="a failed to start") as err:
            pool.get("a", broken)
        assert isinstance(err.value.__cause__, OSError)
    assert len(attempts) == 1
