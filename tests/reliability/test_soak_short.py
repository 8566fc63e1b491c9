"""A 12-second run of tests/soak/soak.py (the full one is `make soak`): same fleet, faults and
classification, and its last line must report lost=0."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_short_soak_loses_nothing() -> None:
    env = {**os.environ, "SOAK_SECONDS": "12", "SOAK_FAULT_EVERY": "1.5", "SOAK_CONCURRENCY": "4"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests/soak/soak.py")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    m = re.fullmatch(
        r"soak: sent=(\d+) ok=(\d+) failed_clean=(\d+) lost=(\d+) p99_ms=\d+ "
        r"rss_mb=\d+->\d+ peak_rss_mb=\d+ fds=\d+->\d+",
        last,
    )
    assert m, out.stdout[-2000:] + out.stderr[-2000:]
    sent, ok, failed_clean, lost = map(int, m.groups())
    assert lost == 0 and out.returncode == 0, out.stdout[-2000:]
    assert sent == ok + failed_clean and ok > 0
