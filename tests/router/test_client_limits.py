"""Units of the hostile-client limits (issue 21): targets, budgets, per-address tables, prompt
bounds, the expiry-heap bound. The end-to-end regressions are tests/reliability/test_hostile.py."""

from __future__ import annotations

import json
import logging

import pytest

from router.errors import BadRequest
from router.http.client_limits import BodyBudget, ClientTable, RejectLog, body_deadline, connection_cap
from router.http.prompt_limits import ContextLengthExceeded, ContextLimits, _token_id_count
from router.http.targets import clean_target, query_ok
from router.index import PrefixIndex


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        (b"/v1/completions", b"/v1/completions"),
        (b"/v1/completions?a=1&b=%20", b"/v1/completions?a=1&b=%20"),
        (b"/v1/%2e%2e/metrics", b"/metrics"),
        (b"/v1/../metrics", b"/metrics"),
        (b"/v1/./models", b"/v1/models"),
        (b"/tokenize/../reset_prefix_cache", b"/reset_prefix_cache"),
        (b"/../../v1/models", b"/v1/models"),
        (b"/v1/%7emodels?x", b"/v1/~models?x"),
        (b"/v1/a%2fb".replace(b"%2f", b"%3a"), b"/v1/a%3Ab"),
        (b"/a/b/..", b"/a/"),
    ],
)
def test_targets_are_normalised(raw: bytes, clean: bytes) -> None:
    assert clean_target(raw) == clean


@pytest.mark.parametrize(
    "raw",
    [
        b"http://evil.example:9999/tokenize",
        b"*",
        b"evil.example:443",
        b"/v1/..%2fsim/faults",
        b"/v1/%5c..",
        b"/v1/%00",
        b"/v1/%zz",
        b"/v1/\xff",
        b"/v1/completions?x=\x01",
        b"/v1/completions?x=\x7f",
        b"/v1/completions?x=%4",
        b"/v1/completions?x#frag",
    ],
)
def test_bad_targets_are_refused(raw: bytes) -> None:
    with pytest.raises(BadRequest):
        clean_target(raw)


def test_query_bytes() -> None:
    assert query_ok(b"") and query_ok(b"a=1&b=[2]|c") and query_ok(b"x=%41")
    assert not query_ok(b"x=\t") and not query_ok(b'x="') and not query_ok(b"x=%G1")


def test_body_budget_reserves_and_always_admits_one() -> None:
    b = BodyBudget(100)
    assert b.reserve(500)  # an idle router takes one request of any size
    assert not b.reserve(1)
    b.release(500)
    assert b.reserve(60) and b.reserve(40) and not b.reserve(1)
    assert BodyBudget(0).reserve(10**12)  # 0: no cap


def test_deadlines_and_connection_cap() -> None:
    assert body_deadline(64 * 1024, 10.0, 64 * 1024) == 11.0
    assert connection_cap(0) == 0 and connection_cap(500) == 500
    assert connection_cap(-1, nofile=1024) == (1024 - 128) // 2
    assert connection_cap(-1, nofile=100) == 64


def test_client_table_connections_and_rate() -> None:
    t = ClientTable(2, 1.0, 2)
    now = [0.0]
    t._clock = lambda: now[0]
    assert t.connect("a") and t.connect("a") and not t.connect("a") and t.connect("b")
    t.disconnect("a")
    assert t.connect("a")
    assert t.allow_request("c") and t.allow_request("c") and not t.allow_request("c")
    now[0] = 1.0
    assert t.allow_request("c") and not t.allow_request("c")


def test_reject_log_is_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    suppressed: list[int] = []
    rl = RejectLog(3.0, lambda: suppressed.append(1))
    with caplog.at_level(logging.INFO, logger="kvrouter.clients"):
        for _ in range(50):
            rl("bad_target", "1.2.3.4")
    assert len(caplog.records) == 3 and len(suppressed) == 47


def _limits(max_len: int = 100) -> ContextLimits:
    cards = [{"id": "m", "max_model_len": max_len}]
    return ContextLimits(lambda: cards, max_chars_per_token=4, offload_parse_bytes=1000)


def test_prompt_checks_speak_vllm() -> None:
    lim = _limits()
    lim.check_prompt("m", [1] * 100)
    lim.check_prompt("m", "x" * 400)
    with pytest.raises(ContextLengthExceeded) as e:
        lim.check_prompt("m", [1] * 101)
    err = json.loads(e.value.body())["error"]
    assert err == {
        "message": "This model's maximum context length is 100 tokens. However, your prompt contains 101 input "
        "tokens, which exceeds this limit even without any output tokens. Please reduce the length of the input "
        "prompt. (parameter=input_tokens, value=101)",
        "type": "BadRequestError",
        "param": "input_tokens",
        "code": 400,
    }
    with pytest.raises(ContextLengthExceeded, match="input_text"):
        lim.check_prompt("m", ["ok", "x" * 401])
    with pytest.raises(ContextLengthExceeded):
        lim.check_prompt("m", [[1], [2] * 101])
    _limits().check_prompt("other-model", [1] * 10**4)  # unknown model: its 404 comes later
    with pytest.raises(ContextLengthExceeded):
        _limits().check_prompt(None, [1] * 101)  # no model named: the one the fleet serves


def test_precheck_counts_ids_without_decoding() -> None:
    body = b'{"model":"m","prompt": [ ' + b"1," * 2000 + b"1]}"
    assert _token_id_count(body) == 2001
    assert _token_id_count(b'{"prompt":"text [1,2]"}') is None
    with pytest.raises(ContextLengthExceeded, match="2001 input tokens"):
        _limits().precheck("/v1/completions", body)
    _limits().precheck("/v1/chat/completions", body)  # chat: no byte bound
    with pytest.raises(ContextLengthExceeded, match="request body has"):
        _limits().precheck("/v1/completions", b'{"prompt":"' + b"x" * (2 << 20) + b'"}')


def test_speculative_records_stay_bounded_by_capacity() -> None:
    t = [0.0]
    idx = PrefixIndex(64, speculative_ttl_s=300.0, clock=lambda: t[0])
    idx.add_replica("r0")
    for i in range(2000):
        idx.store("r0", [i * 1000 + k for k in range(50)], speculative=True)
    bound = 2 * max(4096, 64 * 2)
    assert idx.spec_held <= bound + 50
    assert idx.spec_compacted > 0
    idx.check_invariants()
