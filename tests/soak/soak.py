"""Soak: a bounded loopback load through a real `kvrouter serve` in front of a simulated fleet
while faults are injected over time; every request is classified and none may be lost.

Run: ``make soak`` (``SOAK_SECONDS``, default 600) or ``SOAK_SECONDS=60 python tests/soak/soak.py``.

Fleet: three replicas in one `kvrouter sim` process plus a fourth in its own process, which is
killed (SIGKILL) and started again on the same ports now and then. Faults on the others through
``POST /sim/faults``: error fraction, stalls past the first-byte timeout, mid-stream deaths,
slow engines (slow_factor), stuck engine loops, streams that stop with the connection open,
preemption storms,
restarts (KV-event seq reset), malformed and reordered KV-event batches, refused connections.
Load: ``SOAK_CONCURRENCY`` (default 6) closed-loop clients, half streaming, prompts drawn from a few
shared prefixes (so the cache-aware path and the index are exercised).

Hostile clients run beside it (tests/soak/hostile.py, off with ``SOAK_HOSTILE=0``): trickled heads,
unauthenticated 32 MiB bodies, huge prompts. They are tallied apart; ``lost`` counts the normal
traffic only, and the router's peak RSS is sampled every 0.5 s.

Outcomes (tests/support/harness.py): ok, failed_clean (OpenAI error body, or an SSE error event
then [DONE]), lost (hang past the client timeout, malformed body, reset without an error). The
last line is ``soak: sent=N ok=N failed_clean=N lost=N p99_ms=X rss_mb=A->B peak_rss_mb=P fds=C->D``; the exit
status is 1 if anything was lost or the router died.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: make the tests package importable
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from tests.soak.hostile import big_unauthenticated, huge_prompts, slow_heads  # noqa: E402
from tests.support.harness import (  # noqa: E402
    Outcome,
    SimFleet,
    call,
    debug_replicas,
    wait_for,
)
from tests.support.proc_stats import proc_stats, rss_mb  # noqa: E402
from tests.support.procs import RouterProc, free_port, http  # noqa: E402

SECONDS = float(os.environ.get("SOAK_SECONDS", "600"))
CONCURRENCY = int(os.environ.get("SOAK_CONCURRENCY", "6"))
FAULT_EVERY_S = float(os.environ.get("SOAK_FAULT_EVERY", "3"))
CLIENT_TIMEOUT_S = 30.0
SEED = int(os.environ.get("SOAK_SEED", "1"))
RSS_GROWTH_MB = 300  # peak over start: 32 MiB bodies must not pile up (the budget is 256 MiB)
HOSTILE = os.environ.get("SOAK_HOSTILE", "1") != "0"
API_KEY = "soak-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}

PREFIXES = [
    f"system prompt {k}: you are a careful assistant who answers briefly and cites sources. " * 6
    for k in range(5)
]


class KillableReplica:
    """One sim replica in its own process, restartable on the same HTTP and event ports."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.port = free_port()
        self.events_port = free_port()
        self.replay_port = free_port()
        self.starts = 0
        self.fleet = self._start()
        self.url = self.fleet.urls[0]

    def _start(self) -> SimFleet:
        self.starts += 1
        # SimFleet's command asks for free ports; these come after it in the command line, so they win.
        args = (
            "--port",
            str(self.port),
            "--events-port",
            str(self.events_port),
            "--replay-port",
            str(self.replay_port),
            "--seed",
            str(100 + self.starts),
        )
        for attempt in range(20):  # the ports may linger a moment after a SIGKILL
            try:
                return SimFleet(
                    self.log_dir, 1, *args, name=f"sim-killable-{self.starts}-{attempt}", timeout=20
                )
            except (RuntimeError, TimeoutError, AssertionError):
                time.sleep(0.25)
        raise RuntimeError("killable replica did not come back")

    def kill(self) -> None:
        self.fleet.proc.signal(signal.SIGKILL)
        self.fleet.proc.stop()

    def restart(self) -> None:
        self.fleet = self._start()


