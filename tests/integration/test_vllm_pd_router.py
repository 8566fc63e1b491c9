"""Real vLLM CPU prefill/decode behind `kvrouter serve --prefill URL --decode URL` (issue 18's CI proof).

    KVROUTER_VLLM_VENV=.venv-vllm KVROUTER_NIXL_DIR=.cache/nixl-site KVROUTER_TINY_MODEL=.cache/tiny-llama \
        .venv/bin/python -m pytest -m vllm tests/integration/test_vllm_pd_router.py

The NIXL pair of tests/integration/vllm_pd_fixtures.py (prefill kv_producer on core 0, decode kv_consumer on
core 1). The router splits a long prompt (rule `threshold` at 256 uncached tokens: the pair is idle, and
with an idle decode replica the `auto` rule rightly keeps prefill local), and the decode replica's
/metrics prove the prompt's tokens arrived by KV transfer, not recomputation; the client's stream is the
greedy continuation the prefill replica computes alone. The same prompt again is cached on the decode
replica and stays local. Every request is bounded (REQUEST_TIMEOUT_S); start-up 45-95 s.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.vllm_fixtures import metric_sum, token_prompt
from tests.integration.vllm_pd_fixtures import REQUEST_TIMEOUT_S, PDPair, complete_slow
from tests.support.procs import RouterProc, http, wait_for

pytestmark = pytest.mark.vllm

PROMPT_TOKENS = 650  # 20 full 32-token blocks and a partial one
BY_SOURCE = "vllm:prompt_tokens_by_source_total"
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def pd_router(pd_pair: PDPair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterProc]:
    log_dir: Path = tmp_path_factory.mktemp("vllm-pd-router")
    r = RouterProc(
        log_dir,
        [],
        "--prefill",
        pd_pair.prefill.url,
        "--decode",
        pd_pair.decode.url,
        "--pd-rule",
        "threshold",
        "--pd-threshold-tokens",
        "256",
        "--kv-events",
        "auto",
        # no generation canary: its one-token requests would enter the decode replica's counters
        "--canary-after",
        "0",
        "--enable-debug",
        "--first-byte-timeout",
        str(REQUEST_TIMEOUT_S),
        "--request-timeout",
        str(REQUEST_TIMEOUT_S),
        "--eject-after",
        "1000",
        name="router-vllm-pd",
    )
    try:
        # /ready turns true with the first admitted replica; the split needs both
        wait_for(
            lambda: len(re.findall(r"kvrouter_replica_healthy\{[^}]*\} 1\.0", r.metrics())) == 2,
            timeout=60,
            what="both replicas admitted",
        )
        yield r
    finally:
        r.proc.stop(timeout=15)


def _outcomes(r: RouterProc) -> dict[str, float]:
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(r'kvrouter_pd_decisions_total\{outcome="([^"]+)"\} ([0-9.e+]+)', r.metrics())
    }


def _stream_text(raw: bytes) -> str:
    text = ""
    for line in raw.split(b"\n"):
        if line.startswith(b"data: {"):
            for choice in json.loads(line[6:]).get("choices", []):
                text += choice.get("text", "")
    assert raw.rstrip().endswith(b"data: [DONE]"), raw[-200:]
    return text


def test_long_prompt_is_split_and_its_kv_arrives_by_nixl(pd_pair: PDPair, pd_router: RouterProc) -> None:
    d = pd_pair.decode.url
    prompt = token_prompt(1807, PROMPT_TOKENS)
    body = {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": 8,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    transferred = metric_sum(d, BY_SOURCE, source="external_kv_transfer")
    computed = metric_sum(d, BY_SOURCE, source="local_compute")
    failed = metric_sum(d, "vllm:nixl_num_failed_transfers_total")

    code, _, raw = http("POST", pd_router.url + "/v1/completions", body, JSON, timeout=REQUEST_TIMEOUT_S * 2)
    assert code == 200, raw
    assert _outcomes(pd_router).get("split") == 1.0, pd_router.metrics()
    assert metric_sum(d, BY_SOURCE, source="external_kv_transfer") - transferred == PROMPT_TOKENS
    assert metric_sum(d, BY_SOURCE, source="local_compute") - computed == 0
    assert metric_sum(d, "vllm:nixl_num_failed_transfers_total") - failed == 0
    # the client's stream is the greedy continuation, as the prefill replica computes it alone
    alone = complete_slow(pd_pair.prefill.url, prompt, max_tokens=8)
    assert _stream_text(raw) == alone.body["choices"][0]["text"]

    # The decode replica now holds the prompt (its own KV events say so): the same prompt stays local.
    transferred = metric_sum(d, BY_SOURCE, source="external_kv_transfer")
    wait_for(lambda: _decode_cached(pd_router, body), timeout=30, what="decode replica's prefix in the index")
    code, _, raw2 = http("POST", pd_router.url + "/v1/completions", body, JSON, timeout=REQUEST_TIMEOUT_S * 2)
    assert code == 200, raw2
    assert _stream_text(raw2) == _stream_text(raw)
    assert metric_sum(d, BY_SOURCE, source="external_kv_transfer") == transferred
    assert _outcomes(pd_router).get("local_threshold", 0) >= 1


def _decode_cached(r: RouterProc, body: dict[str, object]) -> bool:
    code, _, raw = http("POST", r.url + "/debug/route", body, JSON, timeout=30)
    return code == 200 and json.loads(raw)["pd"]["outcome"] == "local_threshold"
