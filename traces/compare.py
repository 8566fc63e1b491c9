"""``make compare``: kvrouter against the SGLang and vLLM routers on the same simulated fleet and trace.

    python -m traces.compare --out reports/compare [--replicas 4] [--max-requests 750] [--speedup 5] ...

Targets, replayed one after another against the same ``kvrouter sim`` replicas with every
prefix cache reset in between:

- ``kvrouter`` (cache_aware) and ``kvrouter-rr`` (round_robin, the baseline a cache-aware router must beat);
- ``sglang-router`` (pip ``sglang-router``, ``python -m sglang_router.launch_router --policy cache_aware``);
- ``vllm-router`` (pip ``vllm-router``, ``vllm-router --policy cache_aware``);
- ``direct-r0``: every request straight to replica 0, no router (what one replica does with the
  whole load; it overloads, which is the point: the value of spreading at all).

The peers live in their own virtualenv (``.venv-peers``, created here if missing) so their
dependencies never touch ours. A peer that cannot be installed, started or used is reported with
its error in the report's notes, and the rest of the comparison still runs.

Prompts are **text** by default: the SGLang router's ``/v1/completions`` accepts a string or a list
of strings only (token-id prompts get HTTP 422), and every target gets the same bytes. The sim
tokenizes the text; shared words are shared tokens (traces/synth.py). The sim's built-in
tokenizer makes each word *and* each space a token, so a text prompt is about twice the trace's
``input_length`` in tokens: the sim therefore runs twice as fast by default (time scale
2 x speed-up / load), which keeps the work per request, in wall time, close to the token-mode demo,
and accepts 256k-token contexts so the slice's longest conversation still fits.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .demo import _sigterm, effective_time_scale, fleet_arguments, log, run_replay, start_fleet
from .fleetproc import (
    PEERS_VENV,
    Proc,
    ProcGroup,
    ensure_peers_venv,
    start_kvrouter,
    start_sglang_router,
    start_vllm_router,
)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m traces.compare", description=__doc__.split("\n")[0])
    fleet_arguments(p, speedup=5.0, max_requests=750)
    p.set_defaults(prompt="text")
    p.add_argument("--peers-venv", default=str(PEERS_VENV), help="virtualenv holding the peer routers")
    p.add_argument("--no-install", action="store_true", help="do not create the peers' virtualenv")
    p.add_argument("--targets", default="kvrouter,sglang-router,vllm-router,kvrouter-rr,direct-r0",
                   help="which targets, in order (comma-separated)")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    from .replay import Target

    t_start = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    group = ProcGroup(out / "logs")
    notes: list[str] = []
    wanted = [x.strip() for x in args.targets.split(",") if x.strip()]
    venv = Path(args.peers_venv)
    peers_error: str | None = None
    if {"sglang-router", "vllm-router"} & set(wanted):
        if args.no_install and not (venv / "bin" / "python").exists():
            peers_error = f"{venv} does not exist and --no-install was given"
        elif not args.no_install:
            log(f"checking the peer routers in {venv} (installing them the first time) ...")
            peers_error = ensure_peers_venv(venv)
        if peers_error:
            notes.append(f"peer routers unavailable: {peers_error}")
            log(notes[-1])
    try:
        if args.time_scale is None and args.prompt == "text":
            args.time_scale = 2 * args.speedup / args.load  # ~2 sim tokens per trace token in text mode
        urls = start_fleet(group, args, sim_extra=["--max-model-len", "262144"])
        starters: dict[str, Callable[[], tuple[Proc, str]]] = {
            "kvrouter": lambda: start_kvrouter(group, urls, "cache_aware", name="kvrouter"),
            "kvrouter-rr": lambda: start_kvrouter(group, urls, "round_robin", name="kvrouter-rr"),
            "sglang-router": lambda: start_sglang_router(group, urls, venv=venv),
            "vllm-router": lambda: start_vllm_router(group, urls, venv=venv),
        }
        targets = []
        for name in wanted:
            if name == "direct-r0":
                targets.append(Target(name=name, url=urls[0]))
                continue
            if name not in starters:
                log(f"unknown target {name!r} (known: {', '.join([*starters, 'direct-r0'])})")
                return 2
            if name in ("sglang-router", "vllm-router") and peers_error:
                continue
            try:
                _, url = starters[name]()
            except (RuntimeError, TimeoutError, OSError) as exc:
                notes.append(f"{name} did not start: {str(exc)[-1500:]}")
                log(notes[-1])
                continue
            log(f"{name} on {url}")
            targets.append(Target(name=name, url=url))
        notes += [
            f"{args.replicas} x `kvrouter sim --profile {args.profile} --time-scale {effective_time_scale(args):.3g}`, "
            f"{args.kv_tokens:,} KV tokens per replica (block size {args.block_size}); prompts as {args.prompt}"
            + (" (about 2 sim tokens per trace token, hence a time scale of 2 x speed-up / load)."
               if args.prompt == "text" else "."),
            "Prefix caches reset (POST /reset_prefix_cache) on every replica before each target.",
            "Targets without an x-kvrouter-replica header get their load spread from the engines' "
            "vllm:request_success_total deltas.",
        ]
        summary = run_replay(args, targets, urls, "kvrouter vs SGLang router vs vLLM router", notes)
        for name, s in summary["targets"].items():
            if s["errors"]:
                log(f"note: {name} had {s['errors']} failed requests (see report.md, 'Errors')")
    except KeyboardInterrupt:
        log("interrupted: stopping every process")
        return 130
    except (RuntimeError, TimeoutError, OSError) as exc:
        log(f"compare failed: {exc}")
        return 1
    finally:
        group.close()
    log(f"compare done in {time.monotonic() - t_start:.0f} s; logs in {out / 'logs'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
