"""Simulated replicas speak the NixlConnector contract: a prefill replica leases its blocks and
returns NIXL-shaped kv_transfer_params; a decode replica reads them and does not recompute."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engines.sim.fleet import Fleet, FleetConfig, start_fleet

WAIT = aiohttp.ClientTimeout(total=20)
PROMPT = " ".join(f"word{i}" for i in range(300))
LEASE_S = 0.4


@pytest.fixture
async def pd() -> AsyncIterator[tuple[Fleet, Fleet]]:
    common: dict[str, Any] = {"events_port": 0, "replay_port": 0, "port": 0}
    pcfg = FleetConfig(1, "tiny", role="prefill", kv_lease_s=LEASE_S, **common)
    dcfg = FleetConfig(1, "tiny", role="decode", seed=1, **common)
    async with start_fleet(pcfg) as p, start_fleet(dcfg) as d:
        yield p, d


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=WAIT) as s:
        yield s


async def _post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with http.post(url + "/v1/completions", json=body) as r:
        return r.status, await r.json()


async def _metrics(http: aiohttp.ClientSession, url: str) -> dict[tuple[str, str], float]:
    async with http.get(url + "/metrics") as r:
        text = await r.text()
    out: dict[tuple[str, str], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, s.labels.get("source", ""))] = s.value
    return out


async def _prefill(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 1, "stream": False,
            "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False}}  # fmt: skip
    status, out = await _post(http, url, body)
    assert status == 200, out
    ktp = out["kv_transfer_params"]
    assert isinstance(ktp, dict)
    return ktp


async def test_handoff_decodes_without_recomputing(
    pd: tuple[Fleet, Fleet], http: aiohttp.ClientSession
) -> None:
    p, d = pd
    purl, durl = p.urls[0], d.urls[0]
    ktp = await _prefill(http, purl)
    for key in ("remote_block_ids", "remote_engine_id", "remote_request_id", "remote_host", "remote_port",
                "tp_size", "dcp_size", "pp_size", "remote_num_tokens", "transfer_mode"):  # fmt: skip
        assert key in ktp, key
    assert ktp["do_remote_prefill"] is True and ktp["do_remote_decode"] is False
    assert ktp["transfer_mode"] == "pull" and ktp["remote_port"] == p.replicas[0].port
    n = ktp["remote_num_tokens"]
    assert len(ktp["remote_block_ids"][0]) == -(-n // p.replicas[0].engine_config.block_size)  # partial too
    assert p.replicas[0].model.held  # pinned until the decode side reads
    status, out = await _post(http, durl, {"model": "tiny", "prompt": PROMPT, "max_tokens": 8,
                                           "kv_transfer_params": ktp})  # fmt: skip
    assert status == 200 and out["usage"]["completion_tokens"] == 8
    assert not p.replicas[0].model.held  # the read released them
    m = await _metrics(http, durl)
    assert m[("vllm:prompt_tokens_by_source_total", "external_kv_transfer")] == n
    assert m[("vllm:prompt_tokens_by_source_total", "local_compute")] == 0
    assert m[("vllm:nixl_xfer_time_seconds_count", "")] == 1
    assert m[("vllm:nixl_num_failed_transfers_total", "")] == 0
    pm = await _metrics(http, purl)
    assert pm[("vllm:prompt_tokens_by_source_total", "local_compute")] == n
    # The loaded blocks joined D's prefix cache (and were published as BlockStored by that path):
    # a plain repeat of the prompt on D hits them.
    status, again = await _post(http, durl, {"model": "tiny", "prompt": PROMPT, "max_tokens": 1})
    assert status == 200 and again["usage"]["prompt_tokens_details"]["cached_tokens"] >= n - 16


async def test_expired_lease_is_counted_and_read_anyway(
    pd: tuple[Fleet, Fleet], http: aiohttp.ClientSession
) -> None:
    p, d = pd
    ktp = await _prefill(http, p.urls[0])
    await asyncio.sleep(LEASE_S + 0.3)
    assert not p.replicas[0].model.held  # the lease ran out: blocks released
    status, _ = await _post(http, d.urls[0], {"model": "tiny", "prompt": PROMPT, "max_tokens": 4,
                                              "kv_transfer_params": ktp})  # fmt: skip
    assert status == 200  # vLLM: a late read is not an error (a silent stale read)
    pm = await _metrics(http, p.urls[0])
    assert pm[("vllm:nixl_num_kv_expired_reqs_total", "")] == 1
    assert pm[("vllm:nixl_num_notifications_after_expiry_total", "")] == 1


async def test_failed_read_fails_the_request_by_default(
    pd: tuple[Fleet, Fleet], http: aiohttp.ClientSession
) -> None:
    p, d = pd
    ktp = await _prefill(http, p.urls[0])
    bad = dict(ktp, remote_engine_id="not-that-engine")
    status, _ = await _post(http, d.urls[0], {"model": "tiny", "prompt": PROMPT, "max_tokens": 4,
                                              "kv_transfer_params": bad})  # fmt: skip
    assert status == 500
    m = await _metrics(http, d.urls[0])
    assert m[("vllm:nixl_num_failed_transfers_total", "")] == 1
    # Missing fields: vLLM computes locally ("Got invalid KVTransferParams").
    partial = {"do_remote_prefill": True, "remote_engine_id": ktp["remote_engine_id"]}
    status, _ = await _post(http, d.urls[0], {"model": "tiny", "prompt": PROMPT, "max_tokens": 4,
                                              "kv_transfer_params": partial})  # fmt: skip
    assert status == 200
    m = await _metrics(http, d.urls[0])
    assert m[("vllm:prompt_tokens_by_source_total", "external_kv_transfer")] == 0
    assert m[("vllm:prompt_tokens_by_source_total", "local_compute")] > 0
