"""`make lint` fails on a formatting error and on a forbidden import, and passes on a clean tree.

The commands are the Makefile's own (``make -n lint``), run over a small package tree in a temporary
folder with this repository's pyproject.toml (ruff settings, import contracts, mypy settings), so a
change to either the Makefile or the contracts is what gets tested. No network; a few seconds.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PACKAGES = ("router", "engines", "traces")

pytestmark = pytest.mark.skipif(
    shutil.which("make") is None or not (BIN / "lint-imports").exists(),
    reason="needs make and import-linter (the test extra)",
)


def lint_commands(stamp: Path) -> list[str]:
    """The recipe of `make lint`, as make would run it, over the packages of the temporary tree."""
    out = subprocess.run(
        [
            "make",
            "-n",
            "-s",
            "lint",
            f"PY={sys.executable}",
            f"VENV={BIN.parent}",
            f"STAMP={stamp}",
            f"SRC={' '.join(PACKAGES)}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    cmds = [line for line in out.splitlines() if line.strip()]
    assert any("ruff format --check" in c for c in cmds), cmds
    assert any("lint-imports" in c for c in cmds), cmds
    return cmds


def allowed_router_modules() -> list[str]:
    """The router modules engines may import, read from the contract's ignore_imports."""
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    allowed: list[str] = []
    for c in contracts:
        for rule in c.get("ignore_imports", []):
            src, dst = (s.strip() for s in rule.split("->"))
            if src.startswith("engines") and dst.startswith("router."):
                allowed.append(dst)
    assert allowed, "the engines contract names no allowed router module"
    return allowed


def write_module(root: Path, dotted: str, body: str) -> None:
    parts = dotted.split(".")
    for i in range(1, len(parts)):
        init = root.joinpath(*parts[:i], "__init__.py")
        init.parent.mkdir(parents=True, exist_ok=True)
        if not init.exists():
            init.write_text(f'"""{parts[i - 1]}."""\n')
    root.joinpath(*parts[:-1], parts[-1] + ".py").write_text(body)


def clean_tree(root: Path) -> None:
    """A tree every contract keeps: engines uses exactly the router modules it is allowed."""
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    for pkg in PACKAGES:
        write_module(root, f"{pkg}.base", '"""A leaf."""\n\nVALUE = 1\n')
    allowed = allowed_router_modules()
    for mod in allowed:
        write_module(root, mod, '"""An allowed module."""\n\nVALUE = 2\n')
    imports = "".join(f"import {m}\n" for m in sorted(allowed))
    uses = " + ".join(f"{m}.VALUE" for m in sorted(allowed))
    write_module(root, "engines.user", f'"""Uses router."""\n\n{imports}\nTOTAL = {uses}\n')
    write_module(
        root,
        "traces.user",
        '"""Uses both."""\n\nimport engines.user\nimport router.base\n\n'
        "TOTAL = engines.user.TOTAL + router.base.VALUE\n",
    )


def run_lint(root: Path) -> tuple[int, str]:
    """Run the recipe like make: stop at the first failing command; (status, its output)."""
    stamp = root / ".stamp"
    stamp.touch()
    for cmd in lint_commands(stamp):
        p = subprocess.run(cmd, shell=True, cwd=root, capture_output=True, text=True, timeout=120)
        if p.returncode != 0:
            return p.returncode, cmd + "\n" + p.stdout + p.stderr
    return 0, ""


def test_lint_passes_on_a_clean_tree(tmp_path: Path) -> None:
    clean_tree(tmp_path)
    status, out = run_lint(tmp_path)
    assert status == 0, out


def test_lint_fails_on_a_formatting_error(tmp_path: Path) -> None:
    clean_tree(tmp_path)
    write_module(tmp_path, "router.ugly", '"""Badly formatted."""\n\nVALUE = { "a" :1,\n  "b":2 }\n')
    status, out = run_lint(tmp_path)
    assert status != 0
    assert "ruff format --check" in out.splitlines()[0] and "router/ugly.py" in out, out


@pytest.mark.parametrize(
    ("module", "imported"),
    [("router.bad", "engines.base"), ("router.bad", "traces.base"), ("engines.bad", "router.base")],
)
def test_lint_fails_on_a_forbidden_import(tmp_path: Path, module: str, imported: str) -> None:
    clean_tree(tmp_path)
    write_module(tmp_path, module, f'"""Breaks a rule."""\n\nimport {imported}\n\nVALUE = {imported}.VALUE\n')
    status, out = run_lint(tmp_path)
    assert status != 0
    assert "lint-imports" in out.splitlines()[0], out
    assert re.search(rf"{re.escape(module)} -> {re.escape(imported)}", out), out
