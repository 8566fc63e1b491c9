"""Session keys and agent hints as clients already send them, and the body the engine gets.

Session key, first match (pd-agentic-failures.md §2 has each peer's contract):

1. the configured header (``sessions.header``), then ``x-session-id`` (vllm-router, AIBrix),
   ``x-smg-routing-key`` (SGLang gateway), ``x-session-token`` (llm-d; kvrouter sets it on its
   responses so a client can echo it);
2. Dynamo's ``nvext.session_control.session_id`` (``action: "close"`` releases the session);
3. the configured body field (``sessions.body_field``, e.g. ``user`` or ``session_id``).

Agent hints: Dynamo ``nvext.agent_hints {priority, osl, speculative_prefill}`` and vLLM's own
top-level ``priority``. Priorities are kept in vLLM's convention (smaller runs first); Dynamo's is
the opposite (higher = more important), so its value is negated.

The engine never sees what it would reject: ``nvext`` is removed, the configured body field too
(unless it is an OpenAI field, ``user``), and ``priority`` is sent only to a replica that runs
priority scheduling (vLLM answers 400 to a non-zero ``priority`` otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from ..errors import BadRequest

STANDARD_HEADERS: tuple[bytes, ...] = (b"x-session-id", b"x-smg-routing-key", b"x-session-token")
MAX_KEY_BYTES = 256  # AIBrix's limit: a key is an id, not a payload
OPENAI_FIELDS = frozenset({"user"})  # body fields the engine accepts: used as keys, never stripped
_decode = msgspec.json.Decoder(dict[str, Any])
_encode = msgspec.json.Encoder()


@dataclass(slots=True)
class SessionHints:
    session_id: str | None = None
    source: str = ""  # where the key came from: a header name, "nvext", or the body field
    action: str | None = None  # "open" | "close" (Dynamo session_control)
    priority: int | None = None  # vLLM convention: smaller runs first
    osl: int | None = None  # expected output tokens
    speculative_prefill: bool = False
    strip: tuple[str, ...] = ()  # top-level body fields the engine must not get
    body: dict[str, Any] | None = None  # the decoded body, when a hint needed it


def _header_value(headers: bytes, name: bytes) -> str | None:
    """Value of header ``name`` (lower-case) in ``Name: value\\r\\n`` lines, or None."""
    low = headers.lower()
    i = low.find(name + b":")
    while i > 0 and low[i - 1 : i] != b"\n":
        i = low.find(name + b":", i + 1)
    if i < 0:
        return None
    end = headers.find(b"\r\n", i)
    raw = headers[i + len(name) + 1 : end if end >= 0 else len(headers)].strip()
    return raw.decode("latin-1") if raw else None


def _key(value: object, where: str) -> str:
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise BadRequest(f"{where} must be a string", param=where)
    key = str(value)
    if len(key.encode()) > MAX_KEY_BYTES:
        raise BadRequest(f"{where} is longer than {MAX_KEY_BYTES} bytes", param=where)
    return key


def _int(value: object, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest(f"{where} must be an integer", param=where)
    return value


# One pass over every place a client can put a key or a hint: splitting it would only scatter
# the precedence order, which is the point of this function.
def extract_hints(  # noqa: C901
    headers: bytes, body: bytes, *, header: str = "", body_field: str = ""
) -> SessionHints:
    """The session key and hints of one request (headers as ``Name: value\\r\\n`` lines)."""
    hints = SessionHints()
    low = headers.lower()
    names = ((header.lower().encode(),) if header else ()) + STANDARD_HEADERS
    # find, not ``in``: on CPython 3.11 ``bytes in bytes`` raises and clears a TypeError first
    # (it tries the needle as an integer), which costs more than the search on this hot path.
    if (
        low.find(b"x-session") >= 0
        or low.find(b"x-smg") >= 0
        or (header and low.find(header.lower().encode()) >= 0)
    ):
        for name in names:
            v = _header_value(headers, name)
            if v is not None:
                hints.session_id = _key(v, name.decode())
                hints.source = name.decode()
                break
    want_field = bool(body_field) and body.find(f'"{body_field}"'.encode()) >= 0
    if body.find(b'"nvext"') < 0 and body.find(b'"priority"') < 0 and not want_field:
        return hints
    try:
        obj = _decode.decode(body)
    except msgspec.DecodeError:
        return hints  # the request parser answers the 400
    hints.body = obj
    strip: list[str] = []
    nv = obj.get("nvext")
    if nv is not None:
        strip.append("nvext")
        if not isinstance(nv, dict):
            raise BadRequest("nvext must be an object", param="nvext")
        sc = nv.get("session_control")
        if isinstance(sc, dict):
            if hints.session_id is None and sc.get("session_id") is not None:
                hints.session_id = _key(sc["session_id"], "nvext.session_control.session_id")
                hints.source = "nvext"
            action = sc.get("action")
            if action is not None:
                if action not in ("open", "close"):
                    raise BadRequest("nvext.session_control.action must be open or close", param="nvext")
                hints.action = action
        ah = nv.get("agent_hints")
        if isinstance(ah, dict):
            if ah.get("priority") is not None:
                hints.priority = -_int(ah["priority"], "nvext.agent_hints.priority")  # Dynamo: higher first
            if ah.get("osl") is not None:
                hints.osl = max(0, _int(ah["osl"], "nvext.agent_hints.osl"))
            hints.speculative_prefill = ah.get("speculative_prefill") is True
    if "priority" in obj:
        strip.append("priority")  # re-added per replica (rewrite_body)
        if obj["priority"] is not None:
            hints.priority = _int(obj["priority"], "priority")
    if want_field and body_field in obj:
        if hints.session_id is None and obj[body_field] is not None:
            hints.session_id = _key(obj[body_field], body_field)
            hints.source = body_field
        if body_field not in OPENAI_FIELDS:
            strip.append(body_field)
    hints.strip = tuple(strip)
    return hints


def rewrite_body(body: bytes, hints: SessionHints, *, priority_scheduling: bool) -> bytes:
    """The body for one replica: stripped fields gone, ``priority`` only where it is scheduled."""
    send_priority = priority_scheduling and hints.priority is not None
    if not hints.strip and not send_priority:
        return body
    obj = dict(hints.body) if hints.body is not None else _decode.decode(body)
    for f in hints.strip:
        obj.pop(f, None)
    if send_priority:
        obj["priority"] = hints.priority
    return _encode.encode(obj)
