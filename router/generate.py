"""The generate endpoints (``/v1/completions``, ``/v1/chat/completions``), independent of the HTTP
server that carried the request: aiohttp (router/server.py) or the raw fast path
(router/fastpath.py). Both call ``generate`` with a ``ResponseSink``, so validation, auth, drain
accounting, admission, routing and forwarding are one code path."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .chat_messages import MediaNotModeled
from .chat_render import parse_chat_options
from .errors import BadRequest, Draining, RouterError, Unauthorized
from .proxy import ResponseSink
from .requests import messages_of, parse_chat, parse_completion, routing_prompt
from .scoring.pipeline import Explanation
from .tokenizer import HFTokenizer
from .types import RequestInfo

if TYPE_CHECKING:
    from .server import AppState

log = logging.getLogger("kvrouter.server")
_proxy_log = logging.getLogger("kvrouter.proxy")

InfoParser = Callable[["AppState", bytes], RequestInfo]


def completion_info(st: AppState, body: bytes) -> RequestInfo:
    view = parse_completion(body)
    token_ids, text = routing_prompt(view)
    try:
        return st.router.request_info(
            view.model,
            token_ids=token_ids,
            text=text,
            cache_salt=view.cache_salt,
            max_tokens=view.max_tokens or 0,
            stream=view.stream,
        )
    except OverflowError:
        # hashing packs token ids as uint32; a negative or huge id is the client's mistake (400,
        # not 500), caught here rather than checked per token on the hot path
        raise BadRequest("Prompt token ids must be integers in [0, 2**32).", param="prompt") from None


def chat_info(st: AppState, body: bytes) -> RequestInfo:
    view = parse_chat(body)
    messages = messages_of(view)
    return st.router.request_info(
        view.model,
        token_ids=chat_token_ids(st, messages, body),
        messages=messages,
        cache_salt=view.cache_salt,
        max_tokens=view.max_completion_tokens or view.max_tokens or 0,
        stream=view.stream,
    )


def chat_token_ids(st: AppState, messages: list[Mapping[str, Any]], body: bytes) -> list[int] | None:
    """Token mode: the prompt vLLM renders for this request (tools, template kwargs, ...). None
    keys it in byte mode: no tokenizer or template, a policy that never matches, or media parts
    under a text template (their placeholder tokens are the model's, not reproducible here)."""
    tok = st.router.tokenizer
    if not isinstance(tok, HFTokenizer) or not tok.has_chat_template or not st.router.policy.needs_match:
        return None
    try:
        return tok.encode_chat(messages, options=parse_chat_options(body))
    except MediaNotModeled:
        return None


GENERATE_PATHS: dict[str, InfoParser] = {"/v1/completions": completion_info, "/v1/chat/completions": chat_info}


class Active:
    """Counts handled requests so the drain knows when the last one finished; refuses new ones
    (503 + Retry-After) once the drain's grace window is over."""

    __slots__ = ("st",)

    def __init__(self, st: AppState) -> None:
        self.st = st

    def __enter__(self) -> None:
        st = self.st
        if st.refusing:
            raise Draining()
        st.active += 1
        st.idle.clear()

    def __exit__(self, *exc: object) -> None:
        st = self.st
        st.active -= 1
        if st.active == 0:
            st.idle.set()


def bearer_ok(authorization: str, keys: Sequence[str]) -> bool:
    if not authorization.startswith("Bearer "):
        return False
    given = authorization[7:].strip().encode()
    # compare against every key in constant time
    ok = False
    for k in keys:
        ok |= hmac.compare_digest(given, k.encode())
    return ok


def check_api_key(st: AppState, authorization: str) -> None:
    keys = st.cfg.server.api_keys
    if keys and not bearer_ok(authorization, keys):
        raise Unauthorized("Missing or invalid API key (Authorization: Bearer ...).")


def count_error(st: AppState, err: RouterError) -> None:
    """Client mistakes and refusals (4xx, 503) are counted by status; upstream failures (502, 504)
    are counted per replica by the proxy."""
    if err.status < 500 or err.status == 503:
        st.metrics.client_errors.labels(str(err.status)).inc()


def new_explanation(st: AppState, req: RequestInfo) -> Explanation:
    return Explanation(st.router.policy.name, len(req.block_hashes), req.block_size, req.key_mode.value)


async def generate(
    st: AppState, path: str, info: InfoParser, sink: ResponseSink, target: bytes, headers: bytes, body: bytes
) -> None:
    """Parse, admit, route and forward one generate request (the caller holds ``Active`` and has
    checked the API key). Raises RouterError for answers that never reached the sink."""
    req = info(st, body)
    if st.cfg.server.log_prompts and log.isEnabledFor(logging.DEBUG):
        # Opt-in only: prompts are user data and never reach a log otherwise (docs/security.md).
        log.debug("prompt %s: %s", path, body[:2048].decode("utf-8", "replace"))
    explain = new_explanation(st, req) if _proxy_log.isEnabledFor(logging.DEBUG) else None
    admission = st.admission
    if not admission.try_acquire():
        await admission.acquire()  # queued (FIFO, bounded) or refused with 429
    try:
        assert st.forwarder is not None
        await st.forwarder.forward(sink, "POST", target, headers, body, req, explain=explain)
    finally:
        admission.release()
