"""``kvrouter sim --processes P``: the replicas over P worker processes, with the same names,
addresses and output as one process; clean shutdown; a failing worker fails the whole."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from engines.sim.workers import partition, worker_args
from traces.fleetproc import PY, Proc, sim_command, wait_sim_ready

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="--processes forks")


def test_partition_is_contiguous_and_balanced() -> None:
    assert partition(16, 1) == [(0, 16)]
    assert partition(16, 4) == [(0, 4), (4, 4), (8, 4), (12, 4)]
    assert partition(5, 2) == [(0, 3), (3, 2)]
    assert partition(3, 3) == [(0, 1), (1, 1), (2, 1)]
    with pytest.raises(ValueError, match="more than the 2 replicas"):
        partition(2, 3)
    with pytest.raises(ValueError, match="invalid processes: must be >= 1"):
        partition(2, 0)
    with pytest.raises(ValueError, match="invalid n: must be >= 1"):  # as without --processes
        partition(0, 2)


def _args(**kw: object) -> argparse.Namespace:
    base = {
        "replicas": 5,
        "processes": 2,
        "first_replica": 0,
        "seed": 7,
        "port": 8001,
        "events_port": 5557,
        "replay_port": None,
        "no_events": False,
    }
    base.update(kw)
    return argparse.Namespace(**base)


def test_worker_args_keep_every_replicas_address_seed_and_name() -> None:
    w = worker_args(_args(), 3, 2)
    assert (w.processes, w.replicas, w.first_replica, w.seed) == (1, 2, 3, 10)
    assert (w.port, w.events_port, w.replay_port) == (8004, 5560, None)  # replay: events + 100, as ever
    w = worker_args(_args(port=0, events_port=0, replay_port=0), 3, 2)
    assert (w.port, w.events_port, w.replay_port) == (0, 0, 0)  # free ports stay free ports
    w = worker_args(_args(replay_port=6000), 2, 3)
    assert w.replay_port == 6002


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
async def test_replicas_over_processes_serve_and_stop_together(tmp_path: Path) -> None:
    proc = Proc(sim_command(3, profile="tiny", extra=["--processes", "2"]), "sim", tmp_path)
    try:
        found = wait_sim_ready(proc, 3, timeout=60)
        assert [r.name for r in found] == ["r0", "r1", "r2"]
        assert len({r.url for r in found}) == 3 and len({r.events for r in found}) == 3
        workers = _children(proc.p.pid)
        assert len(workers) == 2
        async with aiohttp.ClientSession() as http:
            for r in found:  # every replica answers, whichever worker runs it
                body = {"model": "tiny", "prompt": [1, 2, 3, 4, 5], "max_tokens": 3}
                async with http.post(r.url + "/v1/completions", json=body) as resp:
                    assert resp.status == 200
                    assert (await resp.json())["usage"]["completion_tokens"] == 3
        proc.signal(signal.SIGTERM)
        assert proc.p.wait(30) == 0
        for pid in workers:  # no worker outlives the command
            deadline = time.monotonic() + 10
            while os.path.exists(f"/proc/{pid}") and _state(pid) != "Z" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not os.path.exists(f"/proc/{pid}") or _state(pid) == "Z"
    finally:
        proc.stop()


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_a_worker_that_cannot_start_fails_the_whole() -> None:
    # Replica 1's port is taken: its worker exits, the other is stopped, the status is non-zero.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [PY, "-m", "router", "sim", "--replicas", "2", "--processes", "2", "--port", str(port - 1),
             "--no-events"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert out.returncode != 0
    assert "ready" not in out.stdout
    assert "kvrouter sim:" in out.stderr


def test_more_processes_than_replicas_is_refused() -> None:
    out = subprocess.run(
        [PY, "-m", "router", "sim", "--replicas", "2", "--processes", "3", "--port", "0", "--events-port", "0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and out.stderr.startswith("kvrouter sim: invalid processes")
