"""traces.fleetproc's sim launcher: the command line it builds and the ``replica ...``/``ready``
lines it waits for (a stand-in process prints them; no simulator is started)."""

from __future__ import annotations

from pathlib import Path

import pytest

from traces.fleetproc import PY, Proc, SimReplica, sim_command, wait_sim_ready


def test_sim_command_defaults() -> None:
    assert sim_command(2, profile="tiny") == [
        PY,
        "-m",
        "router",
        "sim",
        "--replicas",
        "2",
        "--port",
        "0",
        "--events-port",
        "0",
        "--profile",
        "tiny",
    ]


def test_sim_command_prefix_first_extra_last() -> None:
    cmd = sim_command(
        16,
        profile="h100-llama3-8b",
        time_scale=10.0,
        extra=["--stream-interval", "4"],
        prefix=["taskset", "-c", "1"],
    )
    assert cmd == [
        "taskset",
        "-c",
        "1",
        PY,
        "-m",
        "router",
        "sim",
        "--replicas",
        "16",
        "--port",
        "0",
        "--events-port",
        "0",
        "--profile",
        "h100-llama3-8b",
        "--time-scale",
        "10.0",
        "--stream-interval",
        "4",
    ]


def _printer(tmp_path: Path, lines: list[str], then_sleep: bool = True) -> Proc:
    code = "import time\n" + "".join(f"print({line!r}, flush=True)\n" for line in lines)
    if then_sleep:
        code += "time.sleep(30)\n"
    return Proc([PY, "-c", code], "fake-sim", tmp_path)


def test_wait_sim_ready_parses_replicas(tmp_path: Path) -> None:
    proc = _printer(
        tmp_path,
        [
            "INFO something first",
            "replica r0 url=http://127.0.0.1:4001 events=tcp://127.0.0.1:5001 replay=tcp://127.0.0.1:5101",
            "replica r1 url=http://127.0.0.1:4002 events=None replay=None",
            "ready",
        ],
    )
    try:
        assert wait_sim_ready(proc, 2, timeout=10) == [
            SimReplica("r0", "http://127.0.0.1:4001", "tcp://127.0.0.1:5001"),
            SimReplica("r1", "http://127.0.0.1:4002", "None"),
        ]
    finally:
        proc.stop()


def test_wait_sim_ready_stops_on_wrong_count(tmp_path: Path) -> None:
    proc = _printer(tmp_path, ["replica r0 url=http://127.0.0.1:4001 events=None replay=None", "ready"])
    with pytest.raises(RuntimeError, match="printed 1 replica lines, expected 2"):
        wait_sim_ready(proc, 2, timeout=10)
    assert not proc.alive()


def test_wait_sim_ready_reports_exit(tmp_path: Path) -> None:
    proc = _printer(tmp_path, ["boom"], then_sleep=False)
    with pytest.raises(RuntimeError, match="fake-sim exited with 0"):
        wait_sim_ready(proc, 1, timeout=10)
