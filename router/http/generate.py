"""The generate endpoints (``/v1/completions``, ``/v1/chat/completions``), independent of the HTTP
server that carried the request: aiohttp (endpoints.py) or the raw fast path (fastpath.py). Both
call ``generate`` with a ``RequestPath`` and a ``ResponseSink``, so validation, auth, drain
accounting, admission, routing and forwarding are one code path."""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from router.api_forms import ChatForm, anthropic_form, responses_form
from router.chat_messages import MediaNotModeled
from router.chat_render import ChatOptions, parse_chat_options
from router.errors import BadRequest, RouterError, Unauthorized
from router.http.prompt_limits import ContextLimits
from router.http.proxy import ResponseSink
from router.http.requests import (
    messages_of,
    parse_chat,
    parse_completion,
    parse_token_generate,
    routing_prompts,
)
from router.http.sessions import SessionSink, finish_session, session_request, speculative_prefill
from router.http.state import RequestPath
from router.metrics import RouterMetrics
from router.routing import Router
from router.scoring.pipeline import Explanation
from router.tokenizer import HFTokenizer
from router.types import KeyMode, RequestInfo

log = logging.getLogger("kvrouter.server")
_proxy_log = logging.getLogger("kvrouter.proxy")


class InfoParser(Protocol):
    def __call__(self, router: Router, body: bytes, limits: ContextLimits | None = None) -> RequestInfo: ...


def completion_info(router: Router, body: bytes, limits: ContextLimits | None = None) -> RequestInfo:
    view = parse_completion(body)
    if limits is not None:
        limits.check_prompt(view.model, view.prompt)  # before tokenizing or hashing
    model = view.model if view.model is not None else router.default_model()
    prompts = routing_prompts(view)
    max_tokens = view.max_tokens or 0
    if not prompts:  # prompt_embeds: nothing the router can key; counted as one token
        return router.request_info(model, token_ids=None, text="", max_tokens=max_tokens, stream=view.stream)
    tok = router.tokenizer
    if isinstance(tok, HFTokenizer) and router.policy.needs_match:
        # what vLLM tokenises: add_special_tokens as asked, then the last truncate_prompt_tokens
        keep = (
            view.truncate_prompt_tokens
            if view.truncate_prompt_tokens and view.truncate_prompt_tokens > 0
            else 0
        )
        if keep or not view.add_special_tokens:
            prompts = [
                _as_vllm_tokenises(tok, ids, text, view.add_special_tokens, keep) for ids, text in prompts
            ]
    try:
        infos = [
            router.request_info(
                model,
                token_ids=ids,
                text=text,
                cache_salt=view.cache_salt,
                max_tokens=max_tokens,
                stream=view.stream,
            )
            for ids, text in prompts
        ]
    except OverflowError:
        # hashing packs token ids as uint32; a negative or huge id is the client's mistake (400,
        # not 500), caught here rather than checked per token on the hot path
        raise BadRequest("Prompt token ids must be integers in [0, 2**32).", param="prompt") from None
    req = infos[0]
    if view.skips_cache_read:
        no_reuse(req)
    for other in infos[1:]:  # a batch: every prompt is prefilled on the chosen replica
        req.prompt_tokens += other.prompt_tokens
        if other.block_hashes:
            req.batch_block_hashes.append(other.block_hashes)
    return req


def _as_vllm_tokenises(
    tok: HFTokenizer, ids: list[int] | None, text: str | None, add_special_tokens: bool, keep: int
) -> tuple[list[int] | None, str | None]:
    if ids is None:
        ids = tok.encode(text or "", add_special_tokens)
    return (ids[-keep:] if keep else ids), None


def no_reuse(req: RequestInfo) -> None:
    """vLLM will not read the prefix cache for this request (prompt logprobs): predict no hit and
    route it on load, rather than pile it onto the replica that holds its prefix (audit #8)."""
    req.block_hashes = []
    req.key_mode = KeyMode.NONE


