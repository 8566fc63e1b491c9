"""Incremental tokenisation of prompts that extend a recent prompt (multi-turn chat, agents).

A conversation's turn N+1 renders to turn N's text plus the reply and the new message, so encoding
the whole ~14k-token prompt again spends most of the router's CPU on tokens it has already seen
(the Rust encode and the id list conversion are ~2.5 us a token). This cache keeps the recent
prompts' texts, ids and sparse checkpoints (char offset -> token index at token starts). A new
text that shares a long prefix with a cached one is encoded from a checkpoint before the shared
prefix ends, and the result is spliced onto the cached ids:

    ids = cached[:k] + encode(text[c0:])[k - k0:]

where (c0, k0) is a checkpoint ``OVERLAP`` tokens before the splice point (c, k). The splice is
taken only when the tail's encoding agrees with the cached ids over that overlap (same ids, and a
token starting exactly at ``c``): BPE after a regex/whitespace pre-tokeniser is local, so once the
two encodings agree on a boundary they agree from there on. The splice point stays ``MARGIN``
characters before the first differing character, so a pre-tokeniser's lookahead never sees the
difference. Every ``verify_every``-th splice is also encoded in full and compared; one mismatch turns
the cache off for this tokenizer (keys stay exact; the miss is counted in ``stats``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from .hashing import chain_from
from .types import BlockHash

KEY_CHARS = 256  # prompts are grouped by their first characters (the system prompt's start)
PER_KEY = 8  # recent prompts kept per group (conversations sharing one system prompt)
MAX_ENTRIES = 64  # prompts kept in all
MAX_TOKENS = 1_000_000  # ids kept in all (~36 MB as Python ints): a few 128k-token prompts, or 64 14k ones
CHECKPOINT_TOKENS = 64  # one checkpoint every this many tokens
OVERLAP = 2  # checkpoints of overlap the tail re-encodes and must reproduce
MARGIN = 64  # characters kept between the splice point and the first differing character
MIN_CHARS = 2048  # shorter prompts are encoded in full, never kept (a full encode is as cheap)
MIN_SAVED = 512  # below this many reusable tokens a full encode is as cheap
MIN_CHAIN_BLOCKS = 64  # ChainCache keeps only prompts of at least this many blocks


@dataclass(slots=True)
class _Entry:
    text: str
    ids: list[int]
    marks: list[tuple[int, int]]  # (char offset, token index) of token starts, increasing


def _common_prefix(a: str, b: str) -> int:
    """Length of the common prefix (binary search over C-level slice compares)."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _marks(enc: Any, char_base: int, tok_base: int, start: int = 0) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    n = len(enc)
    for k in range(start, n, CHECKPOINT_TOKENS):
        span = enc.token_to_chars(k)
        if span is not None:
            out.append((char_base + span[0], tok_base + k))
    return out


