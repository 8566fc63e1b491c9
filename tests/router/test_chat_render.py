"""Chat rendering against golden token ids captured from real vLLM 0.32 (no vLLM needed here).

golden/chat-render/ holds the tools-capable tiny model's tokenizer files, vLLM's ``/tokenize``
ids for every turn of the agent corpus (tests/integration/data/agent_conversations.json), and
cases.json: further requests (template options, edge cases, request-level templates, refusals) with
vLLM's answer. Recapture: tools/capture_chat_golden.py; the live comparison is
tests/integration/test_vllm_chat_render.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from router.chat_messages import apply_developer_role, detect_content_format, normalise_messages
from router.chat_render import parse_chat_options
from router.config import ConfigError
from router.errors import BadRequest
from router.tokenizer import HFTokenizer

GOLDEN = Path(__file__).parent / "golden" / "chat-render"
CORPUS = Path(__file__).parent.parent / "integration" / "data" / "agent_conversations.json"


def _load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


CASES: list[dict[str, Any]] = _load(GOLDEN / "cases.json")["cases"]


@pytest.fixture(scope="module")
def corpus_tok() -> HFTokenizer:
    return HFTokenizer(str(GOLDEN))


@pytest.fixture(scope="module")
def server_tok() -> HFTokenizer:
    """As the capture server ran: --default-chat-template-kwargs, --trust-request-chat-template."""
    return HFTokenizer(
        str(GOLDEN),
        default_chat_template_kwargs=_load(GOLDEN / "cases.json")["server"]["default_chat_template_kwargs"],
        trust_request_chat_template=True,
    )


def encode(tok: HFTokenizer, body: dict[str, Any]) -> list[int]:
    return tok.encode_chat(body["messages"], options=parse_chat_options(json.dumps(body).encode()))


def test_every_corpus_turn_matches_vllm(corpus_tok: HFTokenizer) -> None:
    golden = {(t["conversation"], t["turn"]): t["token_ids"] for t in _load(GOLDEN / "golden.json")["turns"]}
    turns = 0
    for conv in _load(CORPUS)["conversations"]:
        for i, messages in enumerate(conv["turns"]):
            body: dict[str, Any] = {"messages": messages}
            if conv["tools"] is not None:
                body["tools"] = conv["tools"]
            assert encode(corpus_tok, body) == golden[(conv["name"], i)], f"{conv['name']} turn {i}"
            turns += 1
    assert turns == len(golden) >= 18


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_case_matches_vllm(server_tok: HFTokenizer, case: dict[str, Any]) -> None:
    expect = case["expect"]
    if expect["status"] == 200:
        assert encode(server_tok, case["body"]) == expect["token_ids"]
    else:
        with pytest.raises(BadRequest) as err:
            encode(server_tok, case["body"])
        assert err.value.status == 400


def test_a_plain_chat_renders_as_the_tool_less_template_did(corpus_tok: HFTokenizer) -> None:
    # The tiny model's tools template keeps the old prompts of tool-less chats byte for byte.
    text = corpus_tok.render_chat([{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}])
    assert text == "<|begin_of_text|><|system|>\ns\n<|user|>\nhi\n<|assistant|>\n"


def test_both_generation_flags_are_refused() -> None:
    with pytest.raises(BadRequest):
        parse_chat_options(b'{"messages": [], "add_generation_prompt": true, "continue_final_message": true}')


def test_media_under_a_string_template_is_not_rendered_as_text() -> None:
    from router.chat_messages import MediaNotModeled

    url = "data:image/png;base64," + "A" * 1000
    with pytest.raises(MediaNotModeled):
        normalise_messages(
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}], "string"
        )
    (msg,) = normalise_messages(
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}], "openai"
    )
    assert msg["content"] == [{"type": "image"}]


@pytest.mark.parametrize(
    ("template", "fmt"),
    [
        ("{% for m in messages %}{{ m['content'] }}{% endfor %}", "string"),
        ("{% for m in messages %}{% for c in m['content'] %}{{ c.text }}{% endfor %}{% endfor %}", "openai"),
        ("{% for m in messages[1:] %}{% for c in m.content | list %}{% endfor %}{% endfor %}", "openai"),
        (
            "{% set ms = messages %}{% for m in ms %}{% for c in m.content %}{% endfor %}{% endfor %}",
            "openai",
        ),
        (
            "{% macro r(x) %}{% for c in x %}{{ c }}{% endfor %}{% endmacro %}"
            "{% for m in messages %}{{ r(m['content']) }}{% endfor %}",
            "openai",
        ),
        ("{% for c in content %}{% endfor %}", "openai"),
        ("{% for m in messages %}{{ m.content", "string"),  # does not parse
    ],
)
def test_content_format_detection(corpus_tok: HFTokenizer, template: str, fmt: str) -> None:
    assert detect_content_format(template, corpus_tok.renderer._env) == fmt


def test_developer_stays_when_the_template_names_it() -> None:
    conv: list[dict[str, Any]] = [
        {"role": "developer", "content": "d", "tools": None},
        {"role": "user", "content": "u"},
    ]
    assert apply_developer_role(conv, "{% if m.role == 'developer' %}") is conv
    assert apply_developer_role(conv, "{{ m.content }}") == [{"role": "system", "content": "d"}, conv[1]]


def test_generation_blocks_and_named_templates_load(tmp_path: Path) -> None:
    cfg = _load(GOLDEN / "tokenizer_config.json")
    cfg["chat_template"] = [
        {
            "name": "default",
            "template": "{% for m in messages %}{% generation %}D{{ m.content }}{% endgeneration %}{% endfor %}",
        },
        {
            "name": "tool_use",
            "template": "{% for m in messages %}T{{ m.content }}{{ tools | length }}{% endfor %}",
        },
    ]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "tokenizer.json").write_bytes((GOLDEN / "tokenizer.json").read_bytes())
    tok = HFTokenizer(str(tmp_path))
    assert tok.render_chat([{"role": "user", "content": "x"}]) == "Dx"
    messages = [{"role": "user", "content": "x"}]
    body = {"messages": messages, "tools": [{"type": "function", "function": {"name": "f"}}]}
    assert tok.render_chat(messages, options=parse_chat_options(json.dumps(body).encode())) == "Tx1"


def test_router_level_chat_template_file_and_literal(tmp_path: Path) -> None:
    f = tmp_path / "t.jinja"
    f.write_text("F{{ messages[0].content }}")
    assert (
        HFTokenizer(str(GOLDEN), chat_template=str(f)).render_chat([{"role": "user", "content": "x"}]) == "Fx"
    )
    assert (
        HFTokenizer(str(GOLDEN), chat_template="L{{ 1 }}").render_chat([{"role": "user", "content": "x"}])
        == "L1"
    )
    with pytest.raises(ConfigError):
        HFTokenizer(str(GOLDEN), chat_template="no/such/file.jinja")
    with pytest.raises(ConfigError):
        HFTokenizer(str(GOLDEN), chat_template="{% if %}")


def test_non_jinja_renderers_are_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((GOLDEN / name).read_bytes())
    (tmp_path / "tekken.json").write_text("{}")
    with caplog.at_level("WARNING", logger="kvrouter.chat"):
        tok = HFTokenizer(str(tmp_path))
    assert "approximate" in caplog.text
    tok.render_chat([{"role": "user", "content": "x"}])
    metrics = {m.name: m for m in tok.renderer.collect()}
    assert [s.value for s in metrics["kvrouter_chat_render_exact"].samples] == [0]
    renders = {
        s.labels["result"]: s.value
        for s in metrics["kvrouter_chat_renders"].samples
        if s.name.endswith("_total")
    }
    assert renders["approximate"] == 1 and renders["exact"] == 0


def test_chat_requests_are_keyed_on_the_prompt_vllm_renders(tmp_path: Path) -> None:
    """generate.chat_info: tools reach the keys, parts under a concatenating template work (the
    router used to answer 500), a refusing template is the client's 400, media fall back to bytes."""
    from router.config import Config
    from router.http.app import build_state
    from router.http.generate import chat_info
    from router.types import KeyMode

    golden = {(t["conversation"], t["turn"]): t["token_ids"] for t in _load(GOLDEN / "golden.json")["turns"]}
    conv = _load(CORPUS)["conversations"][0]
    st = build_state(Config(), HFTokenizer(str(GOLDEN)))
    body = {"model": "m", "messages": conv["turns"][1], "tools": conv["tools"]}
    req = chat_info(st.router, json.dumps(body).encode())
    assert req.key_mode is KeyMode.TOKENS
    assert req.prompt_tokens == len(golden[(conv["name"], 1)])

    cfg = _load(GOLDEN / "tokenizer_config.json")
    cfg["chat_template"] = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% endfor %}"
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "tokenizer.json").write_bytes((GOLDEN / "tokenizer.json").read_bytes())
    st = build_state(Config(), HFTokenizer(str(tmp_path)))
    parts = [{"type": "text", "text": "alpha"}, {"type": "text", "text": "beta"}]
    req = chat_info(
        st.router, json.dumps({"model": "m", "messages": [{"role": "user", "content": parts}]}).encode()
    )
    assert req.key_mode is KeyMode.TOKENS and req.prompt_tokens > 0
    with pytest.raises(BadRequest) as err:
        chat_info(
            st.router, json.dumps({"model": "m", "messages": [{"role": "system", "content": "s"}]}).encode()
        )
    assert err.value.status == 400 and "no system role" in str(err.value)
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 4096}}
    req = chat_info(
        st.router, json.dumps({"model": "m", "messages": [{"role": "user", "content": [image]}]}).encode()
    )
    assert req.key_mode is KeyMode.BYTES


def test_a_request_template_needs_trust_as_in_vllm(corpus_tok: HFTokenizer) -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "chat_template": "{{ 1 }}"}
    with pytest.raises(BadRequest, match="trust-request-chat-template"):
        encode(corpus_tok, body)
    body = {
        "messages": [{"role": "user", "content": "x"}],
        "chat_template_kwargs": {"chat_template": "{{ 1 }}"},
    }
    with pytest.raises(BadRequest, match="trust-request-chat-template"):
        encode(corpus_tok, body)