def chat_info(router: Router, body: bytes, limits: ContextLimits | None = None) -> RequestInfo:
    view = parse_chat(body)
    messages = messages_of(view)
    token_ids = chat_token_ids(router, messages, body)
    if limits is not None and token_ids is not None:
        limits.check_tokens(view.model, len(token_ids))
    req = router.request_info(
        view.model if view.model is not None else router.default_model(),
        token_ids=token_ids,
        messages=messages,
        cache_salt=view.cache_salt,
        max_tokens=view.max_completion_tokens or view.max_tokens or 0,
        stream=view.stream,
    )
    if view.prompt_logprobs is not None:
        no_reuse(req)
    return req


def chat_token_ids(
    router: Router, messages: Sequence[Mapping[str, Any]], body: bytes, options: ChatOptions | None = None
) -> list[int] | None:
    """Token mode: the prompt vLLM renders for this request (tools, template kwargs, ...). None
    keys it in byte mode: no tokenizer or template, a policy that never matches, or media parts
    under a text template (their placeholder tokens are the model's, not reproducible here)."""
    tok = router.tokenizer
    if not isinstance(tok, HFTokenizer) or not tok.has_chat_template or not router.policy.needs_match:
        return None
    try:
        return tok.encode_chat(messages, options=options if options is not None else parse_chat_options(body))
    except MediaNotModeled:
        return None


def _form_info(router: Router, form: ChatForm, body: bytes, limits: ContextLimits | None) -> RequestInfo:
    token_ids = chat_token_ids(router, form.messages, body, form.options)
    if limits is not None and token_ids is not None:
        limits.check_tokens(form.model, len(token_ids))
    return router.request_info(
        form.model if form.model is not None else router.default_model(),
        token_ids=token_ids,
        messages=form.messages,
        cache_salt=form.cache_salt,
        max_tokens=form.max_tokens,
        stream=form.stream,
    )


