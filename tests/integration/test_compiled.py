"""The compiled build (setup.py, mypyc): every listed module builds and imports as an extension,
and the request-path tests pass against it: the proxy, fast path, routing, index and scoring
tests run from the compiled copy, so real routers started by them run the compiled code."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools.build_compiled import ROOT, STAMP, build

pytestmark = pytest.mark.slow

# The tests that cover the compiled modules: unit tests of the pure parts, and integration tests
# that start routers and fake or simulated engines on loopback. The aiohttp-served variants are
# left out ("not aiohttp"): the same compiled generate/proxy code runs behind the fast path, and
# the pair would double the minute this costs.
REQUEST_PATH_TESTS = [
    "tests/router",
    "tests/integration/test_fastpath.py",
    "tests/integration/test_proxy.py",
    "tests/integration/test_cache_aware.py",
    "tests/reliability/test_bad_input.py",
]


def compiled_modules() -> list[str]:
    """The module names setup.py compiles, read from its ``COMPILED`` list."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "COMPILED" for t in node.targets
        ):
            paths = ast.literal_eval(node.value)
            return [p.removesuffix(".py").replace("/", ".") for p in paths]
    raise AssertionError("setup.py has no COMPILED list")


@pytest.fixture(scope="module")
def compiled_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("compiled") / "kvrouter")


def _run(tree: Path, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS")}
    return subprocess.run(
        [sys.executable, *args], cwd=tree, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_every_listed_module_is_an_extension(compiled_tree: Path) -> None:
    mods = compiled_modules()
    assert "router.http.fastpath" in mods and "router.scoring.fused" in mods
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}:\n"
        "    f = importlib.import_module(m).__file__\n"
        "    print(m, f)\n"
        "    assert f.endswith('.so'), (m, f)\n"
        "from router.http.app import build_kind\n"
        "assert build_kind() == 'compiled'\n"
    )
    out = _run(compiled_tree, ["-c", code], 60)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert out.stdout.count(".so") == len(mods)


def test_this_tree_runs_its_own_build() -> None:
    from router.http.app import build_kind

    # a checkout is pure Python (the compiled copy is built apart); a compiled copy, which
    # build() stamps, runs its extensions
    assert build_kind() == ("compiled" if (ROOT / STAMP).exists() else "python")


def test_request_path_suite_passes_compiled(compiled_tree: Path) -> None:
    args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not vllm", "-k", "not aiohttp"]
    args += REQUEST_PATH_TESTS
    out = _run(compiled_tree, args, 600)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert " passed" in out.stdout
