"""The vLLM NixlConnector handoff as a router performs it: the two request bodies and the checks.

Contract (vllm tests/v1/kv_connector/nixl_integration/toy_proxy_server.py; docs/disaggregation.md):

* **Leg 1, to the prefill replica P**: the client's request with ``kv_transfer_params =
  {"do_remote_decode": true, "do_remote_prefill": false}``, ``stream: false``, no
  ``stream_options``, one output token (``max_tokens: 1``, and ``max_completion_tokens: 1`` when the
  request uses that field), no ``min_tokens`` / ``min_completion_tokens`` (P does not support them),
  ``n: 1``, and the same ``X-Request-Id`` header as leg 2.
* **P's reply**: a normal completion whose top-level ``kv_transfer_params`` says where the blocks
  are (``remote_engine_id``, ``remote_request_id``, ``remote_block_ids``, ``remote_host``,
  ``remote_port``, ``tp_size``, ..., ``transfer_mode``). P returns it only when the one-token
  request ended normally; otherwise it is null and D would recompute silently.
* **Leg 2, to the decode replica D**: the client's request unchanged, plus P's
  ``kv_transfer_params`` verbatim, except ``remote_host`` when P reported a loopback name
  (vLLM's ``VLLM_NIXL_SIDE_CHANNEL_HOST`` defaults to ``localhost``): then P's address as the
  router reaches it. Push mode (``transfer_mode: "push"``, NixlPushConnector) omits
  ``remote_block_ids``: P learns D's blocks from D's registration and writes them.

Everything here is pure: bytes in, bytes (or a reason) out. The I/O is in router/pd/route.py.
"""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import urlsplit

import msgspec

LEG1_PARAMS: dict[str, Any] = {"do_remote_decode": True, "do_remote_prefill": False}
# What D's NixlConnector needs to start a transfer (nixl/metadata.py: else "Got invalid
# KVTransferParams" and no transfer); push mode does without remote_block_ids.
REQUIRED_PULL = ("remote_engine_id", "remote_request_id", "remote_block_ids", "remote_host", "remote_port")
REQUIRED_PUSH = ("remote_engine_id", "remote_request_id", "remote_host", "remote_port")
LOOPBACK_HOSTS = frozenset(("localhost", "127.0.0.1", "::1", "0.0.0.0", "ip6-localhost"))
REQUEST_ID_HEADER = b"x-request-id"

_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


class HandoffError(Exception):
    """Leg 1's answer cannot feed leg 2. ``reason`` is the fallback label (``no_params``, ...)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def parse_body(body: bytes) -> dict[str, Any] | None:
    """The request as a JSON object, or None (not an object: the engine answers the 400)."""
    try:
        obj = _decoder.decode(body)
    except msgspec.DecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def prefill_body(req: dict[str, Any]) -> bytes:
    """Leg 1's body from the client's request object (not modified)."""
    out = dict(req)
    out["kv_transfer_params"] = dict(LEG1_PARAMS)
    out["stream"] = False
    out.pop("stream_options", None)
    out["max_tokens"] = 1
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    out.pop("min_tokens", None)
    out.pop("min_completion_tokens", None)
    out["n"] = 1
    return _encoder.encode(out)


def returned_params(answer: bytes) -> dict[str, Any]:
    """P's top-level ``kv_transfer_params``, checked; HandoffError(reason) when unusable."""
    try:
        obj = _decoder.decode(answer)
    except msgspec.DecodeError:
        raise HandoffError("bad_answer", "prefill answer is not JSON") from None
    if not isinstance(obj, dict):
        raise HandoffError("bad_answer", "prefill answer is not a JSON object")
    params = obj.get("kv_transfer_params")
    if not params:
        # None: P ended the request abnormally, or it has no KV connector (vLLM returns null).
        raise HandoffError("no_params", "prefill answer carries no kv_transfer_params")
    if not isinstance(params, dict):
        raise HandoffError("bad_params", "kv_transfer_params is not an object")
    if not params.get("do_remote_prefill"):
        raise HandoffError("bad_params", "kv_transfer_params.do_remote_prefill is not true")
    required = REQUIRED_PUSH if params.get("transfer_mode") == "push" else REQUIRED_PULL
    missing = [k for k in required if params.get(k) is None]
    if missing:
        raise HandoffError("bad_params", f"kv_transfer_params lacks {', '.join(missing)}")
    return params


def decode_params(params: dict[str, Any], prefill_url: str) -> dict[str, Any]:
    """P's params as D must get them: verbatim, ``remote_host`` made reachable, push trimmed."""
    out = dict(params)
    host = out.get("remote_host")
    if isinstance(host, str) and host.strip("[]").lower() in LOOPBACK_HOSTS:
        p_host = urlsplit(prefill_url).hostname
        if p_host:
            out["remote_host"] = p_host
    if out.get("transfer_mode") == "push":
        out.pop("remote_block_ids", None)
    return out


def decode_body(req: dict[str, Any], params: dict[str, Any]) -> bytes:
    """Leg 2's body: the client's request plus the handoff parameters."""
    out = dict(req)
    out["kv_transfer_params"] = params
    return _encoder.encode(out)


def with_request_id(headers: bytes) -> tuple[bytes, str]:
    """Header lines carrying one ``X-Request-Id`` for both legs: the client's, else a new one."""
    for line in headers.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == REQUEST_ID_HEADER and value.strip():
            return headers, value.strip().decode("latin-1")
    rid = uuid.uuid4().hex
    return headers + b"X-Request-Id: " + rid.encode() + b"\r\n", rid
