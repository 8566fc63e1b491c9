"""Bounded work per request: prompts that cannot fit the model's context are refused before the
router parses them in full, tokenizes them or forwards them (issue 21, F3/F9).

The context length is vLLM's ``max_model_len`` from ``/v1/models`` (the replica monitor keeps
those cards). Three checks, cheapest first:

1. ``precheck`` (body length only, before decoding): a ``/v1/completions`` body larger than
   ``max_model_len * max_chars_per_token * 12`` bytes plus 1 MiB cannot hold a prompt that fits,
   whatever its form (a token id takes at least 2 bytes, a character at most 12 as JSON escapes);
   the largest context in the fleet applies, since the model is not known yet. A 32 MB prompt of
   16.7 M ids is refused in microseconds instead of blocking the loop for ~2 s.
2. ``check_tokens`` / ``check_text`` (after decoding, per prompt of a batch): vLLM's own 400
   (same message, ``type``, ``param`` and integer ``code``), without the engine round trip.
3. ``offload``: a body above ``offload_parse_bytes`` is decoded and hashed in a worker thread, so
   the event loop keeps serving other connections while it runs (when no context length is known
   yet, or for chat bodies).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import msgspec

from router.errors import BadRequest

_SLACK_BYTES = 1 << 20  # other fields of the body: sampling parameters, logit_bias, ...
_JSON_BYTES_PER_CHAR = 12  # a code point outside the BMP as two \uXXXX escapes
_REFRESH_S = 2.0


class _VllmErrorInfo(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: int


class _VllmError(msgspec.Struct):
    error: _VllmErrorInfo


_enc = msgspec.json.Encoder()


class ContextLengthExceeded(BadRequest):
    """vLLM's 400 for a prompt longer than ``max_model_len``, shaped as vLLM shapes it
    (``VLLMValidationError`` through ``create_error_response``)."""

    def __init__(self, message: str, param: str, value: int) -> None:
        super().__init__(f"{message} (parameter={param}, value={value})", param=param)

    def body(self) -> bytes:
        return _enc.encode(_VllmError(_VllmErrorInfo(self.message, "BadRequestError", self.param, 400)))


def token_error(max_len: int, count: int) -> ContextLengthExceeded:
    return ContextLengthExceeded(
        f"This model's maximum context length is {max_len} tokens. However, your prompt contains "
        f"{count} input tokens, which exceeds this limit even without any output tokens. "
        "Please reduce the length of the input prompt.",
        "input_tokens",
        count,
    )


def text_error(max_len: int, chars: int, max_chars: int) -> ContextLengthExceeded:
    return ContextLengthExceeded(
        f"This model's maximum context length is {max_len} tokens. However, your prompt contains "
        f"{chars} characters (more than {max_chars} characters, which is the upper bound for "
        f"{max_len} input tokens). Please reduce the length of the input prompt.",
        "input_text",
        chars,
    )


class ContextLimits:
    """``max_model_len`` per model, read from the monitor's model cards at most every 2 s."""

    def __init__(
        self,
        cards: Callable[[], Iterable[Mapping[str, Any]]],
        *,
        max_chars_per_token: int,
        offload_parse_bytes: int,
    ) -> None:
        self._cards = cards
        self.max_chars_per_token = max_chars_per_token
        self.offload_parse_bytes = offload_parse_bytes
        self._by_model: dict[str, int] = {}
        self._largest: int | None = None
        self._stamp = -_REFRESH_S

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._stamp < _REFRESH_S:
            return
        self._stamp = now
        by_model: dict[str, int] = {}
        for card in self._cards():
            n = card.get("max_model_len")
            if type(n) is int and n > 0:
                by_model[str(card.get("id"))] = n
        self._by_model = by_model
        self._largest = max(by_model.values()) if by_model else None

    def max_len(self, model: str | None) -> int | None:
        self._refresh()
        if model:
            return self._by_model.get(model)  # an unknown model is a 404 further on, not a 400
        return self._largest if len(self._by_model) == 1 else None  # no model: the one served

    def precheck(self, path: str, body: bytes) -> None:
        """Refuse a completions body that cannot hold a prompt that fits, without decoding it:
        by its length, and for a large body whose prompt is a token-id list by counting the
        list's commas (C speed: ~10 ms for 32 MB)."""
        if path != "/v1/completions" or len(body) <= min(_SLACK_BYTES, self.offload_parse_bytes):
            return  # chat bodies carry media and tools: no byte bound that is safe
        self._refresh()
        largest = self._largest
        if largest is None:
            return
        n = len(body)
        if n > self.offload_parse_bytes:
            ids = _token_id_count(body)
            if ids is not None and ids > largest:
                raise token_error(largest, ids)
        limit = largest * self.max_chars_per_token * _JSON_BYTES_PER_CHAR + _SLACK_BYTES
        if n > limit:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {largest} tokens. However, your request "
                f"body has {n} bytes (more than {limit} bytes, which is the upper bound for "
                f"a prompt of {largest} input tokens). Please reduce the length of the input prompt.",
                "input_text",
                n,
            )

    def check_prompt(self, model: str | None, prompt: object) -> None:
        """Each prompt of a (batch) completion request against the model's context."""
        max_len = self.max_len(model)
        if max_len is None:
            return
        if isinstance(prompt, str):
            self.check_text(max_len, prompt)
        elif isinstance(prompt, list) and prompt:
            first = prompt[0]
            if isinstance(first, int):
                if len(prompt) > max_len:
                    raise token_error(max_len, len(prompt))
            else:
                for p in prompt:
                    if isinstance(p, str):
                        self.check_text(max_len, p)
                    elif isinstance(p, list) and len(p) > max_len:
                        raise token_error(max_len, len(p))

    def check_text(self, max_len: int, text: str) -> None:
        max_chars = max_len * self.max_chars_per_token
        if len(text) > max_chars:
            raise text_error(max_len, len(text), max_chars)

    def check_tokens(self, model: str | None, count: int) -> None:
        max_len = self.max_len(model)
        if max_len is not None and count > max_len:
            raise token_error(max_len, count)


_PROMPT_KEY = b'"prompt"'
_NUMBER_START = frozenset(b"0123456789-")


def _token_id_count(body: bytes) -> int | None:
    """How many ids a top-level ``"prompt": [1, 2, ...]`` list holds, from its commas, or None
    when the prompt is not a flat list of numbers (then the decoder judges it)."""
    at = body.find(_PROMPT_KEY)
    if at < 0:
        return None
    i = at + len(_PROMPT_KEY)
    head = body[i : i + 64].lstrip()
    if not head.startswith(b":"):
        return None
    head = head[1:].lstrip()
    if not head.startswith(b"["):
        return None
    first = head[1:].lstrip()[:1]
    if not first or first[0] not in _NUMBER_START:
        return None
    start = body.find(b"[", i)
    end = body.find(b"]", start)
    if end < 0:
        return None
    return body.count(b",", start, end) + 1
