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

from router.http.proxy import Headers, ResponseSink
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


def finish_session(router: Router, hints: SessionHints, req: RequestInfo) -> None:
    if hints.action == "close" and req.session_id is not None and router.sessions is not None:
        router.sessions.close(req.session_id)


class SessionSink:
    """A ``ResponseSink`` that adds ``x-session-token: <session key>`` to the response head."""

    __slots__ = ("inner", "req")

    def __init__(self, inner: ResponseSink, req: RequestInfo) -> None:
        self.inner = inner
        self.req = req

    async def start(self, status: int, reason: bytes, headers: Headers, length: int | None) -> None:
        key = self.req.session_id  # set at dispatch for inferred sessions too
        if key is not None and key.isascii() and key.isprintable():  # never a CR/LF into the head
            headers = [*headers, (TOKEN_HEADER, key.encode("latin-1", "replace"))]
        await self.inner.start(status, reason, headers, length)

    async def write(self, data: bytes) -> None:
        await self.inner.write(data)

    async def finish(self) -> None:
        await self.inner.finish()

    def abort(self) -> None:
        self.inner.abort()
