"""Agent conversations, router vs real vLLM 0.32 CPU: same token ids every turn, and the cache follows.

    KVROUTER_VLLM_VENV=.venv-vllm pytest -m vllm tests/integration/test_vllm_chat_render.py -s

The corpus (data/agent_conversations.json) has tools, tool calls with JSON-string arguments, tool
results as parts, ``developer`` messages, ``reasoning``, content as parts and a Claude Code billing
header. For each turn the router's tokens (router/chat_render.py, through the same HFTokenizer the
router loads) must equal vLLM's ``POST /tokenize`` with ``messages`` and ``tools``. Then, through
``kvrouter serve`` on two replicas, every follow-up turn must land on the replica that served its
conversation and that replica's ``vllm:prefix_cache_hits_total`` must grow by at least the previous
turn's full blocks.

The tiny model must carry the tools template of engines/vllm/make_tiny_model.py: then the module runs on
the shared `vllm_pair` (tests/integration/conftest.py). A folder with an older template is not used: a
fresh one is built in a temporary directory (~10 s) and two more replicas serve it.

``KVROUTER_WRITE_CHAT_GOLDEN=1`` also (re)writes tests/router/golden/chat-render/ from vLLM's answers,
which the unit test (tests/router/test_chat_render.py) checks without vLLM.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from router.chat_render import parse_chat_options
from router.tokenizer import HFTokenizer
from tests.integration.vllm_fixtures import (
    BLOCK_SIZE,
    MAKE_MODEL,
    REPO,
    Replica,
    http,
    kvrouter,
    metric_samples,
    metric_sum,
    vllm_replicas,
)
from tests.support.procs import wait_for

pytestmark = pytest.mark.vllm

CORPUS = Path(__file__).parent / "data" / "agent_conversations.json"
GOLDEN_DIR = REPO / "tests" / "router" / "golden" / "chat-render"
HITS = "vllm:prefix_cache_hits_total"


def load_corpus() -> list[dict[str, Any]]:
    conversations: list[dict[str, Any]] = json.loads(CORPUS.read_text(encoding="utf-8"))["conversations"]
    return conversations


def chat_body(conv: dict[str, Any], messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "tiny", "messages": messages, **extra}
    if conv["tools"] is not None:
        body["tools"] = conv["tools"]
    return body


def router_tokens(tok: HFTokenizer, body: dict[str, Any]) -> list[int]:
    """What chat_info computes for this body (generate.chat_token_ids)."""
    return tok.encode_chat(body["messages"], options=parse_chat_options(json.dumps(body).encode()))


def _template_of_make_tiny_model() -> str:
    spec = importlib.util.spec_from_file_location("make_tiny_model", MAKE_MODEL)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return str(mod.CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def tools_env(vllm_setup: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    venv, model = vllm_setup
    cfg = json.loads((model / "tokenizer_config.json").read_text(encoding="utf-8"))
    if cfg.get("chat_template") != _template_of_make_tiny_model():
        model = tmp_path_factory.mktemp("tiny-llama-tools")
        subprocess.run([str(venv / "bin" / "python"), str(MAKE_MODEL), str(model)], check=True, timeout=300)
    return venv, model


@pytest.fixture(scope="module")
def replicas(
    tools_env: tuple[Path, Path],
    vllm_setup: tuple[Path, Path],
    vllm_pair: list[Replica],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[list[Replica]]:
    venv, model = tools_env
    if model == vllm_setup[1]:  # the shared pair serves the tools template already
        yield vllm_pair
        return
    with vllm_replicas(venv, model, tmp_path_factory.mktemp("vllm-chat-run"), cores=[0, 1]) as reps:
        yield reps


def test_router_tokens_equal_vllm_tokenize_for_every_turn(
    replicas: list[Replica], tools_env: tuple[Path, Path]
) -> None:
    tok = HFTokenizer(str(tools_env[1]))
    golden: list[dict[str, Any]] = []
    differing: list[str] = []
    turns = 0
    for conv in load_corpus():
        for i, messages in enumerate(conv["turns"]):
            body = chat_body(conv, messages)
            reply = http("POST", f"{replicas[0].url}/tokenize", body)
            assert reply.status == 200, (
                f"{conv['name']} turn {i}: vLLM /tokenize -> {reply.status}: {reply.body}"
            )
            engine: list[int] = reply.body["tokens"]
            ours = router_tokens(tok, body)
            turns += 1
            golden.append({"conversation": conv["name"], "turn": i, "token_ids": engine})
            if ours != engine:
                common = next((k for k, (a, b) in enumerate(zip(ours, engine, strict=False)) if a != b), None)
                differing.append(
                    f"{conv['name']} turn {i}: router {len(ours)} tokens, vLLM {len(engine)}, first difference at {common}:"
                    f"\n  router: {tok.decode(ours[common or 0 :][:40], skip_special_tokens=False)!r}"
                    f"\n  vLLM  : {tok.decode(engine[common or 0 :][:40], skip_special_tokens=False)!r}"
                )
    print(f"\nchat-render fidelity: {turns - len(differing)}/{turns} turns identical to vLLM /tokenize")
    if os.environ.get("KVROUTER_WRITE_CHAT_GOLDEN") and not differing:
        GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(tools_env[1] / name, GOLDEN_DIR / name)
        (GOLDEN_DIR / "golden.json").write_text(json.dumps({"turns": golden}) + "\n", encoding="utf-8")
    assert not differing, "\n".join(differing)


def _routed_to(headers: dict[str, str], replicas: list[Replica]) -> Replica:
    value = headers.get("x-kvrouter-replica", "")
    matches = [r for r in replicas if f":{r.port}" in value or value == r.name]
    assert len(matches) == 1, f"x-kvrouter-replica {value!r} names none of {[r.url for r in replicas]}"
    return matches[0]


def test_follow_up_turns_land_on_the_replica_that_holds_the_conversation(
    replicas: list[Replica], tools_env: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    tok = HFTokenizer(str(tools_env[1]))
    log_dir = tmp_path_factory.mktemp("kvrouter-chat")
    follow_ups = 0
    grown_total = expected_total = 0
    with kvrouter([r.url for r in replicas], tokenizer=tools_env[1], log_dir=log_dir) as url:
        wait_for(lambda: len(metric_samples(url, "kvrouter_chat_render_exact")) == 1, 10, "renderer metric")
        for conv in load_corpus():
            home: Replica | None = None
            previous: list[int] = []
            for i, messages in enumerate(conv["turns"]):
                # tool_choice "none": the tiny model has no tool parser; the tools still reach the template
                body = chat_body(conv, messages, max_tokens=1, temperature=0)
                if conv["tools"] is not None:
                    body["tool_choice"] = "none"
                ours = router_tokens(tok, body)
                hits_before = {r.name: metric_sum(r.url, HITS) for r in replicas}
                reply = http("POST", f"{url}/v1/chat/completions", body)
                assert reply.status == 200, f"{conv['name']} turn {i}: {reply.status} {reply.body}"
                assert reply.body["usage"]["prompt_tokens"] == len(ours)
                target = _routed_to(reply.headers, replicas)
                if home is None:
                    home = target
                else:
                    follow_ups += 1
                    assert target == home, (
                        f"{conv['name']} turn {i} left its replica {home.name} for {target.name}"
                    )
                    shared = next(
                        (k for k, (a, b) in enumerate(zip(previous, ours, strict=False)) if a != b),
                        min(len(previous), len(ours)),
                    )
                    grown = metric_sum(target.url, HITS) - hits_before[target.name]
                    assert grown >= shared // BLOCK_SIZE * BLOCK_SIZE, (
                        f"{conv['name']} turn {i}: {HITS} grew by {grown}, previous turn shares"
                        f" {shared // BLOCK_SIZE} full blocks"
                    )
                    assert shared // BLOCK_SIZE >= len(previous) // BLOCK_SIZE - 1
                    grown_total += int(grown)
                    expected_total += len(previous) // BLOCK_SIZE * BLOCK_SIZE
                previous = ours
        renders = {labels["result"]: v for labels, v in metric_samples(url, "kvrouter_chat_renders_total")}
        assert renders.get("exact", 0) >= sum(len(c["turns"]) for c in load_corpus())
    assert follow_ups == sum(len(c["turns"]) - 1 for c in load_corpus())
    print(
        f"\n{follow_ups} follow-up turns, all on their conversation's replica; prefix-cache hits"
        f" {grown_total} tokens for {expected_total} tokens of previous turns' full blocks"
    )
