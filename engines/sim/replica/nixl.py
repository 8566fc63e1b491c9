"""The NixlConnector contract of a simulated replica (vLLM 0.32, pull mode): leases on the
prefill side, the read on the decode side. shared/reference/pd-agentic-failures.md §1a has the
contract; this is what ``kvrouter sim --role prefill|decode|both`` speaks.

* **Prefill** (a request with ``kv_transfer_params.do_remote_decode``): the engine runs it with
  ``hold_kv``, so its blocks stay pinned after the one output token; the response carries
  NIXL-shaped ``kv_transfer_params`` (``params_for``) and a lease starts. The blocks are released
  when the decode side reads them (``POST /sim/nixl/read``, standing in for the NIXL read plus its
  completion notification) or when the lease (``kv_lease_s``, vLLM's ``kv_lease_duration``,
  default 30 s) runs out: ``vllm:nixl_num_kv_expired_reqs``. A read after expiry succeeds, as
  in vLLM (the blocks may have been reused: a silent stale read), and is counted in
  ``vllm:nixl_num_notifications_after_expiry``.
* **Decode** (``do_remote_prefill`` with the fields below): ``read`` asks the prefill replica at
  ``remote_host:remote_port`` for the blocks; the engine then loads the prompt past its own hit
  over the profile's KV link (``EngineProfile.kv_link``) and decodes without recomputing it.
  Missing fields: vLLM logs "Got invalid KVTransferParams" and computes locally. A failed read
  (prefill replica unreachable, unknown request, engine-id mismatch) counts
  ``vllm:nixl_num_failed_transfers``; then ``kv_load_failure_policy`` decides, as vLLM's
  scheduler does (``_handle_failed_recving``): ``fail`` (vLLM's default) fails the request,
  ``recompute`` computes the prompt locally.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from typing import Any

import aiohttp

log = logging.getLogger(__name__)

ROLES = ("prefill", "decode", "both")
FAILURE_POLICIES = ("fail", "recompute")
REQUIRED = ("remote_block_ids", "remote_engine_id", "remote_request_id", "remote_host", "remote_port")
READ_TIMEOUT_S = 5.0
_EXPIRED_KEPT = 4096  # ids of expired leases remembered for the after-expiry counter


class Nixl:
    """One replica's NIXL side: its engine id, the leases it holds, the reads it makes."""

    def __init__(self, role: str = "both", lease_s: float = 30.0, failure_policy: str = "fail") -> None:
        if role not in ROLES:
            raise ValueError(f"invalid role {role!r}: one of {', '.join(ROLES)}")
        if failure_policy not in FAILURE_POLICIES:
            raise ValueError(f"invalid kv_load_failure_policy {failure_policy!r}: fail or recompute")
        if not lease_s > 0:
            raise ValueError(f"invalid kv lease: {lease_s} (must be > 0)")
        self.role = role
        self.lease_s = lease_s
        self.failure_policy = failure_policy
        self.engine_id = str(uuid.uuid4())
        self.leases: dict[str, asyncio.TimerHandle] = {}  # remote_request_id -> expiry timer
        self.expired: OrderedDict[str, None] = OrderedDict()
        self._session: aiohttp.ClientSession | None = None

    def prefills(self, ktp: Any) -> bool:
        return (
            self.role in ("prefill", "both") and isinstance(ktp, dict) and ktp.get("do_remote_decode") is True
        )

    def decodes(self, ktp: Any) -> bool:
        return (
            self.role in ("decode", "both") and isinstance(ktp, dict) and ktp.get("do_remote_prefill") is True
        )

    @staticmethod
    def valid(ktp: dict[str, Any]) -> bool:
        return all(ktp.get(k) is not None for k in REQUIRED)

    def params_for(
        self, rid: str, blocks: list[int], host: str, port: int, prompt_tokens: int, cached: int
    ) -> dict[str, Any]:
        """What vLLM 0.32's pull scheduler returns from ``request_finished`` on the prefill side."""
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_block_ids": [list(blocks)],
            "remote_engine_id": self.engine_id,
            "remote_request_id": rid,
            "remote_host": host,
            "remote_port": port,
            "tp_size": 1,
            "dcp_size": 1,
            "pp_size": 1,
            "remote_num_tokens": prompt_tokens,
            "remote_blocks_expiry_time": None,  # set D-side only in vLLM
            "transfer_mode": "pull",
            "remote_prefill_cached_tokens": cached,
        }

    def lease(self, rid: str, release: Any, on_expired: Any) -> None:
        """Pin until read or ``lease_s``; ``release()`` frees the blocks."""

        def expire() -> None:
            if self.leases.pop(rid, None) is not None:
                release()
                on_expired()
                self.expired[rid] = None
                while len(self.expired) > _EXPIRED_KEPT:
                    self.expired.popitem(last=False)

        self.leases[rid] = asyncio.get_running_loop().call_later(self.lease_s, expire)

    def serve_read(self, body: dict[str, Any], release: Any) -> tuple[int, dict[str, Any]]:
        """The prefill side of a read: (HTTP status, body). 200 ``{"ok": true}`` releases."""
        rid = body.get("remote_request_id")
        if body.get("remote_engine_id") != self.engine_id:
            return 409, {"error": "engine id mismatch (handshake failed)"}
        if not isinstance(rid, str):
            return 400, {"error": "remote_request_id missing"}
        timer = self.leases.pop(rid, None)
        if timer is not None:
            timer.cancel()
            release(rid)
            return 200, {"ok": True, "stale": False}
        if rid in self.expired:
            del self.expired[rid]
            return 200, {"ok": True, "stale": True}  # vLLM reads the freed blocks anyway
        return 404, {"error": f"unknown request {rid}"}

    async def read(self, ktp: dict[str, Any]) -> tuple[bool, float]:
        """The decode side: ask the prefill replica for its blocks. (ok, seconds it took)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=READ_TIMEOUT_S))
        url = f"http://{ktp['remote_host']}:{ktp['remote_port']}/sim/nixl/read"
        body = {k: ktp.get(k) for k in ("remote_request_id", "remote_engine_id", "remote_block_ids")}
        t0 = time.perf_counter()
        try:
            async with self._session.post(url, json=body) as resp:
                ok = resp.status == 200
                if not ok:
                    log.warning("NIXL read from %s failed: HTTP %d %s", url, resp.status, await resp.text())
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.warning("NIXL read from %s failed: %s", url, exc)
            ok = False
        return ok, time.perf_counter() - t0

    async def close(self) -> None:
        for timer in self.leases.values():
            timer.cancel()
        self.leases.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None
