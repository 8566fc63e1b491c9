"""A fake Kubernetes API server for discovery tests: aiohttp on 127.0.0.1, real object JSON.

Serves LIST and WATCH for EndpointSlices (``/apis/discovery.k8s.io/v1/namespaces/NS/endpointslices``)
and Pods (``/api/v1/namespaces/NS/pods``) the way kube-apiserver does where discovery cares:
  - a cluster-wide integer resourceVersion (RV) bumped by every change, rendered as a string;
  - LIST -> ``{kind: XList, metadata: {resourceVersion}, items}``, filtered by an equality-based
    ``labelSelector``;
  - WATCH (``?watch=1&resourceVersion=RV``) -> the backlog of events after RV, then live events,
    as newline-delimited JSON, ending after ``timeoutSeconds``; BOOKMARKs only when
    ``allowWatchBookmarks=true``;
  - an RV older than the compacted history -> 410 Gone, either as an ERROR event carrying a Status
    (what a real server does for watches) or as the HTTP status (``gone_as_http``);
  - ``Authorization: Bearer <token>`` checked on every request (401 + Status otherwise).
Tests drive it with add/modify/delete/bookmark/drop_watches/compact and read ``requests`` to see
exactly what the client sent (e.g. the RV a resumed watch asked for).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Obj = dict[str, Any]

RESOURCES = {
    "endpointslices": ("discovery.k8s.io/v1", "EndpointSlice"),
    "pods": ("v1", "Pod"),
}


def endpoint_slice(
    name: str,
    service: str,
    endpoints: list[tuple[str, str | None, bool | None, bool]],
    *,
    ports: dict[str, int] | None = None,
    namespace: str = "inference",
    address_type: str = "IPv4",
) -> Obj:
    """An EndpointSlice as the EndpointSlice controller writes it.

    ``endpoints``: (address, pod name or None, ready (None: omitted), terminating)."""
    ports = {"http": 8000, "kv-events": 5557} if ports is None else ports
    eps = []
    for address, pod, ready, terminating in endpoints:
        conditions: Obj = {"serving": ready is not False, "terminating": terminating}
        if ready is not None:
            conditions["ready"] = ready
        ep: Obj = {"addresses": [address], "conditions": conditions, "nodeName": "node-1", "zone": "zone-a"}
        if pod is not None:
            ep["targetRef"] = {"kind": "Pod", "name": pod, "namespace": namespace, "uid": f"uid-{pod}"}
        eps.append(ep)
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "generateName": f"{service}-",
            "namespace": namespace,
            "uid": f"uid-{name}",
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "name": service,
                    "uid": "uid-svc",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "addressType": address_type,
        "endpoints": eps,
        "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports.items()],
    }


def pod(
    name: str,
    ip: str,
    *,
    labels: dict[str, str] | None = None,
    ready: bool = True,
    phase: str = "Running",
    ports: dict[str, int] | None = None,
    annotations: dict[str, str] | None = None,
    deleting: bool = False,
    namespace: str = "inference",
) -> Obj:
    ports = {"http": 8000, "kv-events": 5557} if ports is None else ports
    meta: Obj = {
        "name": name,
        "namespace": namespace,
        "uid": f"uid-{name}",
        "labels": labels or {"app": "vllm"},
    }
    if annotations:
        meta["annotations"] = annotations
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {
            "containers": [
                {
                    "name": "vllm",
                    "image": "vllm/vllm-openai",
                    "ports": [{"name": n, "containerPort": p, "protocol": "TCP"} for n, p in ports.items()],
                }
            ]
        },
        "status": {
            "phase": phase,
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [
                {"type": "Ready", "status": "True" if ready else "False"},
                {"type": "PodScheduled", "status": "True"},
            ],
        },
    }


def _selector_matches(selector: str, labels: dict[str, str]) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k.strip()) == v.strip():
                return False
            continue
        k, sep, v = term.partition("==") if "==" in term else term.partition("=")
        if not sep:
            raise ValueError(f"fake API server: unsupported selector term {term!r}")
        if labels.get(k.strip()) != v.strip():
            return False
    return True


@dataclass
class Seen:
    path: str
    query: dict[str, str]
    authorized: bool
    status: int = 200


@dataclass(eq=False)  # identity: watchers live in a set
class _Watcher:
    resource: str
    selector: str
    bookmarks: bool
    queue: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)


class FakeApiServer:
    def __init__(self, token: str = "test-token", namespace: str = "inference") -> None:
        self.token = token
        self.namespace = namespace
        self.rv = 1000
        self.objects: dict[str, dict[str, Obj]] = {r: {} for r in RESOURCES}
        self.history: list[tuple[int, str, str, Obj]] = []  # (rv, resource, type, object)
        self.compacted_rv = 0  # watches from an RV below this get 410 Gone
        self.gone_as_http = False
        self.requests: list[Seen] = []
        self._watchers: set[_Watcher] = set()
        self._runner: web.AppRunner | None = None
        self.url = ""

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get(
            f"/apis/discovery.k8s.io/v1/namespaces/{self.namespace}/endpointslices", self._endpointslices
        )
        app.router.add_get(f"/api/v1/namespaces/{self.namespace}/pods", self._pods)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def close(self) -> None:
        self.drop_watches()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- what tests read ----------------------------------------------------------------------------

    def lists(self, resource: str = "endpointslices") -> list[Seen]:
        return [r for r in self.requests if r.path.endswith(resource) and "watch" not in r.query]

    def watches(self, resource: str = "endpointslices") -> list[Seen]:
        return [r for r in self.requests if r.path.endswith(resource) and "watch" in r.query]

    @property
    def open_watches(self) -> int:
        return len(self._watchers)

    # -- mutations ----------------------------------------------------------------------------------

    def _emit(self, resource: str, kind: str, obj: Obj) -> None:
        self.rv += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.history.append((self.rv, resource, kind, obj))
        if kind == "DELETED":
            self.objects[resource].pop(obj["metadata"]["name"], None)
        else:
            self.objects[resource][obj["metadata"]["name"]] = obj
        line = json.dumps({"type": kind, "object": obj}).encode() + b"\n"
        for w in self._watchers:
            if w.resource == resource and _selector_matches(w.selector, obj["metadata"].get("labels", {})):
                w.queue.put_nowait(line)

    def add(self, obj: Obj, resource: str = "endpointslices") -> int:
        self._emit(resource, "ADDED", obj)
        return self.rv

    def modify(self, obj: Obj, resource: str = "endpointslices") -> int:
        self._emit(resource, "MODIFIED", obj)
        return self.rv

    def delete(self, name: str, resource: str = "endpointslices") -> int:
        self._emit(resource, "DELETED", self.objects[resource][name])
        return self.rv

    def bump(self, n: int = 1) -> int:
        """Changes elsewhere in the cluster: the RV moves, no watcher of ours sees an event."""
        self.rv += n
        return self.rv

    def bookmark(self) -> int:
        """Send every bookmark-enabled watcher a BOOKMARK at a newer RV (after unrelated changes)."""
        self.bump()
        for w in self._watchers:
            if w.bookmarks:
                api_version, kind = RESOURCES[w.resource]
                obj = {"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": str(self.rv)}}
                w.queue.put_nowait(json.dumps({"type": "BOOKMARK", "object": obj}).encode() + b"\n")
        return self.rv

    def drop_watches(self) -> None:
        """Cut every open watch connection mid-stream (no clean end of the chunked body)."""
        for w in self._watchers:
            w.queue.put_nowait(None)

    def compact(self) -> int:
        """Forget history up to the current RV: watches from any older RV now get 410 Gone."""
        self.compacted_rv = self.rv
        self.history = [h for h in self.history if h[0] > self.rv]
        return self.rv

    # -- handlers -----------------------------------------------------------------------------------

    async def _endpointslices(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "endpointslices")

    async def _pods(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "pods")

    @staticmethod
    def _status(code: int, reason: str, message: str) -> Obj:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        }

    async def _serve(self, request: web.Request, resource: str) -> web.StreamResponse:
        authorized = request.headers.get("Authorization") == f"Bearer {self.token}"
        seen = Seen(request.path, dict(request.query), authorized)
        self.requests.append(seen)
        if not authorized:
            seen.status = 401
            return web.json_response(self._status(401, "Unauthorized", "Unauthorized"), status=401)
        selector = request.query.get("labelSelector", "")
        api_version, kind = RESOURCES[resource]
        if request.query.get("watch") not in ("1", "true"):
            items = [
                o
                for o in self.objects[resource].values()
                if _selector_matches(selector, o["metadata"].get("labels", {}))
            ]
            return web.json_response(
                {
                    "kind": f"{kind}List",
                    "apiVersion": api_version,
                    "metadata": {"resourceVersion": str(self.rv)},
                    "items": items,
                }
            )

        since = int(request.query["resourceVersion"])
        if since < self.compacted_rv:
            message = f"too old resource version: {since} ({self.compacted_rv})"
            if self.gone_as_http:
                seen.status = 410
                return web.json_response(self._status(410, "Expired", message), status=410)
            resp = web.StreamResponse()
            resp.content_type = "application/json"
            await resp.prepare(request)
            await resp.write(
                json.dumps({"type": "ERROR", "object": self._status(410, "Expired", message)}).encode()
                + b"\n"
            )
            await resp.write_eof()
            return resp

        watcher = _Watcher(resource, selector, request.query.get("allowWatchBookmarks") == "true")
        for rv, res, typ, obj in self.history:
            if (
                rv > since
                and res == resource
                and _selector_matches(selector, obj["metadata"].get("labels", {}))
            ):
                watcher.queue.put_nowait(json.dumps({"type": typ, "object": obj}).encode() + b"\n")
        resp = web.StreamResponse()
        resp.content_type = "application/json"
        await resp.prepare(request)
        self._watchers.add(watcher)
        deadline = asyncio.get_running_loop().time() + int(request.query.get("timeoutSeconds", "1800"))
        try:
            while True:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                try:
                    line = await asyncio.wait_for(watcher.queue.get(), remaining)
                except TimeoutError:
                    break
                if line is None:
                    # A network cut: close the socket without finishing the chunked body.
                    if request.transport is not None:
                        request.transport.abort()
                    return resp
                await resp.write(line)
        finally:
            self._watchers.discard(watcher)
        with contextlib.suppress(ConnectionError):
            await resp.write_eof()
        return resp