class PrefixTokenCache:
    """``encode(text)`` = ``tok.encode(text, add_special_tokens=False).ids``, reusing recent prompts."""

    def __init__(self, rust_tokenizer: Any, verify_every: int = 256) -> None:
        self._tok = rust_tokenizer
        self.verify_every = verify_every
        self.enabled = True
        self._groups: OrderedDict[str, list[_Entry]] = OrderedDict()
        self._count = 0
        self._tokens = 0  # ids held by all entries
        self.stats = {"full": 0, "spliced": 0, "reused_tokens": 0, "fallback": 0, "verify_mismatch": 0}

    def encode(self, text: str) -> list[int]:
        if not self.enabled or len(text) < MIN_CHARS:
            return self._full(text, remember=False)
        key = text[:KEY_CHARS]
        group = self._groups.get(key)
        best: _Entry | None = None
        best_len = 0
        for entry in group or ():
            n = _common_prefix(entry.text, text)
            if n > best_len:
                best, best_len = entry, n
        ids = self._splice(best, best_len, text) if best is not None else None
        if ids is None:
            return self._full(text, remember=True)
        return ids

    def _full(self, text: str, remember: bool) -> list[int]:
        self.stats["full"] += 1
        enc = self._tok.encode(text, add_special_tokens=False)
        ids: list[int] = enc.ids
        if remember:
            self._remember(_Entry(text, ids, _marks(enc, 0, 0)))
        return ids

    def _splice(self, entry: _Entry, shared: int, text: str) -> list[int] | None:
        limit = shared - MARGIN
        marks = entry.marks
        # the last checkpoint at or before the limit, and one OVERLAP checkpoints before it
        i = len(marks) - 1
        while i >= 0 and marks[i][0] > limit:
            i -= 1
        if i < OVERLAP or marks[i][1] < MIN_SAVED:
            return None
        c, k = marks[i]
        c0, k0 = marks[i - OVERLAP]
        enc = self._tok.encode(text[c0:], add_special_tokens=False)
        j = k - k0  # the tail's index of the token that starts at c
        span = enc.token_to_chars(j) if j < len(enc) else None
        if span is None or span[0] != c - c0:
            self.stats["fallback"] += 1
            return None
        tail: list[int] = enc.ids
        # the tail must reproduce the cached tokens of the overlap, its first token excepted (a
        # normaliser may treat a string's first character specially)
        if tail[1:j] != entry.ids[k0 + 1 : k]:
            self.stats["fallback"] += 1
            return None
        ids = entry.ids[:k] + tail[j:]
        self._count += 1
        verify = self.verify_every and self._count % self.verify_every == 0
        if verify and self._tok.encode(text, add_special_tokens=False).ids != ids:
            self.stats["verify_mismatch"] += 1
            self.enabled = False
            self._groups.clear()
            self._tokens = 0
            return None
        self.stats["spliced"] += 1
        self.stats["reused_tokens"] += k
        self._remember(_Entry(text, ids, marks[:i] + _marks(enc, c0, k0, j)))
        return ids

    def _remember(self, entry: _Entry) -> None:
        key = entry.text[:KEY_CHARS]
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = []
        else:
            self._groups.move_to_end(key)
        # a prompt that extends a kept one replaces it: the conversation moved on
        kept = [e for e in group if not entry.text.startswith(e.text)]
        kept.insert(0, entry)
        kept = kept[:PER_KEY]
        self._tokens += sum(len(e.ids) for e in kept) - sum(len(e.ids) for e in group)
        group[:] = kept
        while self._groups and (
            self._tokens > MAX_TOKENS or sum(len(g) for g in self._groups.values()) > MAX_ENTRIES
        ):
            _, oldest = next(iter(self._groups.items()))
            self._tokens -= len(oldest.pop().ids)
            if not oldest:
                self._groups.popitem(last=False)


def _common_bytes(a: bytes, b: bytes) -> int:
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class ChainCache:
    """Block-hash chains of recent prompts: a prompt that extends one hashes only its new blocks.

    The chain makes ``h_i`` depend on blocks 0..i only, so the hashes of the blocks two prompts share
    byte for byte are the same list; ``hashing.chain_from`` continues from the last shared one."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._groups: OrderedDict[tuple[int, int, bytes], list[tuple[bytes, list[BlockHash]]]] = OrderedDict()

    def hashes(self, data: bytes, unit: int, seed: int, max_blocks: int) -> list[BlockHash]:
        if len(data) < MIN_CHAIN_BLOCKS * unit:  # short prompts: hashing is cheaper than the lookup
            return chain_from(data, unit, seed, max_blocks)
        key = (seed, unit, data[:unit])
        group = self._groups.get(key)
        best: list[BlockHash] | None = None
        shared = 0
        for prev, hs in group or ():
            n = min(_common_bytes(prev, data) // unit, len(hs))
            if n > shared:
                best, shared = hs, n
        if best is None or shared == 0:
            out = chain_from(data, unit, seed, max_blocks)
        else:
            shared = min(shared, max_blocks)
            out = best[:shared] + chain_from(
                data[shared * unit :], unit, best[shared - 1], max_blocks - shared
            )
        if group is None:
            group = self._groups[key] = []
        else:
            self._groups.move_to_end(key)
        group[:] = [(p, h) for p, h in group if not data.startswith(p)]
        group.insert(0, (data, out))
        del group[PER_KEY:]
        while sum(len(g) for g in self._groups.values()) > self.max_entries:
            _, oldest = next(iter(self._groups.items()))
            oldest.pop()
            if not oldest:
                self._groups.popitem(last=False)
        return out
