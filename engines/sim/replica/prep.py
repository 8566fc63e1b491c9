"""A request's API-server side before it reaches the engine: JSON decoding in slices, body checks,
prompts as token ids, sampling parameters.

All replicas share one event loop, so a request's own CPU work (decoding a token-id prompt, its
block-hash chain) runs in slices of about ``SLICE_S`` that yield to the loop in between
(``yield_behind_due_steps``): a 126k-token prompt is several ms of work, and a due engine step
waits for at most the rest of one slice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from .config import ReplicaConfig
from .openai_format import HTTPError
from .tokenizer import ChatTemplateError, Tokenizer, content_text

_json_any = msgspec.json.Decoder()
# A request's own CPU work (decoding a token-id prompt, its block-hash chain) is done in slices of
# about this much CPU, yielding to the loop in between (yield_behind_due_steps): a 126k-token
# prompt is several ms of work, and all replicas' engine loops share one event loop. A due step
# waits for at most the rest of one slice. 0.2 ms, not 0.5: in six interleaved pairs of the live
# bench (tests/bench/bench_sim_live.py), 99.37% of steps within 5 ms against 99.02%.
# See http_api.ReplicaAPI._serve.
SLICE_S = 0.0002
DECODE_SLICE_BYTES = 16 * 1024  # ~2.7k ids, ~0.15 ms to decode
LONG_PREP_TOKENS = 4096  # prompts hashed under the fleet's preparation lock (see ReplicaRuntime)


async def yield_behind_due_steps() -> None:
    """Give the loop a turn, and another: what a preparation slice yields to must include the
    engine steps that fell due while the slice ran.

    Why two: a task that yields with ``sleep(0)`` is queued to run on the loop's next turn, and
    that turn first fires its due timers, whose engine loops queue up *behind* it, so the next
    slice ran before them and a step due during a slice waited for two slices. After a second
    ``sleep(0)`` the slice's task is behind them. Measured in three interleaved pairs of the
    live bench: 99.34-99.53% of steps within 5 ms against 98.92-99.40% with one."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)


_INT_LIST = list[int]
_ints = msgspec.json.Decoder(list[int])
# Stands for a long token-id prompt while the rest of the body is decoded. Used only for bodies
# without any \u0000 escape, so no string the client sent can equal it (JSON has no raw NULs).
_IDS_SLOT = b'"\\u0000kvrouter-sim-ids\\u0000"'
_IDS_SLOT_VALUE = "\x00kvrouter-sim-ids\x00"


def decode_json(data: bytes) -> Any:
    try:
        return _json_any.decode(data)
    except msgspec.DecodeError as exc:
        raise HTTPError(400, f"Invalid JSON body: {exc}") from exc
    except RecursionError:  # msgspec's nesting limit: a client mistake, not a server fault
        raise HTTPError(400, "Invalid JSON body: nested too deeply") from None


async def decode_json_sliced(data: bytes, slice_s: float = SLICE_S) -> tuple[Any, list[int] | None]:
    """``(body, ids)``: the body exactly as ``decode_json(data)`` gives it (same value, same
    errors), and its top-level ``prompt`` as a list of ints if it is a non-empty array of JSON
    integers, else None. A long id array is decoded in slices of ~16 KB that yield to the loop
    (decoding 126k ids at once is ~7 ms), yielding after ``slice_s`` of work; anything
    unusual takes the one-shot path.

    How: the first ``"prompt"`` key is followed by ``[``; up to the first ``]`` there must be
    integers only, decoded slice by slice (cut at commas, each slice as ``list[int]``: a string,
    a float, a bool or a nested array fails, and the one-shot path decides). The rest of the body
    is decoded with a placeholder string in the array's place, and the fast result is used only
    if the placeholder came back as the top-level ``prompt`` (the key was not nested, not
    repeated). Then the whole body is valid JSON and decodes to the same value."""
    if len(data) <= DECODE_SLICE_BYTES:
        return decode_json(data), None
    key = data.find(b'"prompt"')
    if key < 0 or data.find(b"\\u0000") >= 0:
        return decode_json(data), None
    i = key + 8
    n = len(data)
    while i < n and data[i] in b" \t\r\n":
        i += 1
    if i >= n or data[i] != 0x3A:  # ':'
        return decode_json(data), None
    i += 1
    while i < n and data[i] in b" \t\r\n":
        i += 1
    end = data.find(b"]", i)
    if i >= n or data[i] != 0x5B or end < 0:  # '['
        return decode_json(data), None
    ids: list[int] = []
    pos = i + 1
    t0 = time.perf_counter()
    try:
        while True:
            cut = data.find(b",", pos + DECODE_SLICE_BYTES, end) if pos + DECODE_SLICE_BYTES < end else -1
            stop = end if cut < 0 else cut
            part = _ints.decode(b"[" + data[pos:stop] + b"]")
            if not part and (cut >= 0 or pos != i + 1):  # "[1,]", "[1, ]": invalid JSON
                return decode_json(data), None
            ids += part
            if cut < 0:
                break
            pos = cut + 1
            if time.perf_counter() - t0 > slice_s:
                await yield_behind_due_steps()
                t0 = time.perf_counter()
    except msgspec.DecodeError:  # not all integers (ValidationError), or not valid JSON
        return decode_json(data), None
    try:
        rest = _json_any.decode(data[:i] + _IDS_SLOT + data[end + 1 :])
    except (msgspec.DecodeError, RecursionError):
        return decode_json(data), None
    if not isinstance(rest, dict) or rest.get("prompt") != _IDS_SLOT_VALUE:
        return decode_json(data), None
    rest["prompt"] = ids
    return rest, (ids or None)


