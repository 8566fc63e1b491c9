"""Agent sessions on the HTTP path: keys and hints in, the engine's body and x-session-token out.

``session_request`` runs once per generate request (after the body is parsed): it puts the
session key on the routing view, lets ``osl`` set the expected output, and returns the hints plus
the per-replica body function for the forwarder (``priority`` only to replicas that schedule by
it, ``nvext`` and the configured key field never). ``SessionSink`` adds ``x-session-token`` to the
response, so a client that sent no key can echo the one kvrouter used (llm-d's contract).
``finish_session`` releases a session the client closed (Dynamo ``session_control.action``).
"""

from __future__ import annotations

from collections.abc import Callable

from router.http.prefill import MAX_CAPTURE, answer_text, schedule_warmup, warm_body
from router.http.proxy import Headers, ResponseSink
from router.http.state import RequestPath
from router.replicas.registry import Replica
from router.routing import Router
from router.sessions.config import SessionsConfig
from router.sessions.identity import SessionHints, extract_hints, rewrite_body
from router.types import RequestInfo

TOKEN_HEADER = b"x-session-token"
BodyFor = Callable[[Replica], bytes]


def schedules_priority(cfg: SessionsConfig, replica: Replica) -> bool:
    names = cfg.priority_replicas
    return bool(names) and ("*" in names or replica.id in names or replica.url in names)


def session_request(
    cfg: SessionsConfig, req: RequestInfo, headers: bytes, body: bytes
) -> tuple[SessionHints, BodyFor | None]:
    hints = extract_hints(headers, body, header=cfg.header, body_field=cfg.body_field)
    if hints.session_id is not None:
        req.session_id = hints.session_id
    if hints.osl is not None and not req.max_tokens:
        req.max_tokens = hints.osl  # the expected output enters the turnover / load estimate
    if not hints.strip and hints.priority is None:
        return hints, None
    plain = rewrite_body(body, hints, priority_scheduling=False)
    with_priority: bytes | None = None

    def body_for(replica: Replica) -> bytes:
        nonlocal with_priority
        if hints.priority is None or not schedules_priority(cfg, replica):
            return plain
        if with_priority is None:
            with_priority = rewrite_body(body, hints, priority_scheduling=True)
        return with_priority

    return hints, body_for


def speculative_prefill(
    rp: RequestPath,
    sink: ResponseSink,
    hints: SessionHints,
    req: RequestInfo,
    path: str,
    target: bytes,
    headers: bytes,
) -> None:
    """After a completed turn that asked for it: warm the next turn's prefix (prefill.py)."""
    from router.http.generate import GENERATE_PATHS  # generate imports this module

    if not isinstance(sink, SessionSink) or not sink.capture or hints.body is None or req.session_id is None:
        return
    chat = path.endswith("/chat/completions")
    answer = answer_text(bytes(sink.capture), chat)
    if not answer:
        return
    body = warm_body(hints.body, answer, chat, hints.strip)
    if body is not None:
        schedule_warmup(
            rp.router, rp.forwarder.forward, GENERATE_PATHS[path], target, headers, body, req.session_id
        )


def finish_session(router: Router, hints: SessionHints, req: RequestInfo) -> None:
    if hints.action == "close" and req.session_id is not None and router.sessions is not None:
        router.sessions.close(req.session_id)


class SessionSink:
    """A ``ResponseSink`` that adds ``x-session-token: <session key>`` to the response head
    (``token``) and keeps the answer's bytes for a speculative prefill (``capture``)."""

    __slots__ = ("capture", "inner", "req", "token")

    def __init__(self, inner: ResponseSink, req: RequestInfo, *, token: bool, capture: bool) -> None:
        self.inner = inner
        self.req = req
        self.token = token
        self.capture: bytearray | None = bytearray() if capture else None

    async def start(self, status: int, reason: bytes, headers: Headers, length: int | None) -> None:
        key = self.req.session_id  # set at dispatch for inferred sessions too
        if self.token and key is not None and key.isascii() and key.isprintable():  # no CR/LF into the head
            headers = [*headers, (TOKEN_HEADER, key.encode("latin-1", "replace"))]
        if status != 200:
            self.capture = None  # nothing to warm after an error
        await self.inner.start(status, reason, headers, length)

    async def write(self, data: bytes) -> None:
        cap = self.capture
        if cap is not None:
            if len(cap) + len(data) <= MAX_CAPTURE:
                cap += data
            else:
                self.capture = None  # too long to keep: no warm-up rather than a wrong one
        await self.inner.write(data)

    async def finish(self) -> None:
        await self.inner.finish()

    def abort(self) -> None:
        self.inner.abort()
