"""vLLM 0.32's OpenAI response shapes: completions and chat (unary and SSE chunks), usage, errors."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

import msgspec
from aiohttp import web

from .streams import Delta, Track
from .tokenizer import Tokenizer

json_encoder = msgspec.json.Encoder()


class HTTPError(Exception):
    """An OpenAI-style error response: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type_: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.status = status
        self.type = type_
        self.param = param

    def response(self) -> web.Response:
        return error_response(self.status, str(self), self.type, self.param)


def error_response(status: int, message: str, type_: str, param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": status}}
    return web.Response(status=status, body=json_encoder.encode(body), content_type="application/json")


# Stands for the text in a chunk template; no real text contains NULs.
_TEXT_SLOT = "\x00kvrouter-sim-text\x00"
_TEXT_SLOT_JSON = json_encoder.encode(_TEXT_SLOT)


class ResponseFormatter:
    """OpenAI response/chunk shapes of vLLM 0.32 for one HTTP request (all its prompts)."""

    def __init__(self, model: str, chat: bool, n_prompts: int, tokenizer: Tokenizer) -> None:
        self.model = model
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.tok = tokenizer
        self.ids: list[list[int]] = [[] for _ in range(n_prompts)]
        self.reasons: list[str | None] = [None] * n_prompts
        self.role_sent = [False] * n_prompts
        self._templates: dict[tuple[int, str | None, bool], tuple[bytes, bytes]] = {}

    def add(self, d: Delta) -> None:
        self.ids[d.index].extend(d.token_ids)
        if d.finish_reason is not None:
            self.reasons[d.index] = d.finish_reason

    def _base(self) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunks(self, d: Delta, include_usage: bool) -> list[dict[str, Any]]:
        """The chunk objects for one delta (the reference shape; ``sse_chunks`` sends them)."""
        self.add(d)
        role = self.chat and not self.role_sent[d.index]
        self.role_sent[d.index] = True
        return self._chunk_dicts(d.index, self.tok.decode(d.token_ids), d.finish_reason, include_usage, role)

    def _chunk_dicts(
        self, index: int, text: str, finish_reason: str | None, include_usage: bool, role: bool
    ) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self.chat:
            if role:
                first = self._base()
                first["choices"] = [
                    {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}
                ]  # fmt: skip
                out.append(first)
            choice: dict[str, Any] = {
                "index": index,
                "delta": {"content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        else:
            choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
        if finish_reason is not None:
            choice["stop_reason"] = None
        c = self._base()
        c["choices"] = [choice]
        out.append(c)
        if include_usage:
            for chunk in out:
                chunk["usage"] = None
        return out

    def sse_chunks(self, d: Delta, include_usage: bool) -> list[bytes]:
        """``chunks(d)`` as SSE events (``data: <json>\\n\\n``), byte for byte, from templates:
        per (index, finish_reason, include_usage) the JSON around the text is encoded once, so
        a token costs one string encode instead of building and encoding four dicts."""
        self.add(d)
        text = self.tok.decode(d.token_ids)
        out: list[bytes] = []
        if self.chat and not self.role_sent[d.index]:
            self.role_sent[d.index] = True
            role = self._chunk_dicts(d.index, "", None, include_usage, True)[0]
            out.append(b"data: " + json_encoder.encode(role) + b"\n\n")
        key = (d.index, d.finish_reason, include_usage)
        tpl = self._templates.get(key)
        if tpl is None:
            (c,) = self._chunk_dicts(d.index, _TEXT_SLOT, d.finish_reason, include_usage, False)
            head, tail = json_encoder.encode(c).split(_TEXT_SLOT_JSON)
            tpl = self._templates[key] = (b"data: " + head, tail + b"\n\n")
        out.append(tpl[0] + json_encoder.encode(text) + tpl[1])
        return out

    def usage(self, tracks: Sequence[Track]) -> dict[str, Any]:
        prompt = sum(t.prompt_len for t in tracks)
        completion = sum(len(x) for x in self.ids)
        return {
            "prompt_tokens": prompt,
            "total_tokens": prompt + completion,
            "completion_tokens": completion,
            "prompt_tokens_details": {"cached_tokens": sum(t.cached_tokens for t in tracks)},
        }

    def usage_chunk(self, tracks: Sequence[Track]) -> dict[str, Any]:
        c = self._base()
        c["choices"] = []
        c["usage"] = self.usage(tracks)
        return c

    def final(self, tracks: Sequence[Track]) -> dict[str, Any]:
        choices: list[dict[str, Any]] = []
        for i, ids in enumerate(self.ids):
            text = self.tok.decode(ids)
            if self.chat:
                choices.append(
                    {
                        "index": i,
                        "message": {
                            "role": "assistant",
                            "content": text,
                            "reasoning_content": None,
                            "tool_calls": [],
                        },
                        "logprobs": None,
                        "finish_reason": self.reasons[i],
                        "stop_reason": None,
                    }
                )
            else:
                choices.append(
                    {
                        "index": i,
                        "text": text,
                        "logprobs": None,
                        "finish_reason": self.reasons[i],
                        "stop_reason": None,
                        "prompt_logprobs": None,
                    }
                )
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.usage(tracks),
            "system_fingerprint": None,
            "service_tier": None,
            "kv_transfer_params": None,
        }
