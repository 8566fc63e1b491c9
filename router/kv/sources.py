"""Where a replica publishes its KV events: resolve vLLM's advertised endpoints to connectable ones."""

from __future__ import annotations

from typing import Any, NamedTuple
from urllib.parse import urlsplit

import msgspec

from router.kv.decode import DECODE_FAILURES
from router.kv.wire import publisher_binds


class EventSource(NamedTuple):
    endpoint: str  # what the router's SUB socket connects to (or binds, when ``bind``)
    replay_endpoint: str | None
    topic: str
    bind: bool  # engine connects (concrete host in its config): the router must bind


def _is_wildcard(host: str) -> bool:
    return host in ("*", "0.0.0.0", "::", "[::]", "")


def _swap_host(endpoint: str, host: str) -> str:
    """``tcp://*:5557`` -> ``tcp://<host>:5557``; other transports and concrete hosts unchanged."""
    if not endpoint.startswith("tcp://"):
        return endpoint
    rest = endpoint[len("tcp://") :]
    addr, sep, port = rest.rpartition(":")
    if not sep or not _is_wildcard(addr):
        return endpoint
    return f"tcp://{host}:{port}"


def _rank(value: object, default: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return default


def resolve_event_source(replica_url: str, kv_event_sources_json: str | bytes | object) -> list[EventSource]:
    """Endpoints to subscribe to, from a replica's ``GET /kv_event_sources`` body.

    Accepts vLLM 0.32's ``{"0": {"endpoint", "replay_endpoint", "topic", ...}}`` (one entry per
    DP rank, already port-offset), the bare list ``[{"data_parallel_rank": 0, "endpoint": ...}]``
    of newer vLLM, or one such object, as JSON text or already parsed. vLLM binds its PUB when
    the endpoint contains ``*`` or ``::`` or is ipc/inproc (``kv_wire.publisher_binds``): we
    connect, to the replica's host in place of a wildcard. Otherwise (a concrete host, and also
    ``0.0.0.0``) vLLM connects to that address: we bind it. The replay ROUTER always binds on the
    engine, so we connect to it (wildcards, ``0.0.0.0`` included, become the replica's host).
    Ordered by DP rank; inproc skipped.
    """
    data: object = kv_event_sources_json
    if isinstance(data, str | bytes):
        try:
            data = msgspec.json.decode(data)
        except DECODE_FAILURES as exc:
            raise ValueError(f"kv_event_sources is not JSON: {exc}") from exc
    entries: list[tuple[int, dict[str, Any]]] = []
    if isinstance(data, dict) and "endpoint" in data:
        entries.append((_rank(data.get("data_parallel_rank"), 0), data))
    elif isinstance(data, dict):
        for k, v in data.items():
            if isinstance(v, dict):
                entries.append((_rank(k, _rank(v.get("data_parallel_rank"), 0)), v))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            if isinstance(v, dict):
                entries.append((_rank(v.get("data_parallel_rank"), i), v))
    else:
        raise ValueError(f"kv_event_sources: expected an object or a list, got {type(data).__name__}")
    host = urlsplit(replica_url).hostname
    if not host:
        raise ValueError(f"replica_url has no host (current value: {replica_url!r})")
    if ":" in host:
        host = f"[{host}]"
    out: list[EventSource] = []
    for _, e in sorted(entries, key=lambda x: x[0]):
        ep = e.get("endpoint")
        if not isinstance(ep, str) or not ep or ep.startswith("inproc://"):
            continue
        replay = e.get("replay_endpoint")
        replay_ep = _swap_host(replay, host) if isinstance(replay, str) and replay else None
        topic = e.get("topic")
        topic = topic if isinstance(topic, str) else ""
        if publisher_binds(ep):  # the engine binds: connect to it on the replica's host
            out.append(EventSource(_swap_host(ep, host), replay_ep, topic, False))
        else:  # the engine connects to this address: bind it as given
            out.append(EventSource(ep, replay_ep, topic, True))
    return out
