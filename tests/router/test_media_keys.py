"""Media in prompts (audit #13, #14): different images with the same text never share keys, a
large data URL is never tokenised as text, and media requests are never counted as confirmable."""

from __future__ import annotations

import base64
import random
import time

from router.hashing import render_messages
from router.index import PrefixIndex
from router.replicas.registry import ReplicaRegistry
from router.routing import Router
from router.scoring.policies import build_policy
from router.types import KeyMode, ReplicaSpec


def _router() -> Router:
    index = PrefixIndex(1000)
    reg = ReplicaRegistry(index)
    reg.add(ReplicaSpec(url="http://r0", name="r0", models=("m",)))
    return Router(index, reg, build_policy("cache_aware", rng=random.Random(0)), block_size=16)


def _chat(
    url: str, question: str = "Tag this product photo with three keywords. " * 8
) -> list[dict[str, object]]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}],
        }
    ]


def test_byte_mode_keys_differ_per_image_and_share_the_text_before_it() -> None:
    router = _router()
    system = {"role": "system", "content": "You are a product tagger. " * 20}
    cat = router.request_info("m", messages=[system, *_chat("https://x/cat.png")])
    dog = router.request_info("m", messages=[system, *_chat("https://x/dog.png")])
    assert cat.key_mode is KeyMode.BYTES and not cat.confirmable
    common = next(
        i for i, (a, b) in enumerate(zip(cat.block_hashes, dog.block_hashes, strict=False)) if a != b
    )
    assert 0 < common < len(cat.block_hashes)  # the system prompt is shared, the image is not
    assert (
        cat.block_hashes
        == router.request_info("m", messages=[system, *_chat("https://x/cat.png")]).block_hashes
    )


def test_token_mode_placeholder_tokens_do_not_make_images_collide() -> None:
    router = _router()
    same_tokens = list(range(200))  # what an "openai"-format template renders for any image
    a = router.request_info("m", token_ids=same_tokens, messages=_chat("https://x/a.png"))
    b = router.request_info("m", token_ids=same_tokens, messages=_chat("https://x/b.png"))
    assert a.key_mode is KeyMode.TOKENS and not a.confirmable
    assert not set(a.block_hashes) & set(b.block_hashes)
    uuid = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "https://x/a.png"}, "uuid": "img-1"}],
        }
    ]
    uuid2 = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "https://cdn/a.png"}, "uuid": "img-1"}],
        }
    ]
    assert (
        router.request_info("m", token_ids=same_tokens, messages=uuid).block_hashes
        == router.request_info("m", token_ids=same_tokens, messages=uuid2).block_hashes
    )  # vLLM keys by the uuid when given


def test_large_data_url_is_digested_not_rendered() -> None:
    router = _router()
    url = "data:image/png;base64," + base64.b64encode(random.Random(0).randbytes(600_000)).decode()
    t0 = time.perf_counter()
    req = router.request_info("m", messages=_chat(url))
    elapsed = time.perf_counter() - t0
    assert len(render_messages(_chat(url))) < 2000  # the URL never enters the rendering
    assert req.prompt_tokens < 500
    assert elapsed < 0.1  # ~800 KB of base64: a digest, not 190k pseudo-tokens (audit: ~1 s)
