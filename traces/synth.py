"""Prompt synthesis: turn a trace request's block ids into a concrete prompt, deterministically.

Each block id always becomes the same ``block_tokens`` token ids (an extendable-output hash,
SHAKE-128, of the id and a salt), so a prefix shared in the trace is a prefix shared on the wire and in every engine's KV
cache, and replays are identical run to run. Lengths are exact:

- the prompt is the concatenation of its blocks' tokens, truncated to ``input_length`` (the last,
  partial block is the *prefix* of that id's tokens, so a partial block that reappears full in a
  later request still shares its tokens);
- a request whose ``input_length`` exceeds ``len(hash_ids) * block_tokens`` (or that has no ids,
  e.g. Azure) is padded with tokens keyed by its ``request_id``: unique to the request.

Token ids are drawn from ``[256 * ceil(low / 256), 256 * floor(min(vocab, 65536) / 256))``: the
default ``[256, 32000)`` is valid for every common vocabulary (Llama 2 / Mistral have 32000 ids,
Llama 3 and Qwen more) and stays below the special tokens of Llama 3 and Qwen. Each token's
low byte is a random byte and its high byte a random byte mapped into range with
``bytes.translate``, so a whole block is built by C-level byte operations (~4 us for 512 tokens)
and cached as a 2-byte ``array`` in a bounded LRU; see ``token_array`` for the timings.

``text()`` is the same construction with words instead of token ids, for targets that only take
text: every block id becomes ``block_tokens`` words from a fixed list of 256 very common English
words, joined by single spaces, so prompts sharing k ids share a text prefix of k blocks of
words. One word is about one token: each of these words with its leading space is a single
token in the GPT-2, Llama and Qwen BPE vocabularies, and BPE pre-tokenizers split at spaces, so
the shared text tokenizes to the same shared token prefix. The count is approximate (the first
word has no leading space; chat templates add their own tokens); use ``token_ids`` when exact
counts matter.

``reblock()`` re-expresses a trace's ids in another block size (e.g. 512-token Mooncake blocks as
16-token engine blocks) with the same sharing structure, for tests and the simulator.
"""

from __future__ import annotations

import hashlib
import math
import sys
from array import array
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

import msgspec

from .model import ChainedIds, Trace, TraceRequest

DEFAULT_VOCAB = 32000
DEFAULT_LOW_TOKEN = 256
# Blocks are cached as array('H'): 65536 Mooncake blocks x 512 tokens x 2 B = 64 MiB at most.
DEFAULT_CACHE_BLOCKS = 65536

_WORD_TEXT = """the of and to in is was for on are with as be at by this had not but from or have an they
    which one you were her all she there would their we him been has when who will more no if out
    so said what up its about into than them can only other new some could time these two may
    then do first any my now such like our over man me even most made after also did many before
    must through back years where much your way well down should because each just those people
    how too little state good very make world still own see men work long get here between both
    life being under never day same another know while last might us great old year off come
    since against go came right used take three his he it that house small found part place case
    point group number home water room mother area money story fact month lot book eye job word
    business side kind head far hand high next open seem help show end play run move live hold
    bring write sit stand lose pay meet city week school family night country problem system
    program question government company light line name team level order power friend party field
    form table car road tree sun river music food game art war plan test price early late young
    black white red blue green sure free full real best better low near less left big short hard
    easy strong clear"""
WORDS: tuple[str, ...] = tuple(_WORD_TEXT.split())
assert len(WORDS) == 256 and len(set(WORDS)) == 256  # one word per random byte
_WORD_LEN_PLUS_1 = bytes(len(w) + 1 for w in WORDS)  # translate table: word index -> length + space

_LITTLE = sys.byteorder == "little"
_V = TypeVar("_V")


class _LRU(Generic[_V]):
    """Bounded memo: at most ``capacity`` entries, least recently used evicted first."""

    __slots__ = ("_d", "capacity", "make")

    def __init__(self, capacity: int, make: Callable[[int], _V]) -> None:
        if capacity < 1:
            raise ValueError(f"cache capacity must be >= 1 (current value: {capacity})")
        self.capacity = capacity
        self.make = make
        self._d: OrderedDict[int, _V] = OrderedDict()

    def get(self, key: int) -> _V:
        d = self._d
        v = d.get(key)
        if v is None:
            v = d[key] = self.make(key)
            if len(d) > self.capacity:
                d.popitem(last=False)
        else:
            d.move_to_end(key)
        return v

    def __len__(self) -> int:
        return len(self._d)


