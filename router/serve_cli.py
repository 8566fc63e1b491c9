"""`kvrouter serve`: flags -> Config -> the router process (or a supervisor of N workers).

Flags, ``KVROUTER_*`` variables and ``--config`` YAML come from one table (config.OPTIONS).
With ``--workers N`` the supervisor forks N workers that share the port through SO_REUSEPORT; each
worker keeps its own index, and they stay coherent the same way separate router replicas do:
every worker subscribes to every engine's KV events (precise entries converge), and the engines'
own running/waiting metrics carry the load the other workers put on them (docs/scale-out.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from .config import OPTIONS, Config, ConfigError, build_config, load_yaml, parse_bool


def _bool(value: str) -> bool:
    try:
        return parse_bool(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc}, got {value!r}") from None


def add_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config file (flags and KVROUTER_* override it)")
    for opt in OPTIONS:
        dest = opt.flag.replace("-", "_")
        help_ = f"{opt.help} [env {opt.env}]"
        if opt.kind == "list":
            p.add_argument(f"--{opt.flag}", dest=dest, action="append", default=None, help=help_)
        elif opt.kind == "bool":
            p.add_argument(
                f"--{opt.flag}", dest=dest, nargs="?", const=True, type=_bool, default=None, help=help_
            )
        else:
            convs: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "json": json.loads}
            conv = convs.get(opt.kind, str)
            p.add_argument(f"--{opt.flag}", dest=dest, type=conv, default=None, help=help_)


def register_serve(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "serve",
        help="run the router (OpenAI-compatible reverse proxy)",
        description="Cache-aware OpenAI-compatible proxy in front of vLLM replicas.",
    )
    add_config_flags(p)
    p.add_argument("--print-config", action="store_true", help="print the effective config as YAML and exit")
    p.set_defaults(func=run_serve)


def config_from_args(args: argparse.Namespace, env: dict[str, str] | None = None) -> Config:
    flags = {opt.flag: getattr(args, opt.flag.replace("-", "_"), None) for opt in OPTIONS}
    tree = load_yaml(args.config) if getattr(args, "config", None) else None
    return build_config(tree, os.environ if env is None else env, flags)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run_serve(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        print(f"kvrouter: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        from .config import config_to_yaml

        print(config_to_yaml(cfg), end="")
        return 0
    if not (cfg.backends or cfg.discovery.enabled_sources()):
        print(
            "kvrouter: invalid configuration: backends=[]: give --backend URL (or KVROUTER_BACKEND) "
            "or a discovery source (--dns-name, --k8s-service)",
            file=sys.stderr,
        )
        return 2
    setup_logging(cfg.server.log_level)
    if cfg.server.workers > 1:
        return _supervise(cfg)
    return _run_one(cfg)


def _run_one(cfg: Config) -> int:
    from .http.app import serve

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a hard dependency on Linux/macOS
        return asyncio.run(serve(cfg))
    return int(uvloop.run(serve(cfg)))


def _supervise(cfg: Config) -> int:
    """Fork ``workers`` processes on one SO_REUSEPORT port; forward SIGTERM/SIGINT; reap."""
    children: list[int] = []
    for _ in range(cfg.server.workers):
        pid = os.fork()
        if pid == 0:  # child
            try:
                code = _run_one(cfg)
            except BaseException:
                logging.getLogger("kvrouter").exception("worker crashed")
                code = 1
            os._exit(code)
        children.append(pid)

    def forward(signum: int, _frame: object) -> None:
        for pid in children:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    worst = 0
    for pid in children:
        _, status = os.waitpid(pid, 0)
        worst = max(worst, os.waitstatus_to_exitcode(status))
    return worst