def responses_info(router: Router, body: bytes, limits: ContextLimits | None = None) -> RequestInfo:
    """``/v1/responses``: keyed by the conversation vLLM renders from ``instructions`` + ``input``;
    a ``previous_response_id`` goes to the replica holding that response (its engine-local store),
    and every answer's id is remembered for the next turn."""
    form = responses_form(body)
    affinity = router.responses
    if form.previous_response_id is not None:
        # the prompt continues a history only that engine holds: no keys of its own
        req = router.request_info(
            form.model if form.model is not None else router.default_model(),
            messages=form.messages,
            max_tokens=form.max_tokens,
            stream=form.stream,
            block_hashes=(),
            prompt_tokens=max(1, len(body) // router.bytes_per_token),
        )
        req.key_mode = KeyMode.NONE
        req.pin = affinity.lookup(form.previous_response_id)
    else:
        req = _form_info(router, form, body, limits)
    req.on_response = affinity.observe
    return req


def anthropic_info(router: Router, body: bytes, limits: ContextLimits | None = None) -> RequestInfo:
    """``/v1/messages``: keyed like the chat request vLLM converts it into."""
    return _form_info(router, anthropic_form(body), body, limits)


def token_generate_info(router: Router, body: bytes, limits: ContextLimits | None = None) -> RequestInfo:
    """``/inference/v1/generate`` (token in, token out): keyed by its ``token_ids``; a request with
    multimodal ``features``/``content_parts`` is unkeyed (its blocks carry media hashes)."""
    view = parse_token_generate(body)
    if limits is not None:
        limits.check_tokens(view.model, len(view.token_ids))
    media = view.features is not None or view.content_parts is not None
    params = view.sampling_params if isinstance(view.sampling_params, dict) else {}
    max_tokens = params.get("max_tokens")
    try:
        return router.request_info(
            view.model if view.model is not None else router.default_model(),
            token_ids=None if media else view.token_ids,
            text="" if media else None,
            cache_salt=view.cache_salt,
            max_tokens=max_tokens if isinstance(max_tokens, int) else 0,
            stream=view.stream is True,
        )
    except OverflowError:
        raise BadRequest("token_ids must be integers in [0, 2**32).", param="token_ids") from None


GENERATE_PATHS: dict[str, InfoParser] = {
    "/v1/completions": completion_info,
    "/v1/chat/completions": chat_info,
    "/v1/responses": responses_info,
    "/v1/messages": anthropic_info,
    "/inference/v1/generate": token_generate_info,
}


def bearer_ok(authorization: str, keys: Sequence[str]) -> bool:
    if not authorization.startswith("Bearer "):
        return False
    given = authorization[7:].strip().encode()
    # compare against every key in constant time
    ok = False
    for k in keys:
        ok |= hmac.compare_digest(given, k.encode())
    return ok


def check_api_key(keys: Sequence[str], authorization: str) -> None:
    if keys and not bearer_ok(authorization, keys):
        raise Unauthorized("Missing or invalid API key (Authorization: Bearer ...).")


def count_error(metrics: RouterMetrics, err: RouterError) -> None:
    """Client mistakes and refusals (4xx, 503) are counted by status; upstream failures (502, 504)
    are counted per replica by the proxy."""
    if err.status < 500 or err.status == 503:
        metrics.client_errors.labels(str(err.status)).inc()


def new_explanation(router: Router, req: RequestInfo) -> Explanation:
    return Explanation(router.policy.name, len(req.block_hashes), req.block_size, req.key_mode.value)


async def generate(
    rp: RequestPath,
    path: str,
    info: InfoParser,
    sink: ResponseSink,
    target: bytes,
    headers: bytes,
    body: bytes,
) -> None:
    """Parse, admit, route and forward one generate request (the caller holds the drain guard and
    has checked the API key). Raises RouterError for answers that never reached the sink."""
    limits = rp.context
    limits.precheck(path, body)
    if len(body) > limits.offload_parse_bytes:
        # Decoding and validating a multi-megabyte prompt would hold the loop (F3): a thread,
        # which the loop interleaves with every few milliseconds.
        req = await asyncio.to_thread(info, rp.router, body, limits)
    else:
        req = info(rp.router, body, limits)
    if rp.cfg.server.log_prompts and log.isEnabledFor(logging.DEBUG):
        # Opt-in only: prompts are user data and never reach a log otherwise (docs/security.md).
        log.debug("prompt %s: %s", path, body[:2048].decode("utf-8", "replace"))
    if rp.cpu_lookup is not None:  # LMCache lookup mode: learn the CPU tier before routing
        await rp.cpu_lookup.refresh(req, req.token_ids)
    explain = new_explanation(rp.router, req) if _proxy_log.isEnabledFor(logging.DEBUG) else None
    scfg = rp.cfg.sessions
    hints, body_for = session_request(scfg, req, headers, body) if scfg.enabled else (None, None)
    priority = hints.priority if hints is not None and hints.priority is not None else 0
    tracker = rp.router.sessions
    if hints is not None:
        token = scfg.token_header and (req.session_id is not None or bool(tracker and tracker.infer))
        if token or hints.speculative_prefill:  # only then: a relay layer per chunk is not free
            sink = SessionSink(sink, req, token=token, capture=hints.speculative_prefill)
    admission = rp.admission
    if not admission.try_acquire():
        await admission.acquire(priority)  # queued (by priority, then arrival; bounded) or refused with 429
    try:
        if rp.pd is not None and rp.pd.active(req.model):
            await rp.pd.handle(sink, target, headers, body, req)
        else:
            await rp.forwarder.forward(
                sink, "POST", target, headers, body, req, explain=explain, body_for=body_for
            )
        if hints is not None and hints.speculative_prefill:
            speculative_prefill(rp, sink, hints, req, path, target, headers)
    finally:
        admission.release()
        if hints is not None:
            finish_session(rp.router, hints, req)
