"""Real vLLM CPU prefill/decode disaggregation over NIXL, without a router (issue 18's engine contract).

    make vllm-pd-env tiny-model && KVROUTER_VLLM_VENV=.venv-vllm KVROUTER_NIXL_DIR=.cache/nixl-site \
        .venv/bin/python -m pytest -m vllm tests/integration/test_vllm_pd.py

A prefill replica (kv_producer, core 0) and a decode replica (kv_consumer, core 1) of the tiny model, with
NixlConnector, kv_buffer_device "cpu" and UCX over loopback (engines/vllm/serve_pd.sh). The test does the
two legs a PD router must do and proves from the decode replica's /metrics that the prompt's KV arrived by
NIXL transfer instead of being recomputed. Start-up ~45-95 s; the test itself a few seconds.
"""

from __future__ import annotations

import pytest

from tests.integration.vllm_fixtures import metric_sum, token_prompt
from tests.integration.vllm_pd_fixtures import PDPair, complete_slow, pd_handoff

pytestmark = pytest.mark.vllm

# 20 full 32-token blocks plus a partial one: NIXL moves every block, the partial one included.
PROMPT_TOKENS = 650
BY_SOURCE = "vllm:prompt_tokens_by_source_total"


def test_two_leg_nixl_handoff_loads_the_prompt_on_the_decode_replica(pd_pair: PDPair) -> None:
    p, d = pd_pair.prefill.url, pd_pair.decode.url
    prompt = token_prompt(1801, PROMPT_TOKENS)
    transferred = metric_sum(d, BY_SOURCE, source="external_kv_transfer")
    computed = metric_sum(d, BY_SOURCE, source="local_compute")
    external_hits = metric_sum(d, "vllm:external_prefix_cache_hits_total")
    xfers = metric_sum(d, "vllm:nixl_xfer_time_seconds_count")
    failed = metric_sum(d, "vllm:nixl_num_failed_transfers_total")

    h = pd_handoff(pd_pair, prompt, max_tokens=8, request_id="pd-smoke-1")

    # Leg 1's answer is what leg 2 needs, pointing at the prefill's NIXL side channel on loopback.
    params = h.kv_transfer_params
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert (params["remote_host"], params["remote_port"]) == ("127.0.0.1", pd_pair.prefill_side_port)
    assert params["remote_num_tokens"] == PROMPT_TOKENS
    assert params["transfer_mode"] == "pull"
    assert params["remote_engine_id"] and params["remote_request_id"]
    assert sum(len(group) for group in params["remote_block_ids"]) == -(-PROMPT_TOKENS // 32)
    assert h.prefill.body["usage"]["completion_tokens"] == 1
    usage = h.decode.body["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (PROMPT_TOKENS, 8)

    # The decode replica loaded every prompt token over NIXL and computed none of them. (Its response
    # says cached_tokens 0 for NIXL-loaded tokens: only /metrics tells.)
    assert metric_sum(d, BY_SOURCE, source="external_kv_transfer") - transferred == PROMPT_TOKENS
    assert metric_sum(d, BY_SOURCE, source="local_compute") - computed == 0
    assert metric_sum(d, "vllm:external_prefix_cache_hits_total") - external_hits == PROMPT_TOKENS
    assert metric_sum(d, "vllm:nixl_xfer_time_seconds_count") - xfers >= 1
    assert metric_sum(d, "vllm:nixl_num_failed_transfers_total") - failed == 0

    # And decoded from it correctly: greedy output equals the prefill replica computing it alone.
    alone = complete_slow(p, prompt, max_tokens=8)
    assert h.decode.body["choices"][0]["text"] == alone.body["choices"][0]["text"]
