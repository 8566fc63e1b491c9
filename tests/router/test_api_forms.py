"""/v1/responses and /v1/messages become the chat conversation vLLM 0.32 renders for them.

The golden file holds requests and what vLLM 0.32's own converters
(``AnthropicServingMessages.to_chat_completion_request``, ``construct_input_messages``,
``construct_tool_dicts``) made of them; ``test_golden_is_current`` re-runs those converters when
the real vLLM is installed (KVROUTER_VLLM_VENV)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import msgspec
import pytest

from router.api_forms import ChatForm, anthropic_form, responses_form
from router.chat_render import _Tool, _tool_dict
from router.errors import BadRequest
from router.response_affinity import ResponseAffinity
from router.types import ReplicaId

GOLDEN = Path(__file__).parent / "golden" / "vllm-0.32-api-forms.json"
CASES: list[dict[str, Any]] = json.loads(GOLDEN.read_text())


def _form(case: dict[str, Any]) -> ChatForm:
    body = json.dumps(case["body"]).encode()
    return anthropic_form(body) if case["api"] == "anthropic" else responses_form(body)


def _tools(tools: list[Any] | None) -> list[dict[str, Any]] | None:
    return [_tool_dict(msgspec.convert(t, _Tool)) for t in tools] if tools else None


@pytest.mark.parametrize("case", CASES, ids=[f"{c['api']}-{i}" for i, c in enumerate(CASES)])
def test_conversation_and_tools_equal_vllms(case: dict[str, Any]) -> None:
    form = _form(case)
    want = case["vllm"]
    assert form.messages == want["messages"]
    got_tools = [_tool_dict(t) for t in form.options.tools] if form.options.tools else None
    assert got_tools == _tools(want["tools"])
    if "reasoning_effort" in want:
        assert form.options.reasoning_effort == want["reasoning_effort"]


def test_bad_input_is_a_400() -> None:
    with pytest.raises(BadRequest):
        responses_form(b'{"input": 3}')
    with pytest.raises(BadRequest):
        anthropic_form(b'{"messages": []}')
    with pytest.raises(BadRequest):
        responses_form(b'{"input": [{"type": "reasoning", "encrypted_content": "x"}]}')


def test_response_affinity_is_bounded_and_learns_ids_from_bodies_and_streams() -> None:
    aff = ResponseAffinity(capacity=2)
    aff.observe(b'{"id":"resp_a1","object":"response","output":[{"id":"msg_1"}]}', ReplicaId("r1"))
    aff.observe(
        b'event: response.created\ndata: {"type":"response.created","response":{"id":"resp_b2"}}',
        ReplicaId("r2"),
    )
    assert aff.lookup("resp_a1") == "r1" and aff.lookup("resp_b2") == "r2"
    assert aff.lookup_path("/v1/responses/resp_b2/cancel") == "r2"
    aff.remember("resp_c3", ReplicaId("r1"))  # capacity 2: the least recently used (a1) goes
    assert aff.lookup("resp_a1") is None and len(aff) == 2
    aff.forget_replica(ReplicaId("r1"))
    assert aff.lookup("resp_c3") is None and aff.lookup("resp_b2") == "r2"


@pytest.mark.vllm
def test_golden_is_current() -> None:
    venv = os.environ.get("KVROUTER_VLLM_VENV")
    if not venv:
        pytest.skip("KVROUTER_VLLM_VENV is not set")
    script = Path(__file__).parent / "golden" / "vllm_api_forms_capture.py"
    out = subprocess.run(
        [str(Path(venv) / "bin" / "python"), str(script)],
        input=GOLDEN.read_text(),
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert json.loads(out.stdout) == [c["vllm"] for c in CASES]
