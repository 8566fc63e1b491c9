"""Real-engine fleets shared across test modules, started ahead of time, and the run order that allows it.

Starting a vLLM CPU replica costs tens of seconds on 2 cores, so each engine configuration the suite needs
is started once per session (tests/support/engine_pool.py) and stopped right after the last test that uses
it, not at the end of the session: a NIXL agent busy-polls a core even when idle, and LMCache replicas hold
1+ GB each. The modules that need a fleet run at the end of the session, those sharing one next to each
other (``pytest_collection_modifyitems``). Each fleet starts when its first test asks for it; with
KVROUTER_TEST_PREFETCH=1 the pool starts the first one in the background when the first integration test
runs, and each next one while the tests of the one before run (off by default: see _start_fleets_early),
the NIXL pair always on demand (its busy-polling agents would slow everything beside it). Each module gets the fleet in a known
state: the plain pair with empty prefix caches; the connector fleets with whatever earlier modules left,
which their tests tolerate by using prompts no other module sends and by asserting counter deltas.

Fixtures (module-scoped handles on the shared fleets):
  vllm_pair            two plain replicas (serve_cpu.sh), cores 0 and 1, prefix caches reset for the module
  pd_pair              a NIXL prefill (core 0) + decode (core 1) pair
  lmcache_shared       two lmcache_driven replicas sharing one small LMCache MP server + the coordinator
  lmcache_lookup_mode  one engine_driven replica on its own MP server + the coordinator
  lmcache_three        three lmcache_driven replicas: r0 on mp0, r1 and r2 sharing mp1 (float32)
and the session-scoped checks they start from (vllm_setup, pd_setup, lmcache_setup), which skip, or fail
under KVROUTER_REQUIRE_VLLM=1, when the environment is missing.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.integration.vllm_fixtures import (
    Replica,
    reset_prefix_cache,
    vllm_replicas,
    vllm_setup_or_skip_reason,
)
from tests.integration.vllm_pd_fixtures import (
    LMCACHE_SMALL_L1_GB,
    LMCacheFleet,
    PDPair,
    ReplicaSpec,
    lmcache_fleet,
    lmcache_setup_or_skip_reason,
    pd_pair,
    pd_setup_or_skip_reason,
    skip_or_fail,
)
from tests.support.engine_pool import EnginePool

T = TypeVar("T")
POOL = pytest.StashKey[EnginePool]()
# The pool keys are these fixtures' names: a test needs a fleet when the fixture is in its closure.
SHARED_FLEETS = ("vllm_pair", "lmcache_shared", "lmcache_lookup_mode", "lmcache_three", "pd_pair")
NO_PREFETCH = {"pd_pair"}

_check_lock = threading.Lock()


def _once(check: Callable[[], T]) -> Callable[[], T]:
    """Each environment check imports vLLM in a subprocess (seconds) and may build the tiny model: once
    per session, and never twice at the same time (a prefetch thread and a fixture may both ask)."""
    cached = functools.cache(check)

    def run() -> T:
        with _check_lock:
            return cached()

    return run


_vllm_reason = _once(vllm_setup_or_skip_reason)
_pd_reason = _once(pd_setup_or_skip_reason)
_lmcache_reason = _once(lmcache_setup_or_skip_reason)


class EnvironmentMissing(RuntimeError):
    """A prefetch found the environment missing; the fixture's own check skips or fails the tests."""


def _checked(reason: Callable[[], tuple[Path, ...] | str]) -> tuple[Path, ...]:
    setup = reason()
    if isinstance(setup, str):
        raise EnvironmentMissing(setup)
    return setup


def _pool(config: pytest.Config) -> EnginePool:
    return config.stash.setdefault(POOL, EnginePool())


def _fleets_of(item: pytest.Item) -> tuple[str, ...]:
    names = getattr(item, "fixturenames", ())
    return tuple(f for f in SHARED_FLEETS if f in names)


def _module_of(item: pytest.Item) -> str:
    return item.module.__name__ if isinstance(item, pytest.Function) else item.nodeid


