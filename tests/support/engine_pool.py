"""One copy of each expensive test resource (a real-engine fleet) per pytest session, started ahead of the
tests that need it and stopped as soon as the last of them has run.

A vLLM CPU replica takes tens of seconds to start on 2 cores, and several test modules need the same
engine configuration: a module-scoped fixture would start it once per module, a plain session-scoped one
would keep it (and its memory, and a NIXL agent's busy-polled core) until the very end of the session.
The pool sits between the two. tests/integration/conftest.py tells it, after collection, which tests need
which resource (``plan``) and how to start each (``register``); a fixture asks for the resource (``get``);
after each test's teardown the conftest calls ``release_after``, which stops, in a background thread,
every resource no later test needs.

Prefetch: while fewer than ``max_live`` resources are running and none is starting, the next one the
plan needs is started in a background thread (``prefetch``), so its start-up overlaps the tests before it
instead of adding to them. A resource registered with ``prefetch=False`` starts only when a test asks for it.

A resource whose start failed is not started again: each later ``get`` raises, chained to the first
error, so a broken engine costs one start-up timeout, not one per module.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from typing import Any

Start = Callable[[], AbstractContextManager[Any]]


@dataclass
class _Slot:
    done: threading.Event = field(default_factory=threading.Event)
    value: Any = None
    stack: ExitStack | None = None
    error: BaseException | None = None
    thread: threading.Thread | None = None


@dataclass
class EnginePool:
    max_live: int = 2  # running at once (memory: an LMCache fleet holds several GB)
    started: list[str] = field(default_factory=list)  # keys in start order (tests, reports)
    _slots: dict[str, _Slot] = field(default_factory=dict)
    _starts: dict[str, tuple[Start, bool]] = field(default_factory=dict)  # key -> (start, prefetch)
    _first_use: dict[str, int] = field(default_factory=dict)
    _last_use: dict[str, int] = field(default_factory=dict)
    _position: dict[str, int] = field(default_factory=dict)  # test id -> its position in the run
    _done_up_to: int = -1  # position of the last test whose teardown has run
    _stoppers: list[threading.Thread] = field(default_factory=list)
    _stop_errors: list[BaseException] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def plan(self, tests: Sequence[tuple[str, Iterable[str]]]) -> None:
        """``tests``: (test id, keys it needs), in run order."""
        self._first_use.clear()
        self._last_use.clear()
        self._position.clear()
        for i, (test_id, keys) in enumerate(tests):
            self._position[test_id] = i
            for key in keys:
                self._first_use.setdefault(key, i)
                self._last_use[key] = i

    def register(self, key: str, start: Start, prefetch: bool = True) -> None:
        self._starts.setdefault(key, (start, prefetch))

    def get(self, key: str, start: Start | None = None) -> Any:
        """The live resource for ``key``: waits for a prefetch under way, or starts it here."""
        self._raise_stop_errors()
        with self._lock:
            slot = self._slots.get(key)
            if slot is None:
                start = start or self._starts[key][0]
                slot = self._slots[key] = _Slot()
                self.started.append(key)
                run_here = True
            else:
                run_here = False
        if run_here:
            assert start is not None
            # Let the fleets being stopped go first: a vLLM start-up beside another fleet's shutdown
            # splits the two cores and the memory between them.
            self._wait_for_stops()
            self._start(slot, start)
        slot.done.wait()
        if slot.error is not None:
            raise RuntimeError(f"{key} failed to start") from slot.error
        self.prefetch()
        return slot.value

    def prefetch(self) -> None:
        """Start the next resource the plan needs in the background, if none is starting and fewer than
        max_live are up."""
        with self._lock:
            if any(not s.done.is_set() for s in self._slots.values()):
                return  # one start at a time: two would split the cores and finish no sooner
            if any(t.is_alive() for t in self._stoppers):
                return  # nor a start beside a stop, for the same reason
            if sum(1 for s in self._slots.values() if s.stack is not None) >= self.max_live:
                return
            upcoming = sorted(
                (first, key)
                for key, first in self._first_use.items()
                if key not in self._slots and self._last_use[key] > self._done_up_to
            )
            if not upcoming:
                return
            key = upcoming[0][1]
            start, may_prefetch = self._starts.get(key, (None, False))
            if start is None or not may_prefetch:
                return  # the next one starts on demand; nothing jumps the queue past it
            slot = self._slots[key] = _Slot()
            self.started.append(key)
            slot.thread = threading.Thread(
                target=self._start, args=(slot, start), name=f"start-{key}", daemon=True
            )
            slot.thread.start()

    def release_after(self, test_id: str) -> None:
        """Stop, in the background, every live resource no test after ``test_id`` needs; then prefetch."""
        pos = self._position.get(test_id)
        if pos is None:
            return
        self._done_up_to = max(self._done_up_to, pos)
        for key in [k for k in self._slots if self._last_use.get(k, -1) <= pos]:
            self._stop_in_background(key)
        self._raise_stop_errors()
        self.prefetch()

    def close(self) -> None:
        """Wait for starts under way, stop everything (end of session, or an interrupted run), and raise
        the first error a stop met."""
        for key in list(self._slots):
            self._stop_in_background(key)
        self.join_stops()

    def join_stops(self) -> None:
        """Wait for the stops under way; raise the first error one met."""
        for t in self._stoppers:
            t.join()
        self._stoppers.clear()
        self._raise_stop_errors()

    # -- internals ---------------------------------------------------------------------------------

    @staticmethod
    def _start(slot: _Slot, start: Start) -> None:
        stack = ExitStack()
        try:
            slot.value = stack.enter_context(start())
            slot.stack = stack
        except BaseException as exc:
            slot.error = exc
            stack.close()
        finally:
            slot.done.set()

    def _stop_in_background(self, key: str) -> None:
        with self._lock:
            slot = self._slots.get(key)
            if slot is None or slot.error is not None:
                return  # never started, or failed: nothing to stop (and the failure stays remembered)
            del self._slots[key]

        def stop() -> None:
            slot.done.wait()  # a prefetch still starting: stop it once it is up
            try:
                if slot.stack is not None:
                    slot.stack.close()
            except BaseException as exc:
                self._stop_errors.append(exc)

        t = threading.Thread(target=stop, name=f"stop-{key}", daemon=True)
        self._stoppers.append(t)
        t.start()

    def _wait_for_stops(self) -> None:
        """Wait for the stops under way; their errors surface at the next ``get`` or ``join_stops``."""
        for t in list(self._stoppers):
            t.join()

    def _raise_stop_errors(self) -> None:
        if self._stop_errors:
            first = self._stop_errors[0]
            self._stop_errors.clear()
            raise first
