"""The simulator's HF tokenizer is the router's: for the same model folder both give the same token
ids for a chat or a prompt, over the sim's HTTP API too (/tokenize with vLLM's defaults)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from engines.sim.fleet import FleetConfig, start_fleet
from engines.sim.replica.tokenizer import BOS_ID, SPECIAL_TOKENS, HFTokenizer, load_tokenizer
from router.tokenizer import load_tokenizer as load_router_tokenizer
from tests.router.test_tokenizer import make_tokenizer

ROOT = Path(__file__).resolve().parents[2]
CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hello there, how are you?"}],
    [
        {"role": "system", "content": "You are a careful assistant. Answer in one line."},
        {"role": "user", "content": "Sum 17 and 25, then explain: (a+b) = c; why?"},
        {"role": "assistant", "content": "42, because 17 + 25 = 42."},
        {"role": "user", "content": "And <|user|> inside text, émoji 🚀, tabs\tand\nnewlines?"},
    ],
]
PROMPTS = ["Hello world", "  leading spaces, punctuation!? and digits 12345", "<|begin_of_text|>explicit BOS"]


def tiny_model() -> Path:
    """engines/vllm/make_tiny_model.py's folder (``make tiny-model``), or skip."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("jinja2")
    folder = Path(os.environ.get("KVROUTER_TINY_MODEL", ".cache/tiny-llama"))
    folder = folder if folder.is_absolute() else ROOT / folder
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"the tiny model is not built in {folder} (make tiny-model)")
    return folder


def sim_chat_ids(tok: HFTokenizer, messages: list[dict[str, Any]]) -> list[int]:
    # what the sim server does for /v1/chat/completions and /tokenize with messages
    return tok.encode(tok.render_chat(messages), add_special_tokens=False)


def test_router_and_sim_give_identical_ids_with_the_tiny_models_tokenizer() -> None:
    folder = tiny_model()
    router, sim = load_router_tokenizer(str(folder)), load_tokenizer(str(folder))
    assert isinstance(sim, HFTokenizer)
    for msgs in CONVERSATIONS:
        ids = router.encode_chat(msgs)
        assert sim_chat_ids(sim, msgs) == ids
        assert ids[0] == BOS_ID and ids.count(BOS_ID) == 1  # the template's BOS, not doubled
    for text in PROMPTS:
        assert sim.encode(text) == router.encode_prompt(text)
    # the tiny model's special tokens are the built-in sim tokenizer's, id for id
    assert [router.encode(t, add_special_tokens=False) for t in SPECIAL_TOKENS] == [[i] for i in range(6)]


@pytest.mark.parametrize("post_bos", [False, True])
def test_sim_hf_tokenizer_is_the_routers(tmp_path: Path, post_bos: bool) -> None:
    folder = make_tokenizer(tmp_path, post_bos=post_bos, add_bos_token=not post_bos)
    router, sim = load_router_tokenizer(str(folder)), HFTokenizer(folder)
    msgs = [{"role": "system", "content": "alpha beta"}, {"role": "user", "content": "gamma delta"}]
    assert sim_chat_ids(sim, msgs) == router.encode_chat(msgs)
    assert sim.encode("router cache prefix") == router.encode_prompt("router cache prefix")
    assert (sim.encode("router")[0] == 0) is post_bos  # add_bos_token is ignored, like transformers
    assert sim.decode(router.encode_chat(msgs)) == router.decode(router.encode_chat(msgs))


def test_sim_without_a_chat_template_falls_back_to_the_built_in_one(tmp_path: Path) -> None:
    sim = HFTokenizer(make_tokenizer(tmp_path, chat_template=None))
    assert (
        sim.render_chat([{"role": "user", "content": "hi"}])
        == "<|begin_of_text|><|user|>\nhi\n<|assistant|>\n"
    )


async def test_sim_tokenize_endpoint_matches_the_router() -> None:
    folder = tiny_model()
    router = load_router_tokenizer(str(folder))
    msgs = CONVERSATIONS[1]
    async with (
        start_fleet(FleetConfig(1, "tiny", tokenizer=str(folder), events_port=None)) as fleet,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
    ):
        url = fleet.replicas[0].url + "/tokenize"

        async def tokens(body: dict[str, Any]) -> list[int]:
            async with http.post(url, json=body) as resp:
                assert resp.status == 200, await resp.text()
                return list((await resp.json())["tokens"])

        assert await tokens({"messages": msgs}) == router.encode_chat(msgs)
        assert await tokens({"messages": msgs, "add_generation_prompt": False}) == router.encode_chat(
            msgs, add_generation_prompt=False
        )
        assert await tokens({"prompt": PROMPTS[1]}) == router.encode_prompt(PROMPTS[1])
        assert await tokens({"prompt": PROMPTS[2], "add_special_tokens": False}) == router.encode(
            PROMPTS[2], add_special_tokens=False
        )