def token_ids(prompt: list[Any]) -> list[int] | None:
    """A copy of ``prompt`` if every item is an int (not a bool), else None. msgspec checks a 12k-id
    prompt in C, ~15x faster than a Python loop (which was ~5% of a loaded sim's CPU); what it
    refuses (e.g. ints beyond 64 bits) goes through the exact Python check."""
    try:
        return msgspec.convert(prompt, _INT_LIST)
    except msgspec.ValidationError:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        return None


def messages(raw: Any) -> list[Mapping[str, Any]]:
    if not isinstance(raw, list) or not raw or not all(isinstance(m, dict) for m in raw):
        raise HTTPError(400, "'messages' must be a non-empty list of message objects", param="messages")
    for m in raw:
        if not isinstance(m.get("role"), str):
            raise HTTPError(400, "every message needs a string 'role'", param="messages")
        content_text(m.get("content"))
    return raw


def check_body(body: Any, model_name: str) -> dict[str, Any]:
    """The body as a JSON object for this replica's model, or the 400/404 vLLM answers."""
    if not isinstance(body, dict):
        raise HTTPError(400, "Request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_name:
        raise HTTPError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
    return body


def chat_ids(body: Mapping[str, Any], tok: Tokenizer) -> list[int]:
    """vLLM's chat prompt: the chat template, then the text encoded with the request's
    ``add_special_tokens`` (default False: the template adds BOS). A template that refuses
    the messages is the client's error (400 with the template's reason), as in vLLM."""
    try:
        text = tok.render_chat(messages(body.get("messages")), bool(body.get("add_generation_prompt", True)))
    except ChatTemplateError as exc:
        raise HTTPError(400, str(exc)) from exc
    return tok.encode(text, add_special_tokens=bool(body.get("add_special_tokens", False)))


def prompts(
    body: Mapping[str, Any], chat: bool, tok: Tokenizer, ids: list[int] | None = None
) -> list[list[int]]:
    """The request's prompts as token ids. ``ids``: the ``prompt`` already decoded and
    checked as token ids (``decode_json_sliced``)."""
    if chat:
        return [chat_ids(body, tok)]
    if ids:
        return [ids]
    prompt = body.get("prompt")
    special = bool(body.get("add_special_tokens", True))
    if isinstance(prompt, str):
        return [tok.encode(prompt, special)]
    if isinstance(prompt, list) and prompt:
        tids = token_ids(prompt)
        if tids is not None:
            return [tids]
        if all(isinstance(p, str) for p in prompt):
            return [tok.encode(p, special) for p in prompt]
        if all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt):
            return [list(p) for p in prompt]
    raise HTTPError(
        400, "'prompt' must be a string, a list of token ids, or a batch of either", param="prompt"
    )


def params(
    body: Mapping[str, Any], chat: bool, prompts: Sequence[list[int]], config: ReplicaConfig
) -> tuple[int, bool, bool, int]:
    """``(max_tokens, stream, include_usage, stream_interval)``, checked as vLLM checks them."""
    mt = body.get("max_completion_tokens") if chat else None
    if mt is None:
        mt = body.get("max_tokens")
    longest = max(len(p) for p in prompts)
    if mt is None:
        mt = 16 if not chat else min(config.default_chat_max_tokens, config.max_model_len - longest)
    if not isinstance(mt, int) or isinstance(mt, bool) or mt < 1:
        raise HTTPError(400, f"max_tokens must be at least 1, got {mt}.", param="max_tokens")
    if int(body.get("n", 1) or 1) != 1:
        raise HTTPError(400, "The simulator supports only n=1.", param="n")
    if any(len(p) == 0 for p in prompts):
        raise HTTPError(400, "The prompt cannot be empty.", param="prompt")
    if longest + mt > config.max_model_len:
        raise HTTPError(
            400,
            f"This model's maximum context length is {config.max_model_len} tokens. However, you "
            f"requested {longest + mt} tokens ({longest} in the messages, {mt} in the completion). "
            "Please reduce the length of the messages or completion.",
            param="input_tokens",
        )
    opts = body.get("stream_options") or {}
    include_usage = bool(opts.get("include_usage", False)) if isinstance(opts, dict) else False
    interval = body.get("stream_interval")
    if interval is not None and (not isinstance(interval, int) or isinstance(interval, bool) or interval < 1):
        raise HTTPError(400, f"stream_interval must be at least 1, got {interval}.", param="stream_interval")
    # As vLLM: a request can raise the server's --stream-interval, never lower it.
    interval = max(interval or 1, config.stream_interval)
    # ignore_eos is accepted and moot: the sim never samples EOS.
    return mt, bool(body.get("stream", False)), include_usage, interval
