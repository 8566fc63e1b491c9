"""aiohttp middlewares: every error becomes an OpenAI-style JSON body; API-key and admin-token auth."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from router.errors import Forbidden, PayloadTooLarge, RouterError, error_body
from router.http.fleet_admin import ADMIN_PATHS
from router.http.generate import bearer_ok, check_api_key, count_error
from router.http.requests import BAD_BODY_ERRORS, bad_body_error
from router.http.state import STATE

log = logging.getLogger("kvrouter.server")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Paths that answer without an API key (probes and scrapers carry none).
PUBLIC_PATHS = frozenset(("/health", "/ready", "/metrics", "/openapi.json"))


def json_error(err: RouterError) -> web.Response:
    return web.Response(
        status=err.status, body=err.body(), content_type="application/json", headers=err.headers()
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    st = request.app[STATE]
    try:
        return await handler(request)
    except RouterError as err:
        count_error(st.metrics, err)
        return json_error(err)
    except web.HTTPRequestEntityTooLarge:
        st.metrics.client_errors.labels("413").inc()
        return json_error(PayloadTooLarge(f"Request body exceeds {st.cfg.server.max_body_bytes} bytes."))
    except web.HTTPException as exc:
        if exc.status >= 400:
            msg = exc.reason or "error"
            body = error_body(msg, "invalid_request_error" if exc.status < 500 else "internal_error")
            # keep the exception's own headers (a 405 must say Allow), not its text content type
            keep = {
                k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")
            }
            return web.Response(status=exc.status, body=body, content_type="application/json", headers=keep)
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except BAD_BODY_ERRORS as exc:
        st.metrics.client_errors.labels("400").inc()
        return json_error(bad_body_error(exc))
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return web.Response(
            status=500,
            body=error_body("Internal router error.", "internal_error"),
            content_type="application/json",
        )


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    cfg = request.app[STATE].cfg.server
    path = request.path
    if path in PUBLIC_PATHS:
        return await handler(request)
    if path.startswith("/debug/") or (path in ADMIN_PATHS and cfg.admin_token):
        if cfg.admin_token and not bearer_ok(request.headers.get("Authorization", ""), (cfg.admin_token,)):
            raise Forbidden("Debug endpoints need the admin token.")
        return await handler(request)
    check_api_key(cfg.api_keys, request.headers.get("Authorization", ""))
    return await handler(request)
