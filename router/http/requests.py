"""Typed views of OpenAI request bodies: decode only what routing needs, keep the original bytes.

msgspec validates types in C while decoding; anything else in the body is ignored here and
forwarded untouched. Errors become 400s naming the offending field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from router.errors import BadRequest


class CompletionView(msgspec.Struct):
    # vLLM 0.32: ``model`` is optional (the server's first served name) and ``prompt_embeds`` may
    # replace ``prompt``; the router serves what the engine serves (audit #4, #5).
    model: str | None = None
    prompt: str | list[Any] | None = None
    prompt_embeds: Any = None
    stream: bool = False
    max_tokens: int | None = None
    cache_salt: str | None = None
    user: str | None = None
    # fields that change which prefix vLLM caches or reads (audit #6-#8)
    add_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None
    prompt_logprobs: int | None = None
    echo: bool = False
    logprobs: int | None = None

    @property
    def skips_cache_read(self) -> bool:
        """vLLM skips reading the prefix cache for prompt logprobs (sampling_params.py:622);
        completions ask for them with ``prompt_logprobs`` or ``echo`` + ``logprobs``."""
        return self.prompt_logprobs is not None or (self.echo and self.logprobs is not None)


class ChatView(msgspec.Struct):
    messages: list[dict[str, Any]]
    model: str | None = None
    stream: bool = False
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    cache_salt: str | None = None
    user: str | None = None
    prompt_logprobs: int | None = None


class TokenGenerateView(msgspec.Struct):
    """``/inference/v1/generate``: vLLM's token-in/token-out generate request."""

    token_ids: list[int]
    model: str | None = None
    sampling_params: Any = None
    stream: bool | None = False
    cache_salt: str | None = None
    features: Any = None
    content_parts: Any = None


class ModelOnlyView(msgspec.Struct):
    model: str | None = None


_completion = msgspec.json.Decoder(CompletionView)
_chat = msgspec.json.Decoder(ChatView)
_model_only = msgspec.json.Decoder(ModelOnlyView)
_token_generate = msgspec.json.Decoder(TokenGenerateView)


def _bad(exc: msgspec.DecodeError) -> BadRequest:
    msg = str(exc)
    param = None
    if " - at `$." in msg:
        msg, _, where = msg.partition(" - at `$.")
        param = where.rstrip("`").split("[")[0].split(".")[0]
    elif "missing required field `" in msg:
        param = msg.split("`")[1]
    if isinstance(exc, msgspec.ValidationError):
        return BadRequest(f"Invalid request body: {msg}", param=param)
    return BadRequest(f"Request body is not valid JSON: {msg}")


def parse_completion(body: bytes) -> CompletionView:
    try:
        view = _completion.decode(body)
    except msgspec.DecodeError as exc:
        raise _bad(exc) from None
    p = view.prompt
    if p is None:
        if view.prompt_embeds is None:
            raise BadRequest("Either `prompt` or `prompt_embeds` must be provided.", param="prompt")
        return view
    if isinstance(p, str):
        return view
    if not p:
        raise BadRequest("`prompt` must not be empty", param="prompt")
    first = p[0]
    # list[int] (one tokenized prompt), list[str] (batch of texts), list[list[int]] (batch)
    if isinstance(first, bool) or not isinstance(first, (int, str, list)):
        raise BadRequest("`prompt` must be a string, a list of strings, or token ids", param="prompt")
    kind = type(first)
    for item in p:
        if type(item) is not kind:
            raise BadRequest("`prompt` list items must all have the same type", param="prompt")
        if isinstance(item, list) and not all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            raise BadRequest("token id prompts must be lists of integers", param="prompt")
    if kind is int and any(t < 0 for t in p):
        raise BadRequest("token ids must be non-negative", param="prompt")
    return view


def parse_chat(body: bytes) -> ChatView:
    try:
        view = _chat.decode(body)
    except msgspec.DecodeError as exc:
        raise _bad(exc) from None
    if not view.messages:
        raise BadRequest("`messages` must not be empty", param="messages")
    for i, m in enumerate(view.messages):
        if not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}].role must be a string", param="messages")
    return view


def parse_token_generate(body: bytes) -> TokenGenerateView:
    try:
        view = _token_generate.decode(body)
    except msgspec.DecodeError as exc:
        raise _bad(exc) from None
    if not view.token_ids:
        raise BadRequest("`token_ids` must not be empty", param="token_ids")
    if any(t < 0 for t in view.token_ids):
        raise BadRequest("token_ids must not contain negative values", param="token_ids")
    return view


def parse_model(body: bytes) -> str | None:
    """For passthrough endpoints: the `model` field if the body is a JSON object carrying one."""
    if not body:
        return None
    try:
        return _model_only.decode(body).model
    except msgspec.DecodeError:
        return None


Prompt = tuple[list[int] | None, str | None]


def routing_prompts(view: CompletionView) -> list[Prompt]:
    """(token_ids, text) of every prompt of the request, in order: vLLM runs each prompt of a
    batch as its own engine request, so each is keyed and counted (audit #3). The first decides
    routing (the prefix a batch most likely shares). Empty for a ``prompt_embeds`` request."""
    p = view.prompt
    if p is None:
        return []
    if isinstance(p, str):
        return [(None, p)]
    first = p[0]
    if isinstance(first, int):
        return [(p, None)]
    if isinstance(first, list):
        return [(item, None) for item in p]
    return [(None, str(item)) for item in p]


def routing_prompt(view: CompletionView) -> Prompt:
    """(token_ids, text) of the prompt that decides routing: the first of a batch."""
    prompts = routing_prompts(view)
    return prompts[0] if prompts else (None, None)


def messages_of(view: ChatView) -> list[Mapping[str, Any]]:
    return view.messages  # type: ignore[return-value]


# msgspec raises these, not DecodeError, for invalid UTF-8 in a body, a lone surrogate (\ud800)
# that later fails to encode for hashing, or nesting past its depth limit (5000 '['): client
# mistakes, so 400, not 500 (tests/reliability/test_bad_input.py).
BAD_BODY_ERRORS = (UnicodeError, RecursionError)


def bad_body_error(exc: UnicodeError | RecursionError) -> BadRequest:
    """The one 400 for a body that fails below msgspec's own error types (``BAD_BODY_ERRORS``)."""
    what = "is nested too deeply" if isinstance(exc, RecursionError) else "is not valid UTF-8 / Unicode"
    return BadRequest(f"Request body {what}.")