_HF_SCRIPT = """
import json, sys, warnings
warnings.filterwarnings("ignore")
from transformers import AutoTokenizer
folder, msgs, prompts = json.loads(sys.argv[1])
t = AutoTokenizer.from_pretrained(folder)
chats = [t(t.apply_chat_template(m, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
         for m in msgs]
print(json.dumps({"chats": chats, "prompts": [t(p, add_special_tokens=True)["input_ids"] for p in prompts]}))
"""


@pytest.mark.vllm
def test_tiny_model_ids_match_transformers_as_vllm_uses_it(tmp_path: Path) -> None:
    """Ground truth: vLLM renders chats with the tokenizer's template through transformers and encodes
    them without special tokens; prompts with them. Needs the vLLM venv (transformers)."""
    venv = os.environ.get("KVROUTER_VLLM_VENV")
    python = (ROOT / venv / "bin" / "python") if venv else None
    if python is None or not python.exists():
        if os.environ.get("KVROUTER_REQUIRE_VLLM"):
            pytest.fail(f"KVROUTER_VLLM_VENV={venv!r} has no python")
        pytest.skip("KVROUTER_VLLM_VENV is not set (make vllm-env)")
    folders = [
        tiny_model(),
        make_tokenizer(tmp_path / "post-bos", post_bos=True, tokenizer_class="PreTrainedTokenizerFast"),
    ]
    for folder in folders:
        arg = json.dumps([str(folder), CONVERSATIONS, PROMPTS])
        out = subprocess.run(
            [str(python), "-c", _HF_SCRIPT, arg], capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stderr[-2000:]
        want = json.loads(out.stdout.strip().splitlines()[-1])
        sim = HFTokenizer(folder)
        assert [sim_chat_ids(sim, m) for m in CONVERSATIONS] == want["chats"], folder
        assert [sim.encode(p) for p in PROMPTS] == want["prompts"], folder


async def test_sim_honours_add_special_tokens_and_refused_templates_are_400(tmp_path: Path) -> None:
    """vLLM 0.32: /tokenize and chat completions honour ``add_special_tokens`` (default False for
    chat: the template adds BOS), and a chat template that raises is a 400 BadRequestError with the
    template's reason (``safe_apply_chat_template``), not a 500."""
    good = make_tokenizer(tmp_path / "good", post_bos=True)
    router = load_router_tokenizer(str(good))
    msgs = [{"role": "user", "content": "alpha beta"}]
    text = router.render_chat(msgs)
    refuse = make_tokenizer(
        tmp_path / "refuse",
        chat_template="{% if messages|length < 2 %}{{ raise_exception('Conversation roles must alternate') }}"
        "{% endif %}{{ bos_token }}",
    )
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        async with start_fleet(FleetConfig(1, "tiny", tokenizer=str(good), events_port=None)) as fleet:
            url = fleet.replicas[0].url
            for special, want in ((None, router.encode(text, False)), (True, router.encode(text, True))):
                body: dict[str, Any] = {"messages": msgs}
                if special is not None:
                    body["add_special_tokens"] = special
                async with http.post(url + "/tokenize", json=body) as r:
                    assert (await r.json())["tokens"] == want
                async with http.post(url + "/v1/chat/completions", json={**body, "max_tokens": 1}) as r:
                    assert (await r.json())["usage"]["prompt_tokens"] == len(want)
            assert router.encode(text, True) != router.encode(text, False)  # the post-processor's BOS
            async with http.post(url + "/v1/completions", json={"prompt": "alpha", "max_tokens": 1}) as r:
                assert (await r.json())["usage"]["prompt_tokens"] == len(router.encode("alpha", True))
            body = {"prompt": "alpha", "max_tokens": 1, "add_special_tokens": False}
            async with http.post(url + "/v1/completions", json=body) as r:
                assert (await r.json())["usage"]["prompt_tokens"] == len(router.encode("alpha", False))
        async with start_fleet(FleetConfig(1, "tiny", tokenizer=str(refuse), events_port=None)) as fleet:
            url = fleet.replicas[0].url
            for path, body in (
                ("/tokenize", {"messages": msgs}),
                ("/v1/chat/completions", {"messages": msgs}),
            ):
                async with http.post(url + path, json=body) as r:
                    assert r.status == 400
                    assert await r.json() == {
                        "error": {
                            "message": "Conversation roles must alternate",
                            "type": "BadRequestError",
                            "param": None,
                            "code": 400,
                        }
                    }
