"""vLLM 0.32's message normalisation, reproduced rule by rule so the router renders the same text.

vLLM does not hand the OpenAI messages to the chat template as they arrive
(``vllm/renderers/chat_utils.py``: ``_parse_chat_message_content``, ``_postprocess_messages``;
``vllm/renderers/hf.py``: ``_detect_content_format``, ``_convert_developer_to_system``,
``_consolidate_system_messages``). Each rule below names the behaviour it matches:

* content: ``None`` is no parts, a string is one text part; a list is parsed part by part;
* the template's *content format* decides what the parts become: "string" templates get the texts
  joined with ``"\\n"``, "openai" templates (those that loop over ``message.content``) get
  ``{"type": "text", "text": ...}`` dicts and ``{"type": <modality>}`` for media;
* system messages lose a leading Claude Code ``x-anthropic-billing-header`` line;
* only the keys vLLM keeps survive: ``role``, ``content``, assistant ``tool_calls``, ``reasoning``
  (also copied to ``reasoning_content``), tool ``tool_call_id``, ``name``, ``task``, developer
  ``tools``; tool messages given as text parts are joined even for "openai" templates;
* assistant ``tool_calls[].function.arguments``: a JSON string is decoded to an object; empty,
  invalid JSON or non-objects become ``{}``; an empty ``tool_calls`` list is dropped; tool calls and
  developer ``tools`` list the fields of OpenAI's TypedDicts first, in their order (vLLM validates
  messages against them);
* ``developer`` becomes ``system`` when the template never names the developer role, and then all
  system messages are merged (``"\\n\\n"``) into one at position 0.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

from .errors import BadRequest

ContentFormat = Literal["string", "openai"]

# part type -> the key holding its text (vLLM's TEXT_PART_TYPES)
_TEXT_KEYS = {
    "text": "text",
    "input_text": "text",
    "output_text": "text",
    "refusal": "refusal",
    "thinking": "thinking",
}
_SKIP_IF_EMPTY = ("text", "refusal")
# part type -> modality, for parts that carry media (vLLM's MM_PARSER_MAP minus the text types)
_MEDIA = {
    "image_url": "image",
    "input_image": "image",
    "image_pil": "image",
    "image_embeds": "image",
    "audio_url": "audio",
    "input_audio": "audio",
    "audio_embeds": "audio",
    "video_url": "video",
    "video_embeds": "video",
}
# the fields of OpenAI's and vLLM's content-part types: any other key of a part is an "extra field"
# that vLLM copies into the part handed to an "openai"-format template
_KNOWN_PART_FIELDS = frozenset(
    {
        "type", "text", "image_url", "input_audio", "audio_url", "video_url", "refusal", "thinking", "closed",
        "signature", "uuid", "image_pil", "image_embeds", "audio_embeds", "video_embeds", "data", "file",
        "name", "detail", "url", "format",
    }
)  # fmt: skip
_BILLING_HEADER = "x-anthropic-billing-header"


class MediaNotModeled(LookupError):
    """A media part under a "string" template: vLLM inserts model-specific placeholder tokens the
    router cannot reproduce, so the request is keyed without the template (never as text)."""


def normalise_messages(
    messages: Sequence[Mapping[str, Any]], content_format: ContentFormat
) -> list[dict[str, Any]]:
    """The conversation vLLM hands to the template (before the developer-role rewrite)."""
    out = [_message(i, m, content_format) for i, m in enumerate(messages)]
    for m in out:
        _decode_tool_calls(m)
    return out


# Over the complexity limit on purpose: one pass of vLLM's per-message rules, in vLLM's order.
def _message(i: int, message: Mapping[str, Any], fmt: ContentFormat) -> dict[str, Any]:  # noqa: C901
    role = message.get("role")
    if not isinstance(role, str):
        raise BadRequest(f"messages[{i}].role must be a string", param="messages")
    content = message.get("content")
    parts: list[Any]
    if content is None:
        parts = []
    elif isinstance(content, str):
        parts = [{"type": "text", "text": content}]
    elif isinstance(content, list):
        parts = content
    else:
        raise BadRequest(f"messages[{i}].content must be a string, a list of parts or null", param="messages")
    if role == "system":
        parts = _strip_billing_header(parts)
    items = [p for p in (_part(i, p, fmt) for p in parts) if p is not None]
    out: dict[str, Any] = {"role": role, "content": items if fmt == "openai" else "\n".join(items)}
    if role == "assistant":
        if message.get("tool_calls") is not None:
            calls = message["tool_calls"]
            if not isinstance(calls, list):
                raise BadRequest(f"messages[{i}].tool_calls must be a list", param="messages")
            out["tool_calls"] = list(calls)
        reasoning = message.get("reasoning")
        if reasoning is not None:
            out["reasoning"] = reasoning
            out["reasoning_content"] = reasoning
    elif role == "tool":
        if "tool_call_id" in message:
            out["tool_call_id"] = message["tool_call_id"]
        if isinstance(out["content"], list) and all(
            isinstance(p, dict) and p.get("type") == "text" for p in out["content"]
        ):
            out["content"] = "\n".join(str(p.get("text", "")) for p in out["content"])
    if isinstance(message.get("name"), str):
        out["name"] = message["name"]
    if isinstance(message.get("task"), str):
        out["task"] = message["task"]
    if role == "developer":
        out["tools"] = _developer_tools(message.get("tools"))
    return out


def _strip_billing_header(parts: list[Any]) -> list[Any]:
    """Claude Code's attribution line carries a per-request value: vLLM drops it from system text."""
    out: list[Any] = []
    for part in parts:
        text = part if isinstance(part, str) else part.get("text") if isinstance(part, dict) else None
        if isinstance(part, dict) and part.get("type") != "text":
            text = None
        if not (isinstance(text, str) and text.startswith(_BILLING_HEADER)):
            out.append(part)
            continue
        rest = text.partition("\n")[2]
        if rest:
            out.append(rest if isinstance(part, str) else {**part, "text": rest})
    return out


