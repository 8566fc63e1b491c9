"""Speculative prefill (Dynamo ``nvext.agent_hints.speculative_prefill``): after an agent's turn
ends, warm its next turn's prefix (the history plus the answer just given) with a one-token
request, so the next turn's TTFT does not pay for the answer's tokens during the tool pause.

Off unless the request asks for it. The answer is captured from the response the client got
(``SessionSink`` keeps at most ``MAX_CAPTURE`` bytes of it), its text content only (reasoning is
left out, as Dynamo strips thinking). The warm-up is routed as the session's next turn (its home,
unless overloaded), outside the admission queue, and its response is discarded. Chat requests and
text-prompt completions are warmed; a token-id prompt is not (the answer's token ids are not in
the response).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import msgspec

from router.http.proxy import Headers
from router.replicas.registry import Replica
from router.routing import Router
from router.types import RequestInfo

log = logging.getLogger("kvrouter.sessions")
MAX_CAPTURE = 1 << 20  # bytes of a response kept for its answer text
_decode = msgspec.json.Decoder(dict[str, Any])
_encode = msgspec.json.Encoder()
_tasks: set[asyncio.Task[None]] = set()  # warm-ups in flight (a reference, so none is collected)


def answer_text(raw: bytes, chat: bool) -> str | None:
    """The assistant's text in a JSON or SSE OpenAI response, or None if there is none."""
    parts: list[str] = []
    payloads = (
        [line[5:].strip() for line in raw.split(b"\n") if line.startswith(b"data:")]
        if raw.lstrip().startswith(b"data:")
        else [raw]
    )
    for p in payloads:
        if not p or p == b"[DONE]":
            continue
        try:
            obj = _decode.decode(p)
        except msgspec.DecodeError:
            continue
        for c in obj.get("choices") or ():
            if not isinstance(c, dict) or c.get("index", 0) != 0:
                continue
            if chat:
                msg = c.get("message") or c.get("delta") or {}
                text = msg.get("content") if isinstance(msg, dict) else None
            else:
                text = c.get("text")
            if isinstance(text, str):
                parts.append(text)
    return "".join(parts) if parts else None


def warm_body(body: dict[str, Any], answer: str, chat: bool, strip: tuple[str, ...]) -> bytes | None:
    """The next turn's prefix as a one-token request, or None when it cannot be built."""
    obj = {k: v for k, v in body.items() if k not in strip}
    for k in ("stream", "stream_options", "n", "logprobs", "top_logprobs", "max_completion_tokens"):
        obj.pop(k, None)
    if chat:
        msgs = obj.get("messages")
        if not isinstance(msgs, list):
            return None
        obj["messages"] = [*msgs, {"role": "assistant", "content": answer}]
    else:
        prompt = obj.get("prompt")
        if not isinstance(prompt, str):
            return None
        obj["prompt"] = prompt + answer
    obj["max_tokens"] = 1
    return _encode.encode(obj)


class _Discard:
    """A ResponseSink that drops the warm-up's answer."""

    async def start(self, status: int, reason: bytes, headers: Headers, length: int | None) -> None:
        return None

    async def write(self, data: bytes) -> None:
        return None

    async def finish(self) -> None:
        return None

    def abort(self) -> None:
        return None


Forward = Callable[..., Any]


def schedule_warmup(
    router: Router,
    forward: Forward,
    info: Callable[[Router, bytes], RequestInfo],
    target: bytes,
    headers: bytes,
    body: bytes,
    session_id: str,
    body_for: Callable[[Replica], bytes] | None = None,
) -> None:
    """Send the warm-up in the background (the client's response is already complete)."""

    async def run() -> None:
        try:
            req = info(router, body)
            req.session_id = session_id
            await forward(_Discard(), "POST", target, headers, body, req, body_for=body_for)
        except Exception as exc:  # a failed warm-up costs the next turn its head start, nothing else
            log.debug("speculative prefill for session %s failed: %s", session_id, exc)

    task = asyncio.get_running_loop().create_task(run())
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
