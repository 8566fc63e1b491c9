"""The client limits of client_limits.py and targets.py on the aiohttp path (every request the
fast path hands over, and all of them with ``--no-fast-path``).

* ``target_middleware`` (before auth): origin-form only, path normalised; the request continues
  with the normalised target, so the allow-list and the engine see the same string (F5/F6).
* ``body_middleware`` (after auth, so an unauthenticated body is never read: aiohttp reads
  bodies lazily and drains an unread one for ``lingering_time`` without keeping it): reserves the
  body in the global budget, reads it under its deadline, holds the reservation until the
  answer is done (F1/F2).
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from yarl import URL

from router.errors import Overloaded, PayloadTooLarge, RouterError
from router.http.client_limits import BodyBudgetExceeded, RequestTimeout
from router.http.middleware import PUBLIC_PATHS, Handler
from router.http.state import STATE
from router.http.targets import clean_target


def _refused(request: web.Request, err: RouterError, reason: str) -> RouterError:
    request.app[STATE].limits.reject(reason, request.remote)
    return err


@web.middleware
async def target_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    raw = request.message.path.encode("utf-8", "surrogateescape")
    try:
        clean = clean_target(raw)
    except RouterError as err:
        raise _refused(request, err, "bad_target") from None
    if clean != raw:
        request = request.clone(rel_url=URL(clean.decode("ascii"), encoded=True))
    limits = request.app[STATE].limits
    if (
        limits.clients.rate > 0
        and request.path not in PUBLIC_PATHS  # probes and scrapers are not tenants
        and not limits.clients.allow_request(request.remote or "?")
    ):
        busy = Overloaded("Too many requests from this client; retry later.", retry_after=1)
        raise _refused(request, busy, "client_rate")
    return await handler(request)


@web.middleware
async def body_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.can_read_body:
        return await handler(request)
    st = request.app[STATE]
    max_body = st.cfg.server.max_body_bytes
    length = request.content_length
    n = max_body if length is None else length  # chunked: the most it may become
    if n > max_body:
        raise _refused(request, PayloadTooLarge(f"Request body exceeds {max_body} bytes."), "body_too_large")
    limits = st.limits
    if not limits.budget.reserve(n):
        busy = BodyBudgetExceeded(
            "The router is buffering too many request bodies; retry later.", retry_after=1
        )
        raise _refused(request, busy, "body_budget")
    try:
        try:
            async with asyncio.timeout(limits.body_deadline(n)):
                await request.read()  # kept by the request: the handler's read() returns it
        except TimeoutError:
            raise _refused(
                request, RequestTimeout("The request body did not arrive in time."), "body_timeout"
            ) from None
        except web.HTTPRequestEntityTooLarge:
            raise _refused(
                request, PayloadTooLarge(f"Request body exceeds {max_body} bytes."), "body_too_large"
            ) from None
        return await handler(request)
    finally:
        limits.budget.release(n)