def _part(i: int, part: Any, fmt: ContentFormat) -> Any:
    """One content part as vLLM passes it on: a string ("string" format), a dict ("openai"), or
    None when vLLM skips it."""
    if isinstance(part, str):
        return {"type": "text", "text": part} if fmt == "openai" else part
    if not isinstance(part, dict):
        raise BadRequest(f"messages[{i}].content parts must be objects or strings", param="messages")
    ptype = part.get("type")
    if ptype is None or part.get("uuid") is not None:
        if any(k in part for k in _MEDIA):
            return _media(part, next(_MEDIA[k] for k in _MEDIA if k in part), fmt)
        if "tool_reference" in part:
            return _tool_reference(part, fmt)
        raise BadRequest("Missing 'type' field in multimodal part.", param="type")
    if not isinstance(ptype, str):
        raise BadRequest("Invalid 'type' field in multimodal part.", param="type")
    if ptype in _TEXT_KEYS:
        text = part.get(_TEXT_KEYS[ptype])
        if text is None and ptype in _SKIP_IF_EMPTY:
            return None
        if not isinstance(text, str):
            raise BadRequest(f"messages[{i}]: a '{ptype}' part needs a string", param="messages")
        if fmt == "openai":
            return {"type": "text", "text": text, **_extra_fields(part)}
        return text
    if ptype in _MEDIA:
        return _media(part, _MEDIA[ptype], fmt)
    if ptype == "tool_reference":
        return _tool_reference(part, fmt)
    raise BadRequest(f"Unsupported chat content part type: {ptype!r}.", param="type")


def _media(part: Mapping[str, Any], modality: str, fmt: ContentFormat) -> dict[str, Any]:
    if fmt == "string":
        raise MediaNotModeled(modality)
    return {"type": modality, **_extra_fields(part)}


def _tool_reference(part: Mapping[str, Any], fmt: ContentFormat) -> Any:
    name = part.get("name")
    return {"type": "tool_reference", "name": name} if fmt == "openai" else name


def _extra_fields(part: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in part.items() if k not in _KNOWN_PART_FIELDS}


def _decode_tool_calls(message: dict[str, Any]) -> None:
    """Templates expect ``arguments`` as an object (transformers' convention); vLLM decodes the
    OpenAI JSON string and keeps the conversation going when it is malformed."""
    if message["role"] != "assistant" or not isinstance(message.get("tool_calls"), list):
        return
    calls = message["tool_calls"]
    if not calls:
        del message["tool_calls"]
        return
    decoded = []
    for call in calls:
        if not isinstance(call, dict):
            raise BadRequest("assistant tool_calls entries must be objects.", param="tool_calls")
        function = call.get("function")
        if call.get("type", "function") != "function" or not isinstance(function, dict):
            raise BadRequest(
                "chat completions only support assistant tool_calls of type 'function'.", param="tool_calls"
            )
        fn = _typed_dict(
            {**function, "arguments": _arguments(function.get("arguments"))}, ("arguments", "name")
        )
        decoded.append(_typed_dict({**call, "function": fn}, ("id", "function", "type")))
    message["tool_calls"] = decoded


def _typed_dict(d: Mapping[str, Any], fields: Sequence[str]) -> dict[str, Any]:
    """vLLM validates messages against OpenAI's TypedDicts: their fields come first, in declaration
    order, then any other keys as given (visible to templates that ``tojson`` a whole tool call)."""
    return {**{k: d[k] for k in fields if k in d}, **{k: v for k, v in d.items() if k not in fields}}


def _developer_tools(tools: Any) -> Any:
    if not isinstance(tools, list):
        return tools
    out = []
    for t in tools:
        if isinstance(t, dict) and isinstance(t.get("function"), dict):
            fn = _typed_dict(t["function"], ("name", "description", "parameters", "strict"))
            t = _typed_dict({**t, "function": fn}, ("function", "type"))
        out.append(t)
    return out


