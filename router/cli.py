"""`kvrouter` command line: a thin layer from flags to Config (like uvicorn's main.py).

`serve` lives here. Other subcommands (`sim`, `trace`, `replay`, `simulate`) are registered by the
packages that own them through the ``kvrouter.commands`` entry-point group, so router/ never
imports engines/ or traces/ and a router-only install still has a working `kvrouter serve`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points

Register = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvrouter", description="Cache-aware router for vLLM fleets")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    from .serve_cli import register_serve

    register_serve(sub)
    for ep in sorted(entry_points(group="kvrouter.commands"), key=lambda e: e.name):
        try:
            register: Register = ep.load()
        except (ImportError, AttributeError) as exc:  # optional part missing: say so, keep the rest
            p = sub.add_parser(ep.name, help=f"(unavailable: {exc})")
            p.set_defaults(func=lambda _a, _e=exc: _unavailable(_e))
            continue
        register(sub)
    return parser


def _unavailable(exc: Exception) -> int:
    print(f"kvrouter: this command is unavailable: {exc}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return int(func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
