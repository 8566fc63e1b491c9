"""tests/support/engine_pool.py: one start per resource, a stop right after its last user, one failed start."""

from __future__ import annotations

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
    assert rec.log == ["start a", "start b", "stop a"]
    pool.release_after("t2")
    pool.release_after("not-planned")
    assert rec.log == ["start a", "start b", "stop a"]
    pool.release_after("t3")
    assert rec.log == ["start a", "start b", "stop a", "stop b"]
    pool.close()
    assert pool.started == ["a", "b"]


def test_close_stops_what_an_interrupted_run_left() -> None:
    rec, pool = Recorder(), EnginePool()
    pool.plan([("t0", ["a"]), ("t1", ["a"])])
    pool.get("a", lambda: rec.resource("a"))
    pool.close()
    assert rec.log == ["start a", "stop a"]


def test_a_failed_start_is_not_retried() -> None:
    pool, attempts = EnginePool(), []

    @contextmanager
    def broken() -> Iterator[str]:
        attempts.append(1)
        raise OSError("replica exited before it became healthy")
        yield "never"

    with pytest.raises(OSError):
        pool.get("a", broken)
    with pytest.raises(RuntimeError, match="failed to start earlier") as err:
        pool.get("a", broken)
    assert isinstance(err.value.__cause__, OSError)
    assert len(attempts) == 1
