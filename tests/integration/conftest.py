"""Real-engine fleets shared across test modules, and the run order that lets them be shared.

Starting a vLLM CPU replica costs tens of seconds on 2 cores, so each engine configuration the suite needs
is started once per session (tests/support/engine_pool.py) and stopped right after the last test that uses
it, not at the end of the session: a NIXL agent busy-polls a core even when idle, and LMCache replicas hold
2+ GB each. Modules that share a fleet run next to each other (``pytest_collection_modifyitems``), and each
module gets the fleet in a known state: the plain pair with an empty prefix cache; the connector fleets
with whatever earlier modules left, which their tests tolerate by using prompts no other module sends and
by asserting counter deltas.

Fixtures (module-scoped handles on the shared fleets):
  vllm_pair            two plain replicas (serve_cpu.sh), cores 0 and 1, prefix caches reset for the module
  pd_pair              a NIXL prefill (core 0) + decode (core 1) pair
  lmcache_shared       two lmcache_driven replicas sharing one small LMCache MP server + the coordinator
  lmcache_lookup_mode  one engine_driven replica on its own MP server + the coordinator
and the session-scoped checks they start from (vllm_setup, pd_setup, lmcache_setup), which skip, or fail
under KVROUTER_REQUIRE_VLLM=1, when the environment is missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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

POOL = pytest.StashKey[EnginePool]()
# The pool keys are these fixtures' names: a test needs a fleet when the fixture is in its closure.
SHARED_FLEETS = ("vllm_pair", "pd_pair", "lmcache_shared", "lmcache_lookup_mode")


def _pool(config: pytest.Config) -> EnginePool:
    return config.stash.setdefault(POOL, EnginePool())


def _fleets_of(item: pytest.Item) -> tuple[str, ...]:
    names = getattr(item, "fixturenames", ())
    return tuple(f for f in SHARED_FLEETS if f in names)


@pytest.hookimpl(trylast=True)  # after -m/-k deselection: plan only what runs
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the modules that share a fleet one after another, where the first of them ran; everything else
    keeps its place. Then tell the pool which test is the last user of each fleet."""
    module_of = {
        id(it): (it.module.__name__ if isinstance(it, pytest.Function) else it.nodeid) for it in items
    }
    first_seen: dict[object, int] = {}
    group_pos: dict[str, int] = {}
    module_fleets: dict[str, set[str]] = {}
    for it in items:
        module_fleets.setdefault(module_of[id(it)], set()).update(_fleets_of(it))
    for i, it in enumerate(items):
        mod = module_of[id(it)]
        fleets = module_fleets[mod]
        group: object = tuple(sorted(fleets)) if fleets else mod
        first_seen.setdefault(group, i)
        group_pos.setdefault(mod, first_seen[group])
    module_pos: dict[str, int] = {}
    for i, it in enumerate(items):
        module_pos.setdefault(module_of[id(it)], i)
    order = {id(it): i for i, it in enumerate(items)}
    items.sort(key=lambda it: (group_pos[module_of[id(it)]], module_pos[module_of[id(it)]], order[id(it)]))
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


# --- environment checks (each imports vLLM in a subprocess: seconds, so once per session) ----------


@pytest.fixture(scope="session")
def vllm_setup() -> tuple[Path, Path]:
    """(vLLM venv, tiny model dir)."""
    setup = vllm_setup_or_skip_reason()
    if isinstance(setup, str):
        skip_or_fail(setup)
    return setup


@pytest.fixture(scope="session")
def pd_setup() -> tuple[Path, Path, Path]:
    """(vLLM venv, tiny model dir, NIXL dir)."""
    setup = pd_setup_or_skip_reason()
    if isinstance(setup, str):
        skip_or_fail(setup)
    return setup


@pytest.fixture(scope="session")
def lmcache_setup() -> tuple[Path, Path]:
    """(vLLM + LMCache venv, tiny model dir)."""
    setup = lmcache_setup_or_skip_reason()
    if isinstance(setup, str):
        skip_or_fail(setup)
    return setup


# --- the shared fleets ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_pair(
    engine_pool: EnginePool, vllm_setup: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> list[Replica]:
    """Two plain replicas on cores 0 and 1 (BLOCKS 96), each prefix cache reset for this module.

    The reset is what a fresh replica would give the module, apart from counters and event sequence
    numbers, which the tests read as deltas.
    """
    venv, model = vllm_setup
    reps = engine_pool.get(
        "vllm_pair", lambda: vllm_replicas(venv, model, tmp_path_factory.mktemp("vllm-run"), cores=[0, 1])
    )
    for r in reps:
        reset_prefix_cache(r.url)
    return reps


@pytest.fixture(scope="module", name="pd_pair")
def pd_pair_fixture(
    engine_pool: EnginePool, pd_setup: tuple[Path, Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> PDPair:
    """A NIXL prefill (core 0) + decode (core 1) pair."""
    venv, model, nixl = pd_setup
    return engine_pool.get("pd_pair", lambda: pd_pair(venv, model, nixl, tmp_path_factory.mktemp("vllm-pd")))


@pytest.fixture(scope="module")
def lmcache_shared(
    engine_pool: EnginePool, lmcache_setup: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> LMCacheFleet:
    """Two lmcache_driven replicas (cores 0 and 1) sharing one LMCache MP server (mp0) + the coordinator.

    The server's CPU tier is LMCACHE_SMALL_L1_GB: ~80 tiny-model chunks, so a few dozen prompts make LMCache
    itself evict (BlockRemoved medium "CPU").
    """
    venv, model = lmcache_setup
    specs = [ReplicaSpec("r0", 0, 0), ReplicaSpec("r1", 1, 0)]
    return engine_pool.get(
        "lmcache_shared",
        lambda: lmcache_fleet(
            venv, model, tmp_path_factory.mktemp("vllm-lmcache"), specs, l1_size_gb=LMCACHE_SMALL_L1_GB
        ),
    )


@pytest.fixture(scope="module")
def lmcache_lookup_mode(
    engine_pool: EnginePool, lmcache_setup: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> LMCacheFleet:
    """One engine_driven replica (LMCache's CPU default: no CPU-tier events) on its own MP server + coordinator.

    What a router meets when it must ask the coordinator instead of listening (issue 17's lookup mode).
    """
    venv, model = lmcache_setup
    specs = [ReplicaSpec("r0", 0, 0, transfer_mode="engine_driven")]
    return engine_pool.get(
        "lmcache_lookup_mode",
        lambda: lmcache_fleet(venv, model, tmp_path_factory.mktemp("vllm-lmcache-lookup"), specs),
    )
