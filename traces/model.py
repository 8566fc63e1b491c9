"""In-memory trace types shared by loaders, generators, statistics, synthesis, replay and simulation.

A trace is a list of requests sorted by ``(timestamp, file order)``. Every request carries its
prompt's *block ids* (``hash_ids``): equal ids mean equal prompt content for that block. In the
Mooncake traces and in our generators the ids are *chained*: an id stands for its block and the
whole prefix before it, so two requests share a KV-cache prefix exactly as far as their ids agree.
Qwen Bailian ids are per-block hashes, which is why every hit computation here applies the prefix
rule (a block hits only if every earlier block of the request hit) instead of trusting an id alone.

Both types are frozen ``msgspec.Struct`` values: they are created once per line by the loaders
(hot for the 12k-request Mooncake file) and never mutated. ``gc=False`` is safe on
``TraceRequest`` because it holds only scalars and a tuple of ints, so no reference cycle can
form through it.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

import msgspec

# Block sizes of the known sources, in tokens per block id.
MOONCAKE_BLOCK_TOKENS = 512
QWEN_BLOCK_TOKENS = 16
NO_PREFIX_INFO = 0  # Azure and other traces that carry token counts only


class TraceRequest(msgspec.Struct, frozen=True, gc=False, kw_only=True, omit_defaults=True):
    """One request of a trace.

    ``hash_ids`` has one id per ``block_tokens`` tokens of the prompt, the last block possibly
    partial (Mooncake: ``len(hash_ids) == ceil(input_length / 512)``). It is empty when the trace
    has no prefix information. ``session_id`` / ``parent_id`` / ``turn`` are present when the
    source knows the conversation structure (Qwen, our generators); Mooncake has none.
    """

    timestamp_s: float  # arrival, seconds since the trace's first request
    input_length: int  # prompt tokens
    output_length: int  # generated tokens
    hash_ids: tuple[int, ...] = ()
    request_id: str
    session_id: str | None = None
    parent_id: str | None = None
    turn: int | None = None
    kind: str | None = None  # request category when the source has one (Qwen `type`, generator kind)


class Trace(msgspec.Struct, frozen=True, kw_only=True):
    """A loaded or generated trace.

    ``block_tokens`` is the number of tokens one id in ``hash_ids`` covers (512 Mooncake, 16 Qwen,
    0 when the trace has no prefix information). ``origin_s`` is the source timestamp (in seconds,
    source clock) that became ``timestamp_s == 0``, kept so a slice can be traced back to its file.
    ``meta`` holds what produced the trace (generator kind, parameters, seed) as plain values.
    """

    requests: tuple[TraceRequest, ...]
    block_tokens: int
    name: str
    source: str | None = None
    origin_s: float = 0.0
    meta: dict[str, str | int | float | bool | None] = {}

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def has_prefix_info(self) -> bool:
        return self.block_tokens > 0

    @property
    def duration_s(self) -> float:
        """Last arrival minus first (requests are sorted, so this is max - min)."""
        if not self.requests:
            return 0.0
        return self.requests[-1].timestamp_s - self.requests[0].timestamp_s

    def head(self, n: int) -> Trace:
        """The first ``n`` requests (by arrival), e.g. for a quick replay."""
        return msgspec.structs.replace(self, requests=self.requests[:n])


class ChainedIds:
    """Allocates block ids in a chained-prefix id space: an id stands for its whole prefix.

    ``child(parent, content)`` returns the id of block ``content`` following the block ``parent``
    (``ROOT`` for the first block): the same id whenever the same content follows the same
    prefix, a fresh one otherwise. Two prompts therefore share ids exactly as far as they share
    content from the start, which is the Mooncake convention and what a KV prefix cache sees.

    ``content`` is any hashable description of what the block holds (generators use pieces of
    named segments, ``reblock`` pieces of old blocks). Bound: one dict entry per distinct
    (prefix, block), never evicted; it lives as long as one generation run.
    """

    ROOT = -1

    __slots__ = ("_ids", "_next")

    def __init__(self, first_id: int = 0) -> None:
        self._ids: dict[tuple[int, Hashable], int] = {}
        self._next = first_id

    def child(self, parent: int, content: Hashable) -> int:
        key = (parent, content)
        got = self._ids.get(key)
        if got is None:
            got = self._ids[key] = self._next
            self._next += 1
        return got

    def chain(self, contents: Iterable[Hashable]) -> tuple[int, ...]:
        out: list[int] = []
        parent = self.ROOT
        for c in contents:
            parent = self.child(parent, c)
            out.append(parent)
        return tuple(out)

    def __len__(self) -> int:
        return len(self._ids)
