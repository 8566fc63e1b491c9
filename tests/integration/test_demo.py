"""`python -m traces.demo`, shortened: real sim fleet + two kvrouter processes + replay, end to end.

Uses a small synthetic chat trace (sessions that grow turn by turn) instead of the bundled slice,
whose first few dozen requests share only a system-prompt block: with real conversation reuse,
cache_aware must find at least as many cached tokens as round robin.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from traces.generators import generate
from traces.loaders import write_trace

ROOT = Path(__file__).resolve().parents[2]


def _chat_trace(path: Path) -> None:
    trace = generate(
        "chat",
        sessions=16,
        turns_mean=4.0,
        rate=4.0,
        think_time_s=1.0,
        user_tokens_mean=400.0,
        answer_tokens_mean=20.0,
        system_tokens=64,
        seed=1,
    )
    write_trace(trace, str(path))


def _demo(out: Path, trace: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "traces.demo",
        "--out",
        str(out),
        "--trace",
        str(trace),
        "--replicas",
        "2",
        "--max-requests",
        "40",
        "--speedup",
        "4",
        "--grace",
        "10",
        *extra,
    ]


@pytest.mark.slow
def test_short_demo_end_to_end(tmp_path: Path) -> None:
    trace = tmp_path / "chat.jsonl"
    _chat_trace(trace)
    out = tmp_path / "demo"
    t = time.monotonic()
    r = subprocess.run(_demo(out, trace), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]
    assert time.monotonic() - t < 30
    assert re.search(r"^round_robin\s+\d+/\d+", r.stdout, re.M) and re.search(
        r"^cache_aware\s+\d+/\d+", r.stdout, re.M
    )
    for name in (
        "report.md",
        "report.json",
        "summary.json",
        "round_robin.jsonl",
        "cache_aware.jsonl",
        "ttft_cdf.png",
        "hit_ratio.png",
        "load_over_time.png",
    ):
        assert (out / name).stat().st_size > 0, name
    data = json.loads((out / "report.json").read_text())
    rr, ca = data["targets"]["round_robin"], data["targets"]["cache_aware"]
    assert rr["errors"] == 0 and ca["errors"] == 0 and rr["requests"] == ca["requests"] > 30
    assert ca["engine_hit_ratio"] >= rr["engine_hit_ratio"] > 0
    assert ca["hit_ratio"] >= rr["hit_ratio"]
    # Both replicas served both policies (the engine counters saw every request).
    assert sum(rr["engine"]["requests_per_replica"].values()) == rr["requests"]


def _refused(url: str) -> bool:
    try:
        urllib.request.urlopen(url + "/health", timeout=1)
    except urllib.error.HTTPError:
        return False
    except OSError:
        return True
    return False


@pytest.mark.slow
def test_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    trace = tmp_path / "chat.jsonl"
    _chat_trace(trace)
    p = subprocess.Popen(
        _demo(tmp_path / "demo", trace, "--speedup", "0.5"),
        cwd=ROOT,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    urls: list[str] = []
    try:
        assert p.stderr is not None
        deadline = time.monotonic() + 30
        for line in p.stderr:
            urls += re.findall(r"(http://127\.0\.0\.1:\d+)", line)
            if line.startswith("replaying") or time.monotonic() > deadline:
                break
        assert len(urls) >= 4  # 2 replicas, 2 routers (+ the replay target line)
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=20) == 130
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    for u in set(urls):
        assert _refused(u), f"{u} still answering after Ctrl-C"
