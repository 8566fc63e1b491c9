"""Router-side tokenizer: tokenizer.json + the model's chat template, rendered like vLLM does."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from router.config import ConfigError
from router.index import PrefixIndex
from router.replicas.registry import ReplicaRegistry
from router.routing import Router
from router.scoring.policies import build_policy
from router.tokenizer import load_tokenizer
from router.types import KeyMode

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def make_tokenizer(folder: Path, *, post_bos: bool = False, **config: object) -> Path:
    """A small BPE ``tokenizer.json`` (ids: BOS 0, <|user|> 1, <|assistant|> 2, <|system|> 3) and its
    ``tokenizer_config.json`` with TEMPLATE; ``post_bos``: a post-processor that prepends BOS, as
    Llama 3's does; ``config`` overrides config keys (None deletes one)."""
    tokenizers = pytest.importorskip("tokenizers")
    pytest.importorskip("jinja2")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|begin_of_text|>", "<|user|>", "<|assistant|>", "<|system|>", "<unk>"],
    )
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "router", "cache", "prefix", "token"]
    tok.train_from_iterator([" ".join(rng.choices(words, k=12)) for _ in range(200)], trainer)
    if post_bos:
        tok.post_processor = tokenizers.processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)]
        )
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"bos_token": "<|begin_of_text|>", "eos_token": "<unk>", "chat_template": TEMPLATE, **config}
    (folder / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return folder


def test_chat_is_rendered_with_the_models_template_then_tokenized(tmp_path: Path) -> None:
    tok = load_tokenizer(str(make_tokenizer(tmp_path)))
    msgs = [{"role": "system", "content": "alpha beta"}, {"role": "user", "content": "gamma"}]
    text = tok.render_chat(msgs)
    assert text == "<|begin_of_text|><|system|>\nalpha beta\n<|user|>\ngamma\n<|assistant|>\n"
    ids = tok.encode_chat(msgs)
    assert ids[0] == 0  # BOS comes from the template, not added twice
    assert ids.count(0) == 1
    assert tok.encode_prompt("alpha beta") == tok.encode_prompt("alpha beta")


def test_router_uses_token_mode_with_a_tokenizer(tmp_path: Path) -> None:
    tok = load_tokenizer(str(make_tokenizer(tmp_path)))
    index = PrefixIndex(100)
    router = Router(index, ReplicaRegistry(index), build_policy("cache_aware"), block_size=4, tokenizer=tok)
    req = router.request_info("m", messages=[{"role": "user", "content": "router cache prefix token " * 8}])
    assert req.key_mode is KeyMode.TOKENS
    assert req.prompt_tokens == len(
        tok.encode_chat([{"role": "user", "content": "router cache prefix token " * 8}])
    )
    longer = router.request_info(
        "m",
        messages=[
            {"role": "user", "content": "router cache prefix token " * 8},
            {"role": "assistant", "content": "alpha"},
            {"role": "user", "content": "beta"},
        ],
    )
    # a conversation that grows keeps the earlier turns' blocks as its prefix (all but the tail)
    common = len(req.block_hashes) - 1
    assert longer.block_hashes[:common] == req.block_hashes[:common]


def test_missing_tokenizer_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"routing\.tokenizer"):
        load_tokenizer(str(tmp_path))


def test_template_errors_are_400s_and_no_template_means_byte_mode(tmp_path: Path) -> None:
    from router.errors import BadRequest

    folder = make_tokenizer(tmp_path)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('bad') }}{% endif %}x"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(str(folder))
    with pytest.raises(BadRequest):
        tok.encode_chat([{"role": "assistant", "content": "hi"}])
    del cfg["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(str(folder))
    assert not tok.has_chat_template
    index = PrefixIndex(100)
    router = Router(index, ReplicaRegistry(index), build_policy("cache_aware"), block_size=4, tokenizer=tok)
    req = router.request_info("m", messages=[{"role": "user", "content": "alpha beta " * 40}])
    assert req.key_mode is KeyMode.BYTES


@pytest.mark.parametrize(
    ("post_bos", "add_bos_token", "bos"),
    [(True, None, True), (True, False, True), (False, True, False), (False, None, False)],
)
def test_completion_bos_comes_from_the_post_processor_not_add_bos_token(
    tmp_path: Path, post_bos: bool, add_bos_token: bool | None, bos: bool
) -> None:
    # transformers (and so vLLM) drops add_bos_token when a tokenizer.json exists: the file's
    # post-processor decides (Llama 3 has one and no add_bos_token)
    tok = load_tokenizer(str(make_tokenizer(tmp_path, post_bos=post_bos, add_bos_token=add_bos_token)))
    ids = tok.encode_prompt("alpha beta")
    assert (ids[0] == 0) is bos
    assert ids[int(bos) :] == tok.encode("alpha beta", add_special_tokens=False)
    # chat: the template's BOS only, whatever the post-processor does
    chat = tok.encode_chat([{"role": "user", "content": "gamma"}])
    assert chat[0] == 0 and chat.count(0) == 1


def test_chat_template_jinja_file_wins_and_named_templates_use_default(tmp_path: Path) -> None:
    named = [
        {"name": "tool_use", "template": "tools"},
        {"name": "default", "template": "named {{ messages[0].content }}"},
    ]
    tok = load_tokenizer(str(make_tokenizer(tmp_path / "named", chat_template=named)))
    assert tok.render_chat([{"role": "user", "content": "x"}]) == "named x"
    folder = make_tokenizer(tmp_path / "jinja")
    (folder / "chat_template.jinja").write_text("file {{ messages[0].content }}")
    assert load_tokenizer(str(folder)).render_chat([{"role": "user", "content": "x"}]) == "file x"


def test_template_extras_match_transformers(tmp_path: Path) -> None:
    template = (
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m | tojson }}{% endfor %}"
        "{{ add_generation_prompt }}"
    )
    tok = load_tokenizer(str(make_tokenizer(tmp_path, chat_template=template)))
    msgs = [{"role": "user", "content": "<b> & 'é'"}, {"role": "user", "content": "second"}]
    # tojson is json.dumps (no HTML escaping, no ASCII escaping); {% break %} works
    assert tok.render_chat(msgs) == json.dumps(msgs[0], ensure_ascii=False) + "True"
    assert tok.render_chat(msgs, add_generation_prompt=False).endswith("False")
