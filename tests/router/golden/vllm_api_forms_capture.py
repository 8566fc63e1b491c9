"""Run with vLLM 0.32's python: the chat messages and tools vLLM derives from each Responses /
Anthropic request in ``vllm-0.32-api-forms.json`` (stdin: that file, stdout: the ``vllm`` fields).

    /path/to/vllm-venv/bin/python tests/router/golden/vllm_api_forms_capture.py \\
        < tests/router/golden/vllm-0.32-api-forms.json
"""

import json
import sys
from typing import Any

from vllm.entrypoints.anthropic.protocol import AnthropicMessagesRequest
from vllm.entrypoints.anthropic.serving import AnthropicServingMessages
from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
from vllm.entrypoints.openai.responses.utils import construct_input_messages, construct_tool_dicts


def _plain(o: Any) -> Any:
    return o.model_dump() if hasattr(o, "model_dump") else str(o)


def convert(case: dict[str, Any]) -> dict[str, Any]:
    if case["api"] == "anthropic":
        chat = AnthropicServingMessages.to_chat_completion_request(
            AnthropicMessagesRequest.model_validate(case["body"])
        )
        tools = [t.model_dump() for t in chat.tools] if chat.tools else None
        return {"messages": chat.messages, "tools": tools, "reasoning_effort": chat.reasoning_effort}
    req = ResponsesRequest.model_validate(case["body"])
    msgs = construct_input_messages(request_instructions=req.instructions, request_input=req.input)
    return {
        "messages": json.loads(json.dumps(msgs, default=_plain)),
        "tools": construct_tool_dicts(req.tools, req.tool_choice),
    }


if __name__ == "__main__":
    print(json.dumps([convert(c) for c in json.load(sys.stdin)], default=str))
