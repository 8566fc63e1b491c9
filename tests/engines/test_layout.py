"""The sim's dependency rules, read from the source: the engine model is pure and imports nothing
of the replica around it, and the router's wire schema is imported in one place."""

from __future__ import annotations

import ast
from pathlib import Path

SIM = Path(__file__).resolve().parents[2] / "engines" / "sim"

# The one sim module that imports router.kv.wire, and the one lazy exception: the HF tokenizer
# is the router's, so the sim and the router tokenize alike (optional 'tokenizers' dependency).
ROUTER_IMPORTS = {
    "wire.py": {"router.kv.wire"},
    "replica/tokenizer.py": {"router.tokenizer"},
}
# What the pure model may not touch: I/O, clocks, asyncio, and the replica runtime around it.
MODEL_FORBIDDEN = ("asyncio", "aiohttp", "zmq", "time", "socket", "prometheus_client")


def _imports(path: Path) -> set[str]:
    """Absolute module names imported anywhere in ``path`` (relative ones resolved)."""
    package = path.relative_to(SIM.parents[1]).with_suffix("").parts[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                out.add(".".join((*base, node.module) if node.module else base))
            elif node.module is not None:
                out.add(node.module)
    return out


def test_only_wire_imports_the_router() -> None:
    for path in sorted(SIM.rglob("*.py")):
        rel = path.relative_to(SIM).as_posix()
        router = {m for m in _imports(path) if m == "router" or m.startswith("router.")}
        assert router <= ROUTER_IMPORTS.get(rel, set()), f"{rel} imports {sorted(router)}"


def test_the_model_is_pure() -> None:
    for path in sorted((SIM / "model").glob("*.py")):
        for mod in _imports(path):
            top = mod.split(".")[0]
            assert top not in MODEL_FORBIDDEN, f"model/{path.name} imports {mod}"
            assert not mod.startswith(("engines.sim.replica", "engines.sim.fleet", "engines.sim.cli")), (
                f"model/{path.name} imports {mod}"
            )


def test_the_runtime_does_not_import_its_http_api() -> None:
    assert "engines.sim.replica.http_api" not in _imports(SIM / "replica" / "runtime.py")
