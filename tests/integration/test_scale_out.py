"""Scale-out: router processes that follow the same engines' KV events agree on the index,
including one that joins late (it backfills from the engines' replay sockets)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.support.procs import RouterProc, SimFleet, http


def _confirmed(router: RouterProc) -> dict[str, list[int]]:
    rows = json.loads(http("GET", router.url + "/debug/replicas")[2])["replicas"]
    return {r["id"]: r["index_confirmed"] for r in rows}


def test_two_routers_agree_after_the_same_events(tmp_path: Path) -> None:
    fleet = SimFleet(tmp_path, 2)
    common = ("--enable-debug", "--kv-events", "auto", "--policy", "cache_aware")
    a = RouterProc(tmp_path, fleet.urls, *common, name="router-a")
    b = RouterProc(tmp_path, fleet.urls, *common, name="router-b")
    try:
        # Traffic goes through router A only: B learns about it from the engines' events alone.
        for i in range(12):
            prompt = [7 + i % 4] * 64 + list(range(i * 100, i * 100 + 40))
            code, _, _ = http(
                "POST", a.url + "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 2}
            )
            assert code == 200
        late = RouterProc(tmp_path, fleet.urls, *common, name="router-late")
        try:
            deadline = time.monotonic() + 10
            views: list[dict[str, list[int]]] = []
            while time.monotonic() < deadline:
                views = [_confirmed(r) for r in (a, b, late)]
                if views[0] == views[1] == views[2] and all(v[0] > 0 for v in views[0].values()):
                    break
                time.sleep(0.1)
            assert views[0] == views[1], views
            assert views[0] == views[2], f"late joiner did not backfill: {views}"
            assert sum(v[0] for v in views[0].values()) > 0
        finally:
            late.proc.stop()
    finally:
        for p in (a.proc, b.proc, fleet.proc):
            p.stop()
