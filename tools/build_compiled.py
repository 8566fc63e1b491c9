"""Build the compiled kvrouter (setup.py, mypyc) into a copy of this checkout.

The copy keeps the development tree pure Python: an extension module next to its ``.py`` wins
the import, so compiling in place would run stale code after every edit. The copy holds the
sources, tests and tools, and the extensions built in place; ``python -m router`` or pytest run
from it import the compiled modules. A stamp of the sources' hash skips rebuilding an unchanged
tree.

    python tools/build_compiled.py [--dest .cache/compiled]      # make compiled
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("router", "engines", "traces", "tests", "tools", "docs", "pyproject.toml", "setup.py", "README.md")
# Never copied nor hashed: caches and build outputs (an old extension would shadow its source)
_IGNORED = ("__pycache__", "*.so", "*.pyc", ".pytest_cache", ".mypy_cache")
STAMP = ".compiled-sources"


def sources_digest(root: Path = ROOT) -> str:
    """Hash of every file the build copies (content and path), so a stale build is never reused."""
    h = hashlib.sha256()
    for name in COPIED:
        top = root / name
        files = [top] if top.is_file() else sorted(top.rglob("*"))
        for f in files:
            parts = f.relative_to(root).parts
            if f.is_file() and not any(fnmatch(p, pat) for p in parts for pat in _IGNORED):
                h.update(str(f.relative_to(root)).encode())
                h.update(f.read_bytes())
    return h.hexdigest()


def build(dest: Path, python: str = sys.executable, quiet: bool = True) -> Path:
    """Copy the checkout to ``dest`` and compile it there; returns ``dest``."""
    digest = sources_digest()
    stamp = dest / STAMP
    if stamp.exists() and stamp.read_text() == digest:
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns(*_IGNORED))
        else:
            shutil.copy2(src, dest / name)
    env = {**os.environ, "KVROUTER_COMPILE": "1"}
    cmd = [python, "setup.py", "build_ext", "--inplace", "--parallel", str(os.cpu_count() or 1)]
    out = subprocess.run(cmd, cwd=dest, env=env, capture_output=quiet, text=True)
    if out.returncode != 0:
        tail = (out.stdout or "")[-3000:] + (out.stderr or "")[-3000:]
        raise RuntimeError(f"compiled build failed ({' '.join(cmd)} in {dest}):\n{tail}")
    stamp.write_text(digest)
    return dest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", type=Path, default=ROOT / ".cache" / "compiled")
    ap.add_argument("--verbose", action="store_true", help="show the compiler's output")
    args = ap.parse_args()
    print(build(args.dest.resolve(), quiet=not args.verbose))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
