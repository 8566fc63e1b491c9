"""hashing.py: the chain contract every index key depends on."""

from __future__ import annotations

import xxhash

from router.hashing import hash_byte_blocks, hash_token_blocks, model_seed, render_messages, token_bytes


def test_chain_matches_definition() -> None:
    tokens = list(range(1, 65))
    seed = model_seed("m")
    got = hash_token_blocks(tokens, 16, seed)
    h = seed
    expected = []
    for i in range(4):
        h = xxhash.xxh3_64_intdigest(token_bytes(tokens[i * 16 : (i + 1) * 16]), seed=h)
        expected.append(h)
    assert got == expected


def test_full_blocks_only_and_cap() -> None:
    seed = model_seed("m")
    assert len(hash_token_blocks(list(range(47)), 16, seed)) == 2
    assert len(hash_token_blocks(list(range(160)), 16, seed, max_blocks=3)) == 3
    assert hash_token_blocks([], 16, seed) == []


def test_shared_prefix_shares_hashes_then_diverges() -> None:
    seed = model_seed("m")
    a = hash_token_blocks([1] * 32 + [2] * 16, 16, seed)
    b = hash_token_blocks([1] * 32 + [3] * 16, 16, seed)
    assert a[:2] == b[:2]
    assert a[2] != b[2]


def test_model_and_salt_separate_chains() -> None:
    toks = list(range(32))
    base = hash_token_blocks(toks, 16, model_seed("m"))
    assert hash_token_blocks(toks, 16, model_seed("other")) != base
    assert hash_token_blocks(toks, 16, model_seed("m", "tenant-a")) != base


def test_continuing_a_chain_from_a_parent_equals_hashing_the_whole() -> None:
    seed = model_seed("m")
    toks = list(range(64))
    whole = hash_token_blocks(toks, 16, seed)
    tail = hash_token_blocks(toks[32:], 16, whole[1])
    assert whole[2:] == tail


def test_large_token_ids_and_byte_mode() -> None:
    assert len(hash_token_blocks([2**32 - 1] * 16, 16, 0)) == 1
    data = b"x" * 200
    assert len(hash_byte_blocks(data, 64, 0)) == 3


def test_render_messages_is_canonical_and_prefix_preserving() -> None:
    short = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    longer = [*short, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    reordered = [{"content": "be brief", "role": "system"}, {"content": "hi", "role": "user"}]
    assert render_messages(short) == render_messages(reordered)
    assert render_messages(longer).startswith(render_messages(short))
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}]}
    ]
    assert "<image_url:" in render_messages(parts)  # the part's identity in place (media_keys.py)
