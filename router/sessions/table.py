"""The session table: one small entry per live session, bounded in count and idle time.

A million idle sessions must not grow the router without limit, so the table is an LRU of at most
``capacity`` entries (the least recently used goes first) and an entry idle for ``idle_ttl_s``
is gone on its next lookup (and swept, a few per insert, from the LRU end). Memory is therefore
``O(capacity)``: one ``Session`` (slots) plus one tail-index entry each.

**Continuity inference.** A client that sends no session key still sends its whole history each
turn: the next prompt *extends* the previous prompt plus its answer. The table remembers the hash
of the last full block of each session's latest prompt (its *tail*); a keyless request whose
block chain contains a remembered tail (searched from its deepest block back) continues that
session. Chained block hashes make this exact: a block hash names its whole prefix, so a match
means the new prompt starts with that earlier prompt, not merely shares a block.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from ..types import BlockHash, ReplicaId

SWEEP_PER_INSERT = 4  # expired entries dropped from the LRU end per insert: amortised O(1)


@dataclass(slots=True)
class Session:
    key: str
    home: ReplicaId | None = None  # replica that served the last turn (holds its KV, if anyone does)
    last_seen: float = 0.0
    blocks: int = 0  # full prompt blocks of the last turn: what it left on its home
    tail: BlockHash | None = None  # last full block of the last prompt (continuity inference)
    turnover_mark: float = 0.0  # home's cumulative blocks written, right after the last turn
    turns: int = 0
    inferred: bool = False  # key inferred from the prefix, not sent by the client


class SessionTable:
    def __init__(self, capacity: int = 100_000, idle_ttl_s: float = 3600.0) -> None:
        if capacity < 1:
            raise ValueError(f"session table capacity must be >= 1, not {capacity}")
        self.capacity = capacity
        self.idle_ttl_s = idle_ttl_s
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._tails: dict[BlockHash, str] = {}
        self.evicted = 0  # dropped for capacity
        self.expired = 0  # dropped for idleness
        self.closed = 0  # released by the client (action: close)

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, key: object) -> bool:
        return key in self._sessions

    def get(self, key: str, now: float) -> Session | None:
        """The live session under ``key`` (not touched: a lookup is not a turn)."""
        s = self._sessions.get(key)
        if s is None:
            return None
        if now - s.last_seen > self.idle_ttl_s:
            self._drop(s)
            self.expired += 1
            return None
        return s

    def infer(self, block_hashes: Sequence[BlockHash], now: float) -> Session | None:
        """The live session whose last prompt this prompt extends (deepest match), if any."""
        tails = self._tails
        if not tails:
            return None
        for h in reversed(block_hashes):
            key = tails.get(h)
            if key is not None:
                return self.get(key, now)
        return None

    def touch(self, key: str, now: float, *, inferred: bool = False) -> Session:
        """The session under ``key``, created if new, moved to the most recently used end."""
        s = self.get(key, now)
        if s is None:
            s = Session(key=key, last_seen=now, inferred=inferred)
            self._sessions[key] = s
            self._sweep(now)
        else:
            self._sessions.move_to_end(key)
        s.last_seen = now
        return s

    def set_tail(self, s: Session, tail: BlockHash | None) -> None:
        if s.tail is not None and self._tails.get(s.tail) == s.key:
            del self._tails[s.tail]
        s.tail = tail
        if tail is not None:
            self._tails[tail] = s.key

    def close(self, key: str) -> bool:
        s = self._sessions.get(key)
        if s is None:
            return False
        self._drop(s)
        self.closed += 1
        return True

    def _drop(self, s: Session) -> None:
        self._sessions.pop(s.key, None)
        if s.tail is not None and self._tails.get(s.tail) == s.key:
            del self._tails[s.tail]

    def _sweep(self, now: float) -> None:
        sessions = self._sessions
        while len(sessions) > self.capacity:
            _, oldest = next(iter(sessions.items()))
            self._drop(oldest)
            self.evicted += 1
        for _ in range(SWEEP_PER_INSERT):
            if not sessions:
                return
            _, oldest = next(iter(sessions.items()))
            if now - oldest.last_seen <= self.idle_ttl_s:
                return
            self._drop(oldest)
            self.expired += 1
