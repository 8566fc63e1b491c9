"""Incremental tokenisation and block-hash chains (prefix_tokens.py): the same ids and keys as a full
encode, for conversations that grow, fork and edit their history, with any tokenizer's quirks."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest

from router.hashing import hash_token_blocks, model_seed, token_bytes
from router.prefix_tokens import ChainCache, PrefixTokenCache

ROOT = Path(__file__).resolve().parents[2]
# The tiny model `make test` builds (a real Llama tokenizer), where the other tests find it.
TINY = ROOT / os.environ.get("KVROUTER_TINY_MODEL", ".cache/tiny-llama") / "tokenizer.json"


def _tokenizers() -> list[Any]:
    tokenizers = pytest.importorskip("tokenizers")
    out: list[Any] = []
    # byte-level BPE (GPT-2 / Llama 3 style pre-tokeniser)
    bl = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    bl.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    # Metaspace with a prefix added to the whole string (SentencePiece / Llama 2 style)
    ms = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    ms.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    rng = random.Random(1)
    corpus = [" ".join(rng.choices(WORDS, k=20)) + rng.choice([".", "!\n", "\n\n", "  "]) for _ in range(400)]
    for tok in (bl, ms):
        trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<|user|>"])
        tok.train_from_iterator(corpus, trainer)
        out.append(tok)
    if TINY.is_file():
        out.append(tokenizers.Tokenizer.from_file(str(TINY)))
    return out


WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "router",
    "cache",
    "prefix",
    "token",
    "ünï",
    "数据",
    "  ",
    "\n",
    "42",
    "x.",
]


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.mark.parametrize("which", [0, 1, 2])
def test_incremental_encode_equals_full_encode(which: int) -> None:
    toks = _tokenizers()
    if which >= len(toks):
        pytest.skip("tiny-llama tokenizer not available")
    rust = toks[which]
    cache = PrefixTokenCache(rust, verify_every=0)  # every answer is checked here instead
    rng = random.Random(which)
    convs = [_text(rng, 1500) for _ in range(3)]
    for step in range(60):
        c = rng.randrange(len(convs))
        op = rng.random()
        if op < 0.6:  # the next turn
            convs[c] += "<|user|>\n" + _text(rng, rng.randint(1, 300))
        elif op < 0.8:  # an edit somewhere in the history (a fork)
            at = rng.randrange(len(convs[c]))
            convs[c] = convs[c][:at] + _text(rng, 3) + convs[c][at:]
        else:  # a cut (regenerate the last answer)
            convs[c] = convs[c][: max(300, len(convs[c]) - rng.randint(1, 500))]
        text = convs[c]
        assert cache.encode(text) == rust.encode(text, add_special_tokens=False).ids, step
    assert cache.stats["spliced"] > 0


def test_a_verification_mismatch_turns_the_cache_off() -> None:
    rust = _tokenizers()[0]
    cache = PrefixTokenCache(rust, verify_every=1)
    rng = random.Random(3)
    text = _text(rng, 2000)
    cache.encode(text)
    entry = next(iter(cache._groups.values()))[0]
    entry.ids[700] = (entry.ids[700] + 1) % 300  # a cached entry gone wrong
    longer = text + _text(rng, 50)
    assert cache.encode(longer) == rust.encode(longer, add_special_tokens=False).ids
    assert cache.stats["verify_mismatch"] == 1 and not cache.enabled


def test_chain_cache_matches_full_hashing() -> None:
    rng = random.Random(5)
    chains = ChainCache(max_entries=4)
    seed = model_seed("m")
    base = [rng.randrange(50_000) for _ in range(3000)]
    for step in range(40):
        n = rng.randint(50, 3000)
        toks = base[:n] + [rng.randrange(50_000) for _ in range(rng.randint(0, 500))]
        if rng.random() < 0.3:
            base = toks
        for max_blocks in (8192, 100):
            got = chains.hashes(token_bytes(toks), 64, seed, max_blocks)
            assert got == hash_token_blocks(toks, 16, seed, max_blocks), step


def test_the_cache_stays_within_its_token_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    import router.prefix_tokens as pt

    monkeypatch.setattr(pt, "MAX_TOKENS", 20_000)
    rust = _tokenizers()[0]
    cache = PrefixTokenCache(rust, verify_every=0)
    rng = random.Random(9)
    for _ in range(12):  # distinct conversations of ~3-6k tokens each
        text = _text(rng, rng.randint(1500, 3000))
        assert cache.encode(text) == rust.encode(text, add_special_tokens=False).ids
        held = sum(len(e.ids) for g in cache._groups.values() for e in g)
        assert held == cache._tokens <= 20_000
