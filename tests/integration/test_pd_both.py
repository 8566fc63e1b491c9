"""Role ``both`` with ``--pd-both-prefill`` (vLLM NixlConnector ``kv_role: kv_both``): two simulated
``kvrouter sim --role both`` replicas behind ``kvrouter serve --backend A --backend B``. A split
request is prefilled by one of them (leg 1) and decoded by the other (leg 2), which counts the
prompt as transferred; the same replicas also serve requests whole."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import RouterProc, SimFleet, http, wait_for

PROMPT = " ".join(f"word{i}" for i in range(600))


def _source(url: str, source: str) -> float:
    page = http("GET", url + "/metrics")[2].decode()
    m = re.search(
        r'vllm:prompt_tokens_by_source_total\{[^}]*source="' + source + r'"[^}]*\} ([0-9.e+]+)', page
    )
    return float(m.group(1)) if m else 0.0


def _outcomes(r: RouterProc) -> dict[str, float]:
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(r'kvrouter_pd_decisions_total\{outcome="([^"]+)"\} ([0-9.e+]+)', r.metrics())
    }


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SimFleet, RouterProc]]:
    logs: Path = tmp_path_factory.mktemp("pd-both")
    sim = SimFleet(logs, 2, "--role", "both", "--no-events")
    r = RouterProc(
        logs, sim.urls, "--pd-both-prefill", "true", "--pd-rule", "always", "--kv-events", "off",
        "--pd-check-version", "false", "--drain-grace", "0", "--enable-debug", name="router-both",
    )  # fmt: skip
    wait_for(
        lambda: len(re.findall(r"kvrouter_replica_healthy\{[^}]*\} 1\.0", r.metrics())) == 2,
        what="both replicas admitted",
    )
    yield sim, r
    r.proc.stop()
    sim.proc.stop()


def test_both_replicas_split_between_each_other(fleet: tuple[SimFleet, RouterProc]) -> None:
    sim, r = fleet
    before = {u: _source(u, "external_kv_transfer") for u in sim.urls}
    computed = {u: _source(u, "local_compute") for u in sim.urls}
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4}
    code, _, raw = http("POST", r.url + "/v1/completions", body, timeout=30)
    assert code == 200, raw
    assert _outcomes(r).get("split", 0) == 1
    moved = {u: _source(u, "external_kv_transfer") - before[u] for u in sim.urls}
    done = {u: _source(u, "local_compute") - computed[u] for u in sim.urls}
    # exactly one replica decoded with the prompt's KV transferred from the other, which computed it
    (decoder,) = [u for u in sim.urls if moved[u] > 0]
    (prefiller,) = [u for u in sim.urls if u != decoder]
    assert done[prefiller] >= moved[decoder] > 0
    assert done[decoder] <= 1  # vLLM recomputes at most the last token


def test_debug_route_names_two_different_both_replicas(fleet: tuple[SimFleet, RouterProc]) -> None:
    _, r = fleet
    code, _, raw = http("POST", r.url + "/debug/route", {"model": "tiny", "prompt": PROMPT + " x"})
    assert code == 200, raw

    pd = json.loads(raw)["pd"]
    assert pd["split"] is True and pd["prefill"] is not None and pd["prefill"] != pd["decode"]
    assert pd["remote_rate_tps"] > 0 and "remote_stall_s" in pd
    assert pd["imposed_s"] >= 0  # the delay the split would add to the helper's later arrivals
