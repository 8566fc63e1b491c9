"""The engine model's PD halves: a prefill that pins its blocks, a decode that loads them."""

from __future__ import annotations

from engines.sim.model.engine import EngineModel
from engines.sim.model.profiles import get_profile
from engines.sim.model.structs import EngineConfig, SimRequest


def _engine(profile: str = "h100-llama3-8b", block_size: int = 16) -> EngineModel:
    prof = get_profile(profile)
    return EngineModel(EngineConfig.from_profile(prof, block_size=block_size, emit_events=False), prof)


def test_prefill_holds_blocks_until_released() -> None:
    eng = _engine()
    hashes = list(range(1, 65))  # 64 full blocks
    eng.add_request(SimRequest("p", 1, prompt_len=64 * 16, block_hashes=hashes, hold_kv=True), now=0.0)
    out = eng.run_until(10.0)
    assert [f.request_id for f in out.finished] == ["p"]
    held = eng.held_blocks("p")
    assert held is not None and len(held) == 64
    free_before = eng.pool.num_free
    eng.check_invariants()
    assert eng.release_kv("p") and not eng.release_kv("p")
    assert eng.pool.num_free == free_before + 64
    eng.check_invariants()


def test_decode_loads_remote_tokens_instead_of_computing() -> None:
    n = 8192
    hashes = list(range(1, n // 16 + 1))
    local = _engine()
    local.add_request(SimRequest("l", 4, prompt_len=n, block_hashes=hashes), now=0.0)
    fl = local.run_until(100.0).finished[0]
    remote = _engine()
    remote.add_request(SimRequest("r", 4, prompt_len=n, block_hashes=hashes, remote_tokens=n), now=0.0)
    fr = remote.run_until(100.0).finished[0]
    assert fl.first_token_time is not None and fr.first_token_time is not None
    link = get_profile("h100-llama3-8b").kv_link
    xfer_s = link.transfer_ms(n - 1) / 1000
    # The remote one waits for the link and then computes one token: far less than an 8k prefill.
    assert fr.first_token_time >= xfer_s
    assert fr.first_token_time < fl.first_token_time / 2
    m = remote.metrics
    assert m.external_prefix_cache_hits == n - 1 and m.external_prefix_cache_queries == n
    assert fr.cached_tokens == n - 1
    remote.check_invariants()


def test_decode_transfers_only_what_it_lacks() -> None:
    n = 4096
    hashes = list(range(1, n // 16 + 1))
    eng = _engine()
    eng.add_request(SimRequest("warm", 1, prompt_len=n // 2, block_hashes=hashes[: n // 32]), now=0.0)
    eng.run_until(10.0)
    eng.add_request(SimRequest("r", 2, prompt_len=n, block_hashes=hashes, remote_tokens=n), now=10.0)
    f = eng.run_until(20.0).finished[0]
    assert eng.metrics.external_prefix_cache_hits == n - 1 - n // 2
    assert f.cached_tokens == n - 1