async def post_faults(session: aiohttp.ClientSession, url: str, **kw: object) -> None:
    try:
        async with asyncio.timeout(3):
            async with session.post(url + "/sim/faults", json=kw) as resp:
                await resp.read()
    except (aiohttp.ClientError, OSError, TimeoutError):
        pass  # a refusing or killed replica does not answer; the next clear will


def fault_for(action: str, rng: random.Random) -> dict[str, object] | None:
    """The /sim/faults body of one deck card (None: kill and clear are not sim faults)."""
    table: dict[str, dict[str, object]] = {
        "error": {"error_rate": rng.choice([0.3, 0.7, 1.0])},
        "stall": {"stall_s": rng.choice([0.5, 3.0])},
        "die": {"die_after_chunks": rng.randint(0, 4)},
        "restart": {"restart": True},
        "events": {"malformed_event_rate": 0.3, "reorder_event_rate": 0.3},
        "refuse": {"refuse_connections": True, "refuse_for_s": 2.0},
        "slow": {"slow_factor": rng.choice([3.0, 10.0])},
        "stuck": {"stuck": True},
        "stop": {"stop_after_chunks": rng.randint(1, 4)},
        "preempt": {"preemption_rate": rng.choice([0.2, 0.5])},
    }
    return table.get(action)


async def injector(urls: list[str], killable: KillableReplica, stop: asyncio.Event, log: list[str]) -> None:
    rng = random.Random(SEED)
    loop = asyncio.get_running_loop()
    deck: list[str] = []
    async with aiohttp.ClientSession() as s:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), FAULT_EVERY_S)
                break
            except TimeoutError:
                pass
            if not deck:  # a shuffled deck, not independent draws: every kind shows up in any ~30 s
                deck = [
                    "error",
                    "stall",
                    "die",
                    "restart",
                    "events",
                    "refuse",
                    "kill",
                    "clear",
                    "clear",
                    "slow",
                    "stuck",
                    "stop",
                    "preempt",
                ]
                rng.shuffle(deck)
            target = rng.choice(urls)
            action = deck.pop()
            log.append(f"{time.monotonic():.1f} {action} {target if action != 'kill' else killable.url}")
            kw = fault_for(action, rng)
            if kw is not None:
                await post_faults(s, target, **kw)
            elif action == "kill":
                killable.kill()
                await asyncio.sleep(rng.uniform(0.5, 2.0))
                await loop.run_in_executor(None, killable.restart)
            else:
                for u in urls:
                    await post_faults(s, u)


async def client(router: str, stop: asyncio.Event, outs: list[Outcome], bad: list[str], cid: int) -> None:
    rng = random.Random(SEED * 1000 + cid)
    path = router + "/v1/completions"
    async with aiohttp.ClientSession() as s:
        i = 0
        while not stop.is_set():
            i += 1
            body = {
                "model": "tiny",
                "prompt": rng.choice(PREFIXES) + f" question {cid}-{i}: {rng.random()}",
                "max_tokens": rng.randint(2, 12),
                "stream": rng.random() < 0.5,
            }
            o = await call(s, path, body, timeout=CLIENT_TIMEOUT_S, headers=AUTH)
            outs.append(o)
            if o.kind == "lost" and len(bad) < 20:
                bad.append(f"{o.status} {o.why}")


def p99_ms(outs: list[Outcome]) -> float:
    lat = sorted(o.latency_s for o in outs if o.kind == "ok")
    if not lat:
        return 0.0
    return 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))]


async def sample_rss(pid: int, stop: asyncio.Event, peak: list[float]) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], rss_mb(pid))
        await asyncio.sleep(0.5)


