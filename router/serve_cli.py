"""`kvrouter serve`: placeholder until the proxy lands (replaced in the next commit)."""

from __future__ import annotations

import argparse
from typing import Any


def register_serve(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("serve", help="run the router")
    p.set_defaults(func=lambda _a: 0)
