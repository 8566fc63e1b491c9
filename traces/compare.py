"""``make compare``: kvrouter against the SGLang and vLLM routers on the same simulated fleet and trace.

    python -m traces.compare --out reports/compare [--replicas 4] [--max-requests 750] [--speedup 3] ...

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

Each target runs on a fresh simulated fleet (started for it, stopped after it): cold caches, and
no leftover work, since a router need not abort an upstream request when its client gives up.

Prompts are **text** by default: the SGLang router's ``/v1/completions`` accepts a string or a list
of strings only (token-id prompts get HTTP 422), and every target gets the same bytes. A
word-level ``tokenizer.json`` over traces/synth.py's 256 words (one token per word) is written to
``--out/tokenizer`` and given to the sim and to kvrouter, so prompts keep the trace's exact token
counts. The SGLang router routes on the raw text; vllm-router 0.1.17's cache_aware asks every
replica to tokenize each text prompt (``/v1/completions/render``, else ``/tokenize``) and routes on
the token ids, which loads the single-process sim (docs/results.md, the vllm-router bullet).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .demo import (
    _sigterm,
    effective_time_scale,
    fleet_arguments,
    log,
    replay_config,
    report_result,
    start_fleet,
)
from .fleetproc import (
    PEERS_VENV,
    Proc,
    ProcGroup,
    ensure_peers_venv,
    start_kvrouter,
    start_sglang_router,
    start_vllm_router,
    write_word_tokenizer,
)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m traces.compare", description=__doc__.split("\n")[0])
    # Speed-up 3, not the demo's 5: text prompts are tokenized by the sim and by kvrouter (~25 ms
    # of CPU each for a 12k-word prompt), which at 5x starves a small machine's simulated engines.
    fleet_arguments(p, speedup=3.0, max_requests=750)
    p.set_defaults(prompt="text")
    p.add_argument("--peers-venv", default=str(PEERS_VENV), help="virtualenv holding the peer routers")
    p.add_argument("--no-install", action="store_true", help="do not create the peers' virtualenv")
    p.add_argument(
        "--targets",
        default="kvrouter,sglang-router,vllm-router,kvrouter-rr,direct-r0",
        help="which targets, in order (comma-separated)",
    )
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    from .loaders import load_trace
    from .replay import Target, TargetRun, replay, run_sync

    t_start = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    wanted = [x.strip() for x in args.targets.split(",") if x.strip()]
    unknown = set(wanted) - {*ROUTERS, "direct-r0"}
    if unknown:
        log(f"unknown targets {sorted(unknown)} (known: {', '.join([*ROUTERS, 'direct-r0'])})")
        return 2
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
    sim_extra: list[str] = []
    kv_extra: list[str] = []
    if args.prompt == "text":
        tok = write_word_tokenizer(out / "tokenizer")
        sim_extra = ["--tokenizer", str(tok / "tokenizer.json")]
        kv_extra = ["--tokenizer", str(tok)]
    trace, _ = load_trace(args.trace)
    cfg = replay_config(args)
    runs: dict[str, TargetRun] = {}
    summaries: dict[str, Any] = {}
    last: dict[str, Any] | None = None
    try:
        for name in wanted:
            if name in ("sglang-router", "vllm-router") and peers_error:
                continue
            # A fresh fleet per target: cold caches, and no request a previous router left running
            # upstream (a router need not abort upstream work when its client disconnects).
            group = ProcGroup(out / "logs" / name)
            try:
                urls = start_fleet(group, args, sim_extra=sim_extra)
                if name == "direct-r0":
                    url = urls[0]
                else:
                    _, url = ROUTERS[name](group, urls, venv, kv_extra)
                    log(f"{name} on {url}")
                last = run_sync(
                    replay(trace, [Target(name=name, url=url)], cfg, engine_urls=urls, progress=log)
                )
            except (RuntimeError, TimeoutError, OSError) as exc:
                notes.append(f"{name} failed: {str(exc)[-1500:]}")
                log(notes[-1])
                continue
            finally:
                group.close()
            runs[name] = last["runs"][name]
            summaries[name] = last["summary"]["targets"][name]
        if last is None:
            log("no target ran")
            return 1
        notes += [
            f"Each target on a fresh fleet: {args.replicas} x `kvrouter sim --profile {args.profile} "
            f"--time-scale {effective_time_scale(args):.3g}`, {args.kv_tokens:,} KV tokens per replica "
            f"(block size {args.block_size}); load {args.speedup / effective_time_scale(args):.2g}x the trace "
            "on real H100s.",
            f"Prompts as {args.prompt}"
            + (
                ": words of traces/synth.py, tokenized one token per word by a word-level tokenizer.json "
                "given to the sim and to kvrouter (`--tokenizer`); the SGLang router routes on the raw text, "
                "vllm-router on token ids from every replica's `/tokenize` (one call per replica per request)."
                if args.prompt == "text"
                else "."
            ),
            "Targets without an x-kvrouter-replica header get their load spread from the engines' "
            "vllm:request_success_total deltas.",
        ]
        result = {**last, "runs": runs, "summary": {**last["summary"], "targets": summaries}}
        summary = report_result(args, trace, result, "kvrouter vs SGLang router vs vLLM router", notes)
        for name, s in summary["targets"].items():
            if s["errors"]:
                log(f"note: {name} had {s['errors']} failed requests (see report.md, 'Errors')")
    except KeyboardInterrupt:
        log("interrupted: every process stopped")
        return 130
    log(f"compare done in {time.monotonic() - t_start:.0f} s; logs in {out / 'logs'}")
    return 0


def _kvrouter(policy: str) -> Callable[[ProcGroup, Sequence[str], Path, Sequence[str]], tuple[Proc, str]]:
    def start(group: ProcGroup, urls: Sequence[str], venv: Path, extra: Sequence[str]) -> tuple[Proc, str]:
        return start_kvrouter(group, urls, policy, name=f"kvrouter-{policy}", extra=extra)

    return start


ROUTERS: dict[str, Callable[[ProcGroup, Sequence[str], Path, Sequence[str]], tuple[Proc, str]]] = {
    "kvrouter": _kvrouter("cache_aware"),
    "kvrouter-rr": _kvrouter("round_robin"),
    "sglang-router": lambda group, urls, venv, _extra: start_sglang_router(group, urls, venv=venv),
    "vllm-router": lambda group, urls, venv, _extra: start_vllm_router(group, urls, venv=venv),
}


if __name__ == "__main__":
    sys.exit(main())
