"""Responses API affinity: response id -> the replica that stored it.

vLLM keeps stored responses (``VLLM_ENABLE_RESPONSES_API_STORE=1``) in the API server's memory,
so a request with ``previous_response_id``, ``GET /v1/responses/{id}`` or
``POST /v1/responses/{id}/cancel`` must reach the replica that produced the response: any other
one answers 404. The router learns the id from the first bytes of the answer (the JSON body's
leading ``"id"``, or the ``response.created`` event of a stream) and remembers it in a bounded
LRU map.
"""

from __future__ import annotations

import re
from collections import OrderedDict

from .types import ReplicaId

DEFAULT_CAPACITY = 100_000  # ~100 B per entry: 10 MB at most

# vLLM's ids are "resp_" + a uuid hex; the first match in a body or stream is the response's own
# id (output items have "msg_", "fc_", "rs_" ids).
_ID_RE = re.compile(rb'"id"\s*:\s*"(resp_[A-Za-z0-9_-]{1,128})"')
_PATH_RE = re.compile(r"^/v1/responses/(resp_[A-Za-z0-9_-]{1,128})(?:/|$)")


class ResponseAffinity:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self._map: OrderedDict[str, ReplicaId] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._map)

    def remember(self, response_id: str, replica: ReplicaId) -> None:
        self._map[response_id] = replica
        self._map.move_to_end(response_id)
        while len(self._map) > self.capacity:
            self._map.popitem(last=False)

    def observe(self, first_bytes: bytes, replica: ReplicaId) -> None:
        """The ``on_response`` hook of a ``/v1/responses`` request."""
        m = _ID_RE.search(first_bytes, 0, 65536)
        if m is not None:
            self.remember(m.group(1).decode(), replica)

    def lookup(self, response_id: str | None) -> ReplicaId | None:
        if response_id is None:
            return None
        rid = self._map.get(response_id)
        if rid is None:
            self.misses += 1
            return None
        self.hits += 1
        self._map.move_to_end(response_id)
        return rid

    def lookup_path(self, path: str) -> ReplicaId | None:
        """``/v1/responses/{id}[/...]``: the replica holding that response, if known."""
        m = _PATH_RE.match(path)
        return self.lookup(m.group(1)) if m is not None else None

    def forget_replica(self, replica: ReplicaId) -> None:
        for k in [k for k, v in self._map.items() if v == replica]:
            del self._map[k]
