"""router/pd/handoff.py: the two legs' bodies and the checks on P's answer, exactly vLLM's contract."""

from __future__ import annotations

import json
from typing import Any

import pytest

from router.pd.handoff import (
    HandoffError,
    decode_body,
    decode_params,
    prefill_body,
    returned_params,
    with_request_id,
)

P_PARAMS: dict[str, Any] = {
    "do_remote_prefill": True,
    "do_remote_decode": False,
    "remote_block_ids": [[1, 2, 3]],
    "remote_engine_id": "eng",
    "remote_request_id": "cmpl-1-0",
    "remote_host": "localhost",
    "remote_port": 5601,
    "tp_size": 1,
    "dcp_size": 1,
    "pp_size": 1,
    "remote_num_tokens": 40,
    "remote_blocks_expiry_time": None,
    "transfer_mode": "pull",
}


def test_prefill_body_completion() -> None:
    req = {
        "model": "m",
        "prompt": "p",
        "max_tokens": 64,
        "stream": True,
        "stream_options": {"include_usage": True},
        "min_tokens": 3,
        "temperature": 0.5,
        "kv_transfer_params": {"junk": 1},
    }
    out = json.loads(prefill_body(req))
    assert out == {
        "model": "m",
        "prompt": "p",
        "max_tokens": 1,
        "stream": False,
        "temperature": 0.5,
        "n": 1,
        "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False},
    }
    assert req["max_tokens"] == 64 and req["stream"] is True  # the client's request is not touched


def test_prefill_body_chat_with_max_completion_tokens() -> None:
    req = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "max_completion_tokens": 99,
        "min_completion_tokens": 2,
    }
    out = json.loads(prefill_body(req))
    assert out["max_completion_tokens"] == 1 and out["max_tokens"] == 1
    assert "min_completion_tokens" not in out and out["stream"] is False


def test_returned_params_checks() -> None:
    ok = returned_params(json.dumps({"choices": [], "kv_transfer_params": P_PARAMS}).encode())
    assert ok == P_PARAMS
    cases = [
        (b"not json", "bad_answer"),
        (b"[1]", "bad_answer"),
        (json.dumps({"choices": [], "kv_transfer_params": None}).encode(), "no_params"),
        (json.dumps({"choices": []}).encode(), "no_params"),
        (json.dumps({"kv_transfer_params": {}}).encode(), "no_params"),
        (json.dumps({"kv_transfer_params": [1]}).encode(), "bad_params"),
        (json.dumps({"kv_transfer_params": {**P_PARAMS, "do_remote_prefill": False}}).encode(), "bad_params"),
        (json.dumps({"kv_transfer_params": {**P_PARAMS, "remote_block_ids": None}}).encode(), "bad_params"),
    ]
    for body, reason in cases:
        with pytest.raises(HandoffError) as ei:
            returned_params(body)
        assert ei.value.reason == reason, body
    push = {**P_PARAMS, "transfer_mode": "push"}
    del push["remote_block_ids"]
    assert returned_params(json.dumps({"kv_transfer_params": push}).encode())["transfer_mode"] == "push"


def test_decode_params_verbatim_but_reachable_host() -> None:
    out = decode_params(P_PARAMS, "http://10.1.2.3:8000")
    assert out == {**P_PARAMS, "remote_host": "10.1.2.3"}
    assert P_PARAMS["remote_host"] == "localhost"
    real = {**P_PARAMS, "remote_host": "10.9.9.9"}
    assert decode_params(real, "http://10.1.2.3:8000") == real  # a real address is never rewritten
    push = decode_params({**P_PARAMS, "transfer_mode": "push"}, "http://p:1")
    assert "remote_block_ids" not in push and push["remote_host"] == "p"


def test_decode_body_is_the_original_request_plus_params() -> None:
    req = {"model": "m", "prompt": "p", "max_tokens": 64, "stream": True, "min_tokens": 3}
    out = json.loads(decode_body(req, P_PARAMS))
    assert out == {**req, "kv_transfer_params": P_PARAMS}


def test_request_id_reused_or_added_once() -> None:
    h, rid = with_request_id(b"Content-Type: application/json\r\nX-Request-ID: abc\r\n")
    assert rid == "abc" and h.count(b"abc") == 1
    h2, rid2 = with_request_id(b"Content-Type: application/json\r\n")
    assert len(rid2) == 32 and h2.endswith(b"X-Request-Id: " + rid2.encode() + b"\r\n")
