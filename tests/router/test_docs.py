"""Docs generated from code stay in step with it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_configuration_doc_is_generated_from_options() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_config_doc.py")],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},  # the checkout's packages, installed or not
    ).stdout
    assert (ROOT / "docs" / "configuration.md").read_text() == out, (
        "run: python tools/gen_config_doc.py > docs/configuration.md"
    )