class PromptSynth:
    """Deterministic prompts for one trace's block size.

    ``salt`` separates id spaces: two traces replayed into the same fleet with different salts
    never share a prefix by accident; the same salt reproduces the same prompts.
    """

    def __init__(
        self,
        block_tokens: int,
        *,
        vocab_size: int = DEFAULT_VOCAB,
        low_token: int = DEFAULT_LOW_TOKEN,
        salt: int = 0,
        cache_blocks: int = DEFAULT_CACHE_BLOCKS,
    ) -> None:
        if block_tokens < 0:
            raise ValueError(f"block_tokens must be >= 0 (current value: {block_tokens})")
        hi_lo = math.ceil(low_token / 256)
        hi_hi = min(vocab_size, 65536) // 256  # exclusive
        if hi_hi <= hi_lo:
            raise ValueError(
                f"vocab_size must leave at least 256 ids above low_token "
                f"(current value: vocab_size={vocab_size}, low_token={low_token})"
            )
        self.block_tokens = block_tokens
        self.salt = salt
        self.token_range = (hi_lo * 256, hi_hi * 256)
        span = hi_hi - hi_lo
        self._hi_table = bytes(hi_lo + v % span for v in range(256))
        self._tokens: _LRU[array[int]] = _LRU(cache_blocks, self._make_block)
        self._words: _LRU[tuple[str, bytes]] = _LRU(cache_blocks, self._make_block_words)

    # --- token ids ------------------------------------------------------------------------------

    def _random_tokens(self, key: bytes, n: int) -> array[int]:
        # SHAKE-128 is an extendable-output hash: stable across platforms and Python versions,
        # and one call yields all 2n bytes (about 2 us per 512 tokens, cheaper than seeding a
        # Mersenne Twister). Low bytes are used as they are, high bytes mapped into range.
        raw = hashlib.shake_128(key).digest(2 * n)
        buf = bytearray(2 * n)
        lo, hi = raw[:n], raw[n:].translate(self._hi_table)
        if _LITTLE:
            buf[0::2], buf[1::2] = lo, hi
        else:  # pragma: no cover - no big-endian CI
            buf[0::2], buf[1::2] = hi, lo
        return array("H", buf)

    def _make_block(self, hash_id: int) -> array[int]:
        return self._random_tokens(b"kvr-tok:%d:%d" % (self.salt, hash_id), self.block_tokens)

    def block_token_ids(self, hash_id: int) -> list[int]:
        """The ``block_tokens`` token ids of one block id."""
        return self._tokens.get(hash_id).tolist()

    def token_array(self, req: TraceRequest) -> array[int]:
        """``token_ids`` as a compact ``array('H')`` (no per-token Python objects)."""
        n = req.input_length
        out: array[int] = array("H")
        if self.block_tokens:
            get = self._tokens.get
            for h in req.hash_ids:
                if len(out) >= n:
                    break
                out += get(h)
            del out[n:]
        if len(out) < n:
            out += self._random_tokens(b"kvr-pad:%d:%s" % (self.salt, req.request_id.encode()), n - len(out))
        return out

    def token_ids(self, req: TraceRequest) -> list[int]:
        """Exactly ``req.input_length`` token ids; shared ids give shared leading tokens."""
        return self.token_array(req).tolist()

    # --- text -----------------------------------------------------------------------------------

    def _words_text(self, key: bytes, n: int) -> tuple[str, bytes]:
        # One byte per word (WORDS has 256 entries). Kept joined, with the word indices, so a
        # prompt is a join of ~n/block_tokens strings and a partial block one slice.
        idx = hashlib.shake_128(key).digest(n)
        return " ".join(map(WORDS.__getitem__, idx)), idx

    def _make_block_words(self, hash_id: int) -> tuple[str, bytes]:
        return self._words_text(b"kvr-txt:%d:%d" % (self.salt, hash_id), self.block_tokens)

    def text(self, req: TraceRequest) -> str:
        """``req.input_length`` space-separated words, block by block like ``token_ids``.

        About ``input_length`` tokens for common BPE tokenizers (see the module docstring).
        """
        n = req.input_length
        parts: list[str] = []
        have = 0
        if self.block_tokens:
            get = self._words.get
            for h in req.hash_ids:
                if have >= n:
                    break
                block, idx = get(h)
                take = min(self.block_tokens, n - have)
                if take < self.block_tokens:  # first `take` words: their lengths plus separators
                    block = block[: sum(idx[:take].translate(_WORD_LEN_PLUS_1)) - 1]
                parts.append(block)
                have += take
        if have < n:
            key = b"kvr-txtpad:%d:%s" % (self.salt, req.request_id.encode())
            parts.append(self._words_text(key, n - have)[0])
        return " ".join(parts)


# --- re-blocking --------------------------------------------------------------------------------


def reblock(trace: Trace, block_tokens: int) -> Trace:
    """The same trace with ids for ``block_tokens``-token blocks, sharing preserved exactly.

    New block j of a request covers tokens ``[j*b, min((j+1)*b, input_length))``. Its content is
    described by the pieces of old blocks it covers (old id, start, end within that block) and,
    past the old ids, by request-unique padding; new ids are chained on those descriptions, so two
    requests share new block j exactly when their old blocks make the first ``(j+1)*b`` tokens
    equal under ``PromptSynth`` (which truncates a partial old block to a prefix of its tokens).
    Works for chained (Mooncake) and per-block (Qwen) old ids alike. O(total new blocks).
    """
    if block_tokens <= 0:
        raise ValueError(f"block_tokens must be positive (current value: {block_tokens})")
    old_b = trace.block_tokens
    ids = ChainedIds()
    out: list[TraceRequest] = []
    for r in trace.requests:
        n = r.input_length
        covered = min(n, len(r.hash_ids) * old_b) if old_b else 0
        new_ids: list[int] = []
        parent = ChainedIds.ROOT
        for s in range(0, n, block_tokens):
            e = min(s + block_tokens, n)
            pieces: list[tuple[object, ...]] = []
            pos = s
            while pos < min(e, covered):
                k, off = divmod(pos, old_b)
                end = min(e, (k + 1) * old_b, covered)
                pieces.append((r.hash_ids[k], off, end - k * old_b))
                pos = end
            if pos < e:
                pieces.append(("pad", r.request_id, pos, e))
            parent = ids.child(parent, tuple(pieces))
            new_ids.append(parent)
        out.append(msgspec.structs.replace(r, hash_ids=tuple(new_ids)))
    return msgspec.structs.replace(
        trace, requests=tuple(out), block_tokens=block_tokens, meta={**trace.meta, "reblocked_from": old_b}
    )
