"""Fleet-wide control paths: what a client of one vLLM engine sends, applied to every replica.

``POST /reset_prefix_cache`` (AIPerf ``--reset-kv-cache``, benchmark harnesses): every routable
replica resets its prefix cache, and the router forgets what it predicted or was told they hold
(the engines' ``AllBlocksCleared`` events follow, but speculative keys would otherwise keep
steering requests to "cached" replicas that are now cold). Admin-protected: the admin token when
one is configured, else the client API key.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import msgspec
from aiohttp import web

from router.errors import UpstreamError
from router.http.state import RUNNING, STATE
from router.replicas.registry import Replica

log = logging.getLogger("kvrouter.server")

ADMIN_PATHS = frozenset(("/reset_prefix_cache",))
RESET_TIMEOUT_S = 30.0
_json = msgspec.json.Encoder()


async def reset_prefix_cache(request: web.Request) -> web.Response:
    st = request.app[STATE]
    run = request.app[RUNNING]
    replicas = list(st.registry.routable())
    if not replicas:
        raise UpstreamError("No routable replica to reset.")
    query = request.raw_path.partition("?")[2]
    key = st.cfg.upstream.api_key
    headers = {"Authorization": f"Bearer {key}"} if key else {}

    async def one(rep: Replica) -> tuple[Replica, int | str]:
        url = f"{rep.url.rstrip('/')}/reset_prefix_cache" + (f"?{query}" if query else "")
        try:
            async with run.session.post(
                url, headers=headers, timeout=aiohttp.ClientTimeout(total=RESET_TIMEOUT_S)
            ) as resp:
                await resp.read()
                return rep, resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            return rep, type(exc).__name__

    results = await asyncio.gather(*(one(r) for r in replicas))
    out: dict[str, int | str] = {}
    for rep, status in results:
        out[rep.id] = status
        if status == 200:
            # the engine's prefix cache is empty: drop confirmed and speculative keys alike
            st.index.clear(rep.id)
            events = run.kv_events.events_of(rep.id) if run.kv_events is not None else None
            if events is not None:
                events.reset()
        else:
            log.warning("reset_prefix_cache on %s failed: %s", rep.id, status)
    ok = all(s == 200 for s in out.values())
    body = _json.encode({"reset": ok, "replicas": out})
    return web.Response(status=200 if ok else 502, body=body, content_type="application/json")