def _arguments(raw: Any) -> Any:
    if not raw:
        return {}
    if isinstance(raw, dict):
        return raw
    parsed = raw
    if isinstance(raw, str):
        try:
            parsed = json.loads(raw)
        except ValueError:
            return {}
    return parsed if isinstance(parsed, dict) else {}


def apply_developer_role(conversation: list[dict[str, Any]], template: str) -> list[dict[str, Any]]:
    """vLLM's rewrite for templates that never name the developer role."""
    if not any(m["role"] == "developer" for m in conversation):
        return conversation
    if '"developer"' in template or "'developer'" in template:
        return conversation
    converted = []
    for m in conversation:
        if m["role"] == "developer":
            m = {k: v for k, v in m.items() if k != "tools"}
            m["role"] = "system"
        converted.append(m)
    texts: list[str] = []
    rest: list[dict[str, Any]] = []
    merge = False
    for i, m in enumerate(converted):
        if m["role"] != "system":
            rest.append(m)
            continue
        merge = merge or i > 0 or bool(texts)
        content = m.get("content", "")
        if isinstance(content, list):
            content = "\n".join(
                p["text"] if isinstance(p, dict) else p
                for p in content
                if (isinstance(p, dict) and "text" in p) or isinstance(p, str)
            )
        if content:
            texts.append(content)
    if not merge:
        return converted
    return [{"role": "system", "content": "\n\n".join(texts)}, *rest]


# ---- content format: does the template loop over a message's content? ------------------------


def detect_content_format(template: str, env: Any) -> ContentFormat:
    """vLLM's auto-detection: "openai" when the template iterates over ``message['content']`` (or
    a variable holding it), else "string"; a template that does not parse counts as "string"."""
    from jinja2 import nodes

    try:
        ast = env.parse(template)
    except Exception:
        return "string"
    return "openai" if next(_content_loops(ast, nodes), None) is not None else "string"


def _access(node: Any, name: str, key: str | None, nodes: Any) -> bool:
    """``name`` / ``name.key`` / ``name['key']``, possibly under filters, tests and slices."""
    while True:
        if (
            (isinstance(node, nodes.Filter) and node.node is not None)
            or isinstance(node, nodes.Test)
            or (isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice))
        ):
            node = node.node
        else:
            break
    if key is None:
        return isinstance(node, nodes.Name) and node.ctx == "load" and node.name == name
    if isinstance(node, nodes.Getitem):
        return (
            _access(node.node, name, None, nodes)
            and isinstance(node.arg, nodes.Const)
            and node.arg.value == key
        )
    if isinstance(node, nodes.Getattr):
        return _access(node.node, name, None, nodes) and node.attr == key
    return False


def _message_vars(ast: Any, nodes: Any) -> list[str]:
    names = ["messages"]
    queue = ["messages"]
    while queue:
        current = queue.pop(0)
        for assign in ast.find_all(nodes.Assign):
            if _access(assign.node, current, None, nodes) and isinstance(assign.target, nodes.Name):
                names.append(assign.target.name)
                if assign.target.name != current:
                    queue.append(assign.target.name)
    loop_vars = []
    for loop in ast.find_all(nodes.For):
        if any(_access(loop.iter, n, None, nodes) for n in names) and isinstance(loop.target, nodes.Name):
            loop_vars.append(loop.target.name)
    return loop_vars


def _content_loops(ast: Any, nodes: Any) -> Iterator[Any]:
    msg_vars = _message_vars(ast, nodes)
    in_macro: set[int] = set()
    macro_params: dict[int, set[str]] = {}
    for macro in ast.find_all(nodes.Macro):
        arg_names = [a.name for a in macro.args]
        bound: set[str] = set()
        for call in ast.find_all(nodes.Call):
            if not (isinstance(call.node, nodes.Name) and call.node.name == macro.name):
                continue
            for j, arg in enumerate(call.args):
                if j < len(arg_names) and any(_access(arg, v, "content", nodes) for v in msg_vars):
                    bound.add(arg_names[j])
            for kw in call.kwargs:
                if kw.key in arg_names and any(_access(kw.value, v, "content", nodes) for v in msg_vars):
                    bound.add(kw.key)
        for loop in macro.find_all(nodes.For):
            in_macro.add(id(loop))
            if bound:
                macro_params[id(loop)] = bound
    for loop in ast.find_all(nodes.For):
        it = loop.iter
        if (
            any(_access(it, v, "content", nodes) for v in msg_vars)
            or (isinstance(it, nodes.Name) and it.name in macro_params.get(id(loop), ()))
            or (id(loop) not in in_macro and isinstance(it, nodes.Name) and it.name == "content")
        ):
            yield loop