@pytest.hookimpl(trylast=True)  # after -m/-k deselection: plan only what runs
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules that need a fleet go last, in the order of SHARED_FLEETS, the modules of one fleet together
    (in their collected order); everything else keeps its order. Then the pool learns the plan."""
    fleets_of_module: dict[str, set[str]] = {}
    for it in items:
        fleets_of_module.setdefault(_module_of(it), set()).update(_fleets_of(it))

    def group(module: str) -> int:
        fleets = fleets_of_module[module]
        return min((SHARED_FLEETS.index(f) for f in fleets), default=-1)

    order = {id(it): i for i, it in enumerate(items)}
    module_pos: dict[str, int] = {}
    for i, it in enumerate(items):
        module_pos.setdefault(_module_of(it), i)
    items.sort(key=lambda it: (group(_module_of(it)), module_pos[_module_of(it)], order[id(it)]))
    _pool(config).plan([(it.nodeid, _fleets_of(it)) for it in items])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    # After the item's own teardown, which includes its module's fixtures when the next test is elsewhere.
    yield
    _pool(item.config).release_after(item.nodeid)


def pytest_sessionfinish(session: pytest.Session) -> None:
    _pool(session.config).close()


@pytest.fixture(scope="session")
def engine_pool(request: pytest.FixtureRequest) -> EnginePool:
    return _pool(request.config)


@pytest.fixture(scope="session", autouse=True)
def _start_fleets_early(engine_pool: EnginePool, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Register how to start each fleet, then let the pool start the first one in the background."""

    def plain_pair(run_dir: Path) -> AbstractContextManager[list[Replica]]:
        venv, model = _checked(_vllm_reason)
        return vllm_replicas(venv, model, run_dir, cores=[0, 1])

    def nixl_pair(run_dir: Path) -> AbstractContextManager[PDPair]:
        venv, model, nixl = _checked(_pd_reason)
        return pd_pair(venv, model, nixl, run_dir)

    def lmcache(
        specs: list[ReplicaSpec], **kw: Any
    ) -> Callable[[Path], AbstractContextManager[LMCacheFleet]]:
        def start(run_dir: Path) -> AbstractContextManager[LMCacheFleet]:
            venv, model = _checked(_lmcache_reason)
            return lmcache_fleet(venv, model, run_dir, specs, **kw)

        return start

    starts: dict[str, Callable[[Path], AbstractContextManager[Any]]] = {
        "vllm_pair": plain_pair,
        "pd_pair": nixl_pair,
        "lmcache_shared": lmcache(
            [ReplicaSpec("r0", 0, 0), ReplicaSpec("r1", 1, 0)], l1_size_gb=LMCACHE_SMALL_L1_GB
        ),
        "lmcache_lookup_mode": lmcache([ReplicaSpec("r0", 0, 0, transfer_mode="engine_driven")]),
        # float32: with bf16 on a Xeon with AMX tiles, a replica's worker died of SIGILL (exit -4) on its
        # first decode step after loading a chunk another replica had put in the shared tier, as
        # serve_pd.sh records for NIXL loads.
        "lmcache_three": lmcache(
            [ReplicaSpec("r0", 0, 0), ReplicaSpec("r1", 1, 1), ReplicaSpec("r2", 0, 1)],
            extra_env={"DTYPE": "float32"},
        ),
    }
    # Off unless KVROUTER_TEST_PREFETCH=1: a vLLM start-up binds ephemeral ports of its own, and beside the
    # other integration tests it took ports free_port() had just handed them (2 "address already in use"
    # failures in 3 full runs with early starts). Off, each fleet starts when its first test asks for it,
    # still once per session.
    early = os.environ.get("KVROUTER_TEST_PREFETCH", "0") == "1"
    for key, start in starts.items():
        run_dir = tmp_path_factory.mktemp(f"fleet-{key}")  # here: mktemp is not for background threads
        engine_pool.register(
            key, functools.partial(start, run_dir), prefetch=early and key not in NO_PREFETCH
        )
    engine_pool.prefetch()


# --- environment checks ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def vllm_setup() -> tuple[Path, Path]:
    """(vLLM venv, tiny model dir)."""
    setup = _vllm_reason()
    if isinstance(setup, str):
        skip_or_fail(setup)
    return setup


@pytest.fixture(scope="session")
def pd_setup() -> tuple[Path, Path, Path]:
    """(vLLM venv, tiny model dir, NIXL dir)."""
    setup = _pd_reason()
    if isinstance(setup, str):
        skip_or_fail(setup)
    return setup


@pytest.fixture(scope="session")
def lmcache_setup() -> tuple[Path, Path]:
    """(vLLM + LMCache venv, tiny model dir)."""
    setup = _lmcache_reason()
    if isinstance(setup, str):
        skip_or_fail(setup)
    return setup


# --- the shared fleets (started by the pool; each fixture checks the environment first, to skip) -----


@pytest.fixture(scope="module")
def vllm_pair(engine_pool: EnginePool, vllm_setup: tuple[Path, Path]) -> list[Replica]:
    """Two plain replicas on cores 0 and 1 (BLOCKS 96), each prefix cache reset for this module.

    The reset is what a fresh replica would give the module, apart from counters and event sequence
    numbers, which the tests read as deltas.
    """
    reps: list[Replica] = engine_pool.get("vllm_pair")
    for r in reps:
        reset_prefix_cache(r.url)
    return reps


@pytest.fixture(scope="module", name="pd_pair")
def pd_pair_fixture(engine_pool: EnginePool, pd_setup: tuple[Path, Path, Path]) -> PDPair:
    """A NIXL prefill (core 0) + decode (core 1) pair."""
    pair: PDPair = engine_pool.get("pd_pair")
    return pair


@pytest.fixture(scope="module")
def lmcache_shared(engine_pool: EnginePool, lmcache_setup: tuple[Path, Path]) -> LMCacheFleet:
    """Two lmcache_driven replicas (cores 0 and 1) sharing one LMCache MP server (mp0) + the coordinator.

    The server's CPU tier is LMCACHE_SMALL_L1_GB: ~80 tiny-model chunks, so a few dozen prompts make LMCache
    itself evict (BlockRemoved medium "CPU").
    """
    fleet: LMCacheFleet = engine_pool.get("lmcache_shared")
    return fleet


@pytest.fixture(scope="module")
def lmcache_lookup_mode(engine_pool: EnginePool, lmcache_setup: tuple[Path, Path]) -> LMCacheFleet:
    """One engine_driven replica (LMCache's CPU default: no CPU-tier events) on its own MP server + coordinator.

    What a router meets when it must ask the coordinator instead of listening (issue 17's lookup mode).
    """
    fleet: LMCacheFleet = engine_pool.get("lmcache_lookup_mode")
    return fleet


@pytest.fixture(scope="module")
def lmcache_three(engine_pool: EnginePool, lmcache_setup: tuple[Path, Path]) -> LMCacheFleet:
    """Three lmcache_driven replicas, r0 (core 0) on mp0, r1 (core 1) and r2 (core 0) sharing mp1."""
    fleet: LMCacheFleet = engine_pool.get("lmcache_three")
    return fleet
