"""``kvrouter sim --processes P``: the replicas split over P worker processes, one event loop each.

Why: a fleet on one event loop can use one core, and a large simulated fleet needs more (real
vLLM replicas are separate processes too). On one core it does not help: measured with 16
replicas (tests/bench/bench_sim_live.py), 2 processes gave the same step lag as 1, and 4 processes cost
15 more points of CPU and more lag; the loops, ZMQ threads and context switches cost more than
the OS's interleaving saves.

How: the parent forks the workers before any event loop or thread exists (nothing to copy but
imported modules). Worker ``k`` runs the ordinary one-process ``serve`` for a contiguous range
of replicas, with the ports, seeds and names those replicas would have had in one process
(``r{first}``... on ``port + first``...), so the output and every address are the same as
without ``--processes``. The parent prints the workers' replica lines in replica order, then
``ready``; it forwards SIGINT/SIGTERM to them and exits when they have. A worker that dies takes
the others down (the parent's exit status is then non-zero), and a worker whose parent dies gets
SIGTERM (Linux ``PR_SET_PDEATHSIG``), so nothing is left running.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import ctypes.util
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import IO

_PR_SET_PDEATHSIG = 1


def partition(n: int, processes: int) -> list[tuple[int, int]]:
    """``(first, count)`` of each worker: ``n`` replicas in ``processes`` contiguous ranges whose
    sizes differ by at most one."""
    if n < 1:
        raise ValueError(f"invalid n: must be >= 1 (current value: {n})")  # start_fleet's words
    if processes < 1:
        raise ValueError(f"invalid processes: must be >= 1 (current value: {processes})")
    if n < processes:
        raise ValueError(f"invalid processes: {processes} is more than the {n} replicas")
    out: list[tuple[int, int]] = []
    first = 0
    for k in range(processes):
        count = n // processes + (1 if k < n % processes else 0)
        out.append((first, count))
        first += count
    return out


def worker_args(args: argparse.Namespace, first: int, count: int) -> argparse.Namespace:
    """The one-process arguments of the worker running replicas ``first .. first+count-1``."""
    w = copy.copy(args)
    w.processes = 1
    w.replicas = count
    w.first_replica = first
    w.seed = args.seed + first
    w.port = args.port + first if args.port else 0
    if not args.no_events:
        w.events_port = args.events_port + first if args.events_port else 0
        if args.replay_port is not None:
            w.replay_port = args.replay_port + first if args.replay_port else 0
    return w


def _die_with_parent() -> None:
    """SIGTERM this process when its parent dies (Linux); elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _relay(src: IO[str], dst: IO[str]) -> None:
    """Copy a worker's later stdout lines (after ``ready``) so its pipe never fills."""
    with contextlib.suppress(OSError, ValueError):
        for line in src:
            dst.write(line)
            dst.flush()


# Over the complexity limit on purpose: start, supervise and stop N processes as one lifecycle, so
# every exit path (ready, crash, signal) sees the same list of children.
def run_workers(args: argparse.Namespace, run_one: Callable[[argparse.Namespace], int]) -> int:  # noqa: C901
    """Fork one worker per range of ``partition``, each calling ``run_one`` (the one-process
    ``kvrouter sim``); returns the exit status of the whole."""
    try:
        ranges = partition(args.replicas, args.processes)
    except ValueError as exc:
        print(f"kvrouter sim: {exc}", file=sys.stderr)
        return 2
    if not hasattr(os, "fork"):
        print("kvrouter sim: --processes needs fork (POSIX)", file=sys.stderr)
        return 2
    sys.stdout.flush()
    sys.stderr.flush()
    pids: list[int] = []
    pipes: list[IO[str]] = []
    for first, count in ranges:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                os.close(r)
                for earlier in pipes:  # the read ends of the workers forked before this one
                    earlier.close()
                os.dup2(w, 1)
                os.close(w)
                _die_with_parent()
                code = run_one(worker_args(args, first, count))
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        os.close(w)
        pids.append(pid)
        pipes.append(os.fdopen(r, "r"))

    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)

    # Each worker's replica lines up to its "ready", in worker (= replica) order.
    lines: list[str] = []
    failed = False
    for pipe in pipes:
        ready = False
        for line in pipe:
            if line.strip() == "ready":
                ready = True
                break
            lines.append(line)
        if not ready:  # the worker exited before it was ready: its error is on stderr
            failed = True
            break
    if failed or stopping:
        forward(signal.SIGTERM, None)
    else:
        sys.stdout.write("".join(lines))
        print("ready", flush=True)
        for pipe in pipes:
            threading.Thread(target=_relay, args=(pipe, sys.stdout), daemon=True).start()

    status = 0
    remaining = set(pids)
    while remaining:
        try:
            pid, raw = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:  # pragma: no cover - PEP 475 retries os.wait
            continue
        remaining.discard(pid)
        code = os.waitstatus_to_exitcode(raw)
        if code != 0 and not stopping:
            print(f"kvrouter sim: worker {pids.index(pid)} (pid {pid}) exited with {code}", file=sys.stderr)
            forward(signal.SIGTERM, None)
        if code != 0 and status == 0 and not (stopping and code in (-signal.SIGTERM, -signal.SIGINT)):
            status = code if code > 0 else 1
    return 2 if failed and status == 0 else status
