"""The other generate APIs as the chat conversation vLLM 0.32 renders for them.

vLLM serves ``/v1/responses`` and ``/v1/messages`` (Anthropic) by converting the request into chat
messages and tools, then rendering them with the chat template like ``/v1/chat/completions``. The
router does the same conversion so those requests get the same keys (and the same KV-event
confirmation) as chat:

* Responses: ``entrypoints/openai/responses/utils.py`` ``construct_input_messages`` and
  ``construct_tool_dicts`` (instructions first as a system message, items folded into assistant
  turns with tool calls / reasoning, function tools flattened to chat tools).
* Anthropic: ``entrypoints/anthropic/serving.py`` ``to_chat_completion_request`` (system blocks
  joined without the Claude Code billing header, ``tool_use`` -> ``tool_calls`` with JSON
  arguments, user ``tool_result`` -> ``tool`` messages, ``thinking`` -> ``reasoning``).

A ``previous_response_id`` request continues a conversation the router never saw in full (vLLM
keeps it in the engine's memory): it is routed by affinity (response_affinity.py), not by keys.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from .chat_render import ChatOptions
from .errors import BadRequest

_BILLING_HEADER = "x-anthropic-billing-header"


@dataclass(slots=True)
class ChatForm:
    """What routing needs from a non-chat generate request, in chat terms."""

    model: str | None
    messages: list[dict[str, Any]]
    options: ChatOptions
    stream: bool = False
    max_tokens: int = 0
    cache_salt: str | None = None
    previous_response_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _object(body: bytes) -> dict[str, Any]:
    try:
        obj = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise BadRequest(f"Request body is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise BadRequest("Request body must be a JSON object.")
    return obj


def _opt_str(obj: Mapping[str, Any], key: str) -> str | None:
    v = obj.get(key)
    if v is not None and not isinstance(v, str):
        raise BadRequest(f"`{key}` must be a string", param=key)
    return v


def _opt_int(obj: Mapping[str, Any], key: str) -> int:
    v = obj.get(key)
    if v is None:
        return 0
    if not isinstance(v, int) or isinstance(v, bool):
        raise BadRequest(f"`{key}` must be an integer", param=key)
    return v


def _options(tools: list[dict[str, Any]] | None, obj: Mapping[str, Any], **extra: Any) -> ChatOptions:
    raw: dict[str, Any] = {"tools": tools, **extra}
    kwargs = obj.get("chat_template_kwargs")
    if kwargs is not None:
        raw["chat_template_kwargs"] = kwargs
    try:
        return msgspec.convert(raw, ChatOptions)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"Invalid request body: {exc}") from None


# ---- /v1/responses ---------------------------------------------------------------------------


def responses_form(body: bytes) -> ChatForm:
    obj = _object(body)
    inp = obj.get("input")
    if not isinstance(inp, (str, list)):
        raise BadRequest("`input` must be a string or a list of items", param="input")
    messages: list[dict[str, Any]] = []
    instructions = _opt_str(obj, "instructions")
    if instructions:
        messages.append({"role": "system", "content": instructions})
    if isinstance(inp, str):
        messages.append({"role": "user", "content": inp})
    else:
        for item in inp:
            if not isinstance(item, dict):
                raise BadRequest("`input` items must be objects", param="input")
            msg = _response_item(item, messages[-1] if messages else None)
            if msg is not None:
                messages.append(msg)
    tools = _response_tools(obj.get("tools"), obj.get("tool_choice"))
    reasoning = obj.get("reasoning")
    effort = reasoning.get("effort") if isinstance(reasoning, dict) else None
    return ChatForm(
        model=_opt_str(obj, "model"),
        messages=messages,
        options=_options(tools, obj, reasoning_effort=effort if isinstance(effort, str) else None),
        stream=obj.get("stream") is True,
        max_tokens=_opt_int(obj, "max_output_tokens"),
        cache_salt=_opt_str(obj, "cache_salt"),
        previous_response_id=_opt_str(obj, "previous_response_id"),
    )


def _prev_assistant(prev: dict[str, Any] | None) -> dict[str, Any] | None:
    return prev if prev is not None and prev.get("role") == "assistant" else None


def _response_item(item: dict[str, Any], prev: dict[str, Any] | None) -> dict[str, Any] | None:
    # one branch per item type of vLLM's _construct_message_from_response_item, in its order
    kind = item.get("type")
    asst = _prev_assistant(prev)
    if kind in ("function_call", "custom_tool_call"):
        name = str(item.get("name", ""))
        if kind == "function_call" and item.get("namespace"):
            name = f"{item['namespace']}.{name}"
        args = (
            item.get("arguments")
            if kind == "function_call"
            else json.dumps({"input": item.get("input") or ""})
        )
        call = {"id": item.get("call_id"), "function": {"name": name, "arguments": args}, "type": "function"}
        if asst is not None and isinstance(asst.get("tool_calls", []), list):
            asst.setdefault("tool_calls", []).append(call)
            return None
        return {"role": "assistant", "tool_calls": [call]}
    if kind == "reasoning":
        if item.get("encrypted_content"):
            raise BadRequest("Encrypted content is not supported.", param="input")
        content, summary = item.get("content") or [], item.get("summary") or []
        text = content[0].get("text", "") if content else summary[0].get("text", "") if summary else ""
        if asst is not None and asst.get("reasoning") is None:
            asst["reasoning"] = text
            return None
        return {"role": "assistant", "reasoning": text}
    if kind in ("function_call_output", "custom_tool_call_output"):
        return {"role": "tool", "content": item.get("output"), "tool_call_id": item.get("call_id")}
    if item.get("role") == "assistant":
        content = item.get("content")
        text = content if isinstance(content, str) else content[0].get("text") if content else None
        if text is not None:
            if asst is not None and asst.get("content") is None:
                asst["content"] = text
                return None
            return {"role": "assistant", "content": text}
    if "role" in item:
        return dict(item)
    raise BadRequest(f"Unsupported input item type: {kind}", param="input")


def _response_tools(tools: Any, choice: Any) -> list[dict[str, Any]] | None:
    """Function tools (and namespaced ones) in chat format; built-in tools do not reach the
    template. vLLM drops the list only for ``tool_choice="none"`` when configured to."""
    if not tools:
        return None
    if not isinstance(tools, list):
        raise BadRequest("`tools` must be a list", param="tools")
    out: list[dict[str, Any]] = []
    for tool in tools:
        if not isinstance(tool, dict):
            continue
        if tool.get("type") == "function":
            out.append(_chat_tool(tool, str(tool.get("name", ""))))
        elif tool.get("type") == "namespace":
            for inner in tool.get("tools") or []:
                if isinstance(inner, dict) and inner.get("type") == "function":
                    out.append(_chat_tool(inner, f"{tool.get('name')}.{inner.get('name')}"))
    return out or None


def _chat_tool(tool: Mapping[str, Any], name: str) -> dict[str, Any]:
    fn: dict[str, Any] = {
        "name": name,
        "description": tool.get("description"),
        "parameters": tool.get("parameters"),
    }
    if tool.get("strict") is not None:
        fn["strict"] = tool["strict"]
    return {"type": "function", "function": fn}


# ---- /v1/messages (Anthropic) ----------------------------------------------------------------


def anthropic_form(body: bytes) -> ChatForm:
    obj = _object(body)
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("`messages` must be a non-empty list", param="messages")
    out: list[dict[str, Any]] = []
    system = obj.get("system")
    parts: list[str] = []
    if isinstance(system, str) and system:
        parts.append(system)
    elif isinstance(system, list):
        parts.extend(_block_texts(system))
    if parts:
        out.append({"role": "system", "content": "".join(parts)})
    for i, msg in enumerate(msgs):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a string role", param="messages")
        _anthropic_message(msg, out)
    effort: str | None = None
    thinking = obj.get("thinking")
    output_config = obj.get("output_config")
    if isinstance(output_config, dict) and isinstance(output_config.get("effort"), str):
        effort = output_config["effort"]
    if isinstance(thinking, dict) and thinking.get("type") == "disabled":
        effort = "none"
    return ChatForm(
        model=_opt_str(obj, "model"),
        messages=out,
        options=_options(_anthropic_tools(obj.get("tools")), obj, reasoning_effort=effort),
        stream=obj.get("stream") is True,
        max_tokens=_opt_int(obj, "max_tokens"),
        cache_salt=_opt_str(obj, "cache_salt"),
    )


def _block_texts(blocks: list[Any]) -> list[str]:
    return [
        b["text"]
        for b in blocks
        if isinstance(b, dict)
        and b.get("type") == "text"
        and isinstance(b.get("text"), str)
        and b["text"]
        and not b["text"].startswith(_BILLING_HEADER)
    ]


def _image_url(source: Any) -> str:
    source = source if isinstance(source, dict) else {}
    if source.get("type") == "url":
        return str(source.get("url", ""))
    return f"data:{source.get('media_type', 'image/jpeg')};base64,{source.get('data', '')}"


def _anthropic_message(msg: dict[str, Any], out: list[dict[str, Any]]) -> None:  # noqa: C901
    # one piece: vLLM's _convert_messages + _convert_message_content + _convert_block, whose
    # side effects (tool messages appended before the message itself) depend on block order
    role = msg["role"]
    content = msg.get("content")
    if role == "system":
        texts = [content] if isinstance(content, str) else _block_texts(content or [])
        text = "".join(t for t in texts if not t.startswith(_BILLING_HEADER))
        if text:
            out.append({"role": "system", "content": text})
        return
    m: dict[str, Any] = {"role": role}
    if isinstance(content, str):
        m["content"] = content
        out.append(m)
        return
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    reasoning: list[str] = []
    for b in content if isinstance(content, list) else []:
        if not isinstance(b, dict):
            continue
        kind = b.get("type")
        if kind == "text" and b.get("text"):
            parts.append({"type": "text", "text": b["text"]})
        elif kind == "image" and b.get("source"):
            parts.append({"type": "image_url", "image_url": {"url": _image_url(b["source"])}})
        elif kind == "thinking" and b.get("thinking") is not None:
            reasoning.append(str(b["thinking"]))
        elif kind == "tool_use":
            fn = {"name": b.get("name") or "", "arguments": json.dumps(b.get("input") or {})}
            calls.append({"id": b.get("id") or "call_0", "type": "function", "function": fn})
        elif kind == "tool_result":
            if role == "user":
                _tool_result(b, out)
            else:
                parts.append({"type": "text", "text": f"Tool result: {b.get('content') or ''}"})
    if reasoning:
        m["reasoning"] = "".join(reasoning)
    if calls:
        m["tool_calls"] = calls
    if parts:
        m["content"] = parts[0]["text"] if len(parts) == 1 and parts[0]["type"] == "text" else parts
    if not (role == "user" and "content" not in m):
        out.append(m)


def _tool_result(block: Mapping[str, Any], out: list[dict[str, Any]]) -> None:
    content = block.get("content")
    text = ""
    images: list[str] = []
    refs: list[dict[str, Any]] = []
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        texts: list[str] = []
        for item in content:
            if not isinstance(item, dict):
                continue
            if item.get("type") == "text":
                texts.append(str(item.get("text", "")))
            elif item.get("type") == "image":
                images.append(_image_url(item.get("source", {})))
            elif item.get("type") == "tool_reference" and (name := item.get("tool_name") or item.get("name")):
                refs.append({"type": "tool_reference", "name": name})
        text = "\n".join(texts)
    call_id = block.get("tool_use_id") or ""
    out.append({"role": "tool", "tool_call_id": call_id, "content": text or ""})
    if images:
        out.append(
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}} for u in images]}
        )
    if refs:
        out.append({"role": "tool", "tool_call_id": call_id, "content": refs})


def _anthropic_tools(tools: Any) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise BadRequest("`tools` must be a list", param="tools")
    out = []
    for t in tools:
        if not isinstance(t, dict):
            continue
        fn: dict[str, Any] = {
            "name": t.get("name"),
            "description": t.get("description"),
            "parameters": t.get("input_schema"),
        }
        if t.get("strict") is not None:
            fn["strict"] = t["strict"]
        if t.get("defer_loading") is not None:
            fn["defer_loading"] = t["defer_loading"]
        out.append({"type": "function", "function": fn})
    return out