async def run(
    router: RouterProc, urls: list[str], killable: KillableReplica, hostile: dict[str, int], peak: list[float]
) -> tuple[list[Outcome], list[str], list[str]]:
    stop = asyncio.Event()
    outs: list[Outcome] = []
    bad: list[str] = []
    faults: list[str] = []
    tasks = [asyncio.create_task(client(router.url, stop, outs, bad, c)) for c in range(CONCURRENCY)]
    tasks.append(asyncio.create_task(sample_rss(router.proc.p.pid, stop, peak)))
    if HOSTILE:
        tasks += [
            asyncio.create_task(slow_heads(router.port, stop, hostile)),
            asyncio.create_task(big_unauthenticated(router.port, stop, hostile)),
            asyncio.create_task(huge_prompts(router.url, API_KEY, stop, hostile)),
        ]
    inj = asyncio.create_task(injector(urls, killable, stop, faults))
    await asyncio.sleep(SECONDS)
    stop.set()
    # clients finish their current request (bounded by the client timeout)
    await asyncio.wait_for(asyncio.gather(*tasks, inj), CLIENT_TIMEOUT_S + 15)
    return outs, bad, faults


def main() -> int:
    log_dir = Path(tempfile.mkdtemp(prefix="kvrouter-soak-"))
    sim = SimFleet(log_dir, 3, "--seed", str(SEED))
    killable = KillableReplica(log_dir)
    urls = [*sim.urls, killable.url]
    router = RouterProc(
        log_dir,
        urls,
        "--enable-debug",
        "--first-byte-timeout",
        "2",
        "--request-timeout",
        "2",
        "--idle-timeout",
        "5",
        "--eject-after",
        "3",
        "--max-retries",
        "2",
        "--drain-grace",
        "0",
        "--max-in-flight",
        "64",
        "--log-level",
        "warning",
        "--api-key",
        API_KEY,
        "--head-timeout",
        "3",
    )
    code = 0
    try:
        wait_for(
            lambda: all(r["healthy"] for r in debug_replicas(router.url)["replicas"]), 15, "fleet admitted"
        )
        pid = router.proc.p.pid
        rss0, fds0 = proc_stats(pid)
        t0 = time.monotonic()
        hostile: dict[str, int] = {}
        peak = [rss0]
        outs, bad, faults = asyncio.run(run(router, sim.urls, killable, hostile, peak))
        wall = time.monotonic() - t0
        sim.clear_faults()  # waits out a refuse_for_s still running
        alive = router.proc.alive() and http("GET", router.url + "/health")[0] == 200
        # let keep-alive pools settle before the end sample
        time.sleep(1.0)
        rss1, fds1 = proc_stats(pid)
        invariants = debug_replicas(router.url)["index_invariants"]
        kinds = {k: sum(1 for o in outs if o.kind == k) for k in ("ok", "failed_clean", "lost")}
        statuses: dict[str, int] = {}
        for o in outs:
            key = f"{o.kind}:{o.status}"
            statuses[key] = statuses.get(key, 0) + 1
        print(
            f"soak: {wall:.0f}s, concurrency {CONCURRENCY}, {len(faults)} faults injected, "
            f"killable replica started {killable.starts}x; logs in {log_dir}"
        )
        actions: dict[str, int] = {}
        for f in faults:
            actions[f.split()[1]] = actions.get(f.split()[1], 0) + 1
        print(f"soak: faults by kind: {dict(sorted(actions.items()))}")
        print(f"soak: outcomes by status: {dict(sorted(statuses.items()))}")
        print(f"soak: router alive={alive} index_invariants={invariants} rate={len(outs) / wall:.1f} req/s")
        if HOSTILE:
            print(f"soak: hostile clients by answer: {dict(sorted(hostile.items()))}")
        for line in bad:
            print(f"soak: lost: {line}")
        if peak[0] - rss0 > RSS_GROWTH_MB:
            print(f"soak: router RSS grew {peak[0] - rss0:.0f} MB (> {RSS_GROWTH_MB} MB)")
            code = 1
        if kinds["lost"] or not alive or invariants != "ok":
            code = 1
        print(
            f"soak: sent={len(outs)} ok={kinds['ok']} failed_clean={kinds['failed_clean']} lost={kinds['lost']} "
            f"p99_ms={p99_ms(outs):.0f} rss_mb={rss0:.0f}->{rss1:.0f} peak_rss_mb={peak[0]:.0f} fds={fds0}->{fds1}"
        )
    finally:
        router.proc.stop()
        killable.fleet.proc.stop()
        sim.proc.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
