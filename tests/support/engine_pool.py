"""One copy of each expensive test resource (a real-engine fleet) per pytest session, stopped as soon as the
last test that needs it has run.

A vLLM CPU replica takes tens of seconds to start on 2 cores, and several test modules need the same
engine configuration: a module-scoped fixture would start it once per module, a plain session-scoped one
would keep it (and its memory, and a NIXL agent's busy-polled core) until the very end of the session.
The pool sits between the two: tests/integration/conftest.py tells it, after collection, which tests need
which resource (``plan``); a fixture asks for the resource (``get``), which starts it the first time; and
after each test's teardown the conftest calls ``release_after``, which stops every resource no later test
needs.

A resource whose start failed is not started again: each later ``get`` re-raises the first error, so a
broken engine costs one start-up timeout, not one per module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

T = TypeVar("T")


@dataclass
class _Live:
    value: Any
    stack: ExitStack


@dataclass
class EnginePool:
    _live: dict[str, _Live] = field(default_factory=dict)
    _failed: dict[str, BaseException] = field(default_factory=dict)
    _last_use: dict[str, int] = field(default_factory=dict)  # key -> position of the last test needing it
    _position: dict[str, int] = field(default_factory=dict)  # test id -> its position in the run
    started: list[str] = field(default_factory=list)  # keys in the order they were started (for tests)

    def plan(self, tests: Sequence[tuple[str, Iterable[str]]]) -> None:
        """``tests``: (test id, keys it needs), in run order."""
        self._last_use.clear()
        self._position.clear()
        for i, (test_id, keys) in enumerate(tests):
            self._position[test_id] = i
            for key in keys:
                self._last_use[key] = i

    def get(self, key: str, start: Callable[[], AbstractContextManager[T]]) -> T:
        """The live resource for ``key``, entering ``start()`` first if it is not running yet."""
        if key in self._failed:
            raise RuntimeError(f"{key} failed to start earlier in this session") from self._failed[key]
        live = self._live.get(key)
        if live is None:
            stack = ExitStack()
            try:
                value = stack.enter_context(start())
            except BaseException as exc:
                stack.close()
                self._failed[key] = exc
                raise
            live = self._live[key] = _Live(value, stack)
            self.started.append(key)
        return cast(T, live.value)

    def release_after(self, test_id: str) -> None:
        """Stop every live resource that no test after ``test_id`` needs (a test outside the plan: none)."""
        pos = self._position.get(test_id)
        if pos is None:
            return
        for key in [k for k in self._live if self._last_use.get(k, -1) <= pos]:
            self.stop(key)

    def stop(self, key: str) -> None:
        live = self._live.pop(key, None)
        if live is not None:
            live.stack.close()

    def close(self) -> None:
        """Stop everything still running (end of session, or an interrupted run); the first error wins."""
        error: BaseException | None = None
        for key in list(self._live):
            try:
                self.stop(key)
            except BaseException as exc:  # stop the rest before reporting
                error = error or exc
        if error is not None:
            raise error
