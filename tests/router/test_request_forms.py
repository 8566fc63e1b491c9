"""Completion fields that change what vLLM caches or reads (audit #6-#8): the router keys the
tokens vLLM prefills (add_special_tokens, truncate_prompt_tokens) and predicts no hit where vLLM
skips the cache read (prompt logprobs)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from router.http.generate import chat_info, completion_info
from router.index import PrefixIndex
from router.replicas.registry import ReplicaRegistry
from router.routing import Router
from router.scoring.policies import build_policy
from router.tokenizer import HFTokenizer
from router.types import KeyMode, ReplicaSpec

GOLDEN = Path(__file__).parent / "golden" / "chat-render"
TEXT = "The quick brown fox jumps over the lazy dog. " * 10


def _router() -> Router:
    index = PrefixIndex(1000)
    reg = ReplicaRegistry(index)
    reg.add(ReplicaSpec(url="http://r0", name="r0", models=("m",)))
    tok = HFTokenizer(str(GOLDEN))
    return Router(index, reg, build_policy("cache_aware", rng=random.Random(0)), block_size=4, tokenizer=tok)


def _body(**kw: object) -> bytes:
    return json.dumps({"model": "m", "prompt": TEXT, **kw}).encode()


def test_add_special_tokens_and_truncation_key_what_vllm_prefills() -> None:
    router = _router()
    tok = router.tokenizer
    assert isinstance(tok, HFTokenizer)
    with_special = tok.encode(TEXT, True)
    without = tok.encode(TEXT, False)
    req = completion_info(router, _body())
    assert req.prompt_tokens == len(with_special)
    req = completion_info(router, _body(add_special_tokens=False))
    assert req.prompt_tokens == len(without)
    assert req.block_hashes == router.request_info("m", token_ids=without).block_hashes
    req = completion_info(router, _body(truncate_prompt_tokens=17))
    assert req.block_hashes == router.request_info("m", token_ids=with_special[-17:]).block_hashes


def test_prompt_logprobs_predict_no_hit() -> None:
    router = _router()
    assert completion_info(router, _body()).key_mode is KeyMode.TOKENS
    assert completion_info(router, _body(prompt_logprobs=1)).key_mode is KeyMode.NONE
    assert completion_info(router, _body(echo=True, logprobs=1)).block_hashes == []
    chat = {"model": "m", "messages": [{"role": "user", "content": TEXT}], "prompt_logprobs": 0}
    assert chat_info(router, json.dumps(chat).encode()).key_mode is KeyMode.NONE
