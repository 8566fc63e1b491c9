"""Bad input against a real `kvrouter serve` (in front of one sim replica): random JSON (types,
unicode, huge numbers, deep nesting) with hypothesis, and schemathesis cases generated from the
router's own OpenAPI document (router/http/openapi.py). A client mistake never gets a 500, never
crashes the router, and always gets an OpenAI-style error body."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.config import build_config
from router.http.openapi import openapi_spec
from tests.support.harness import SimFleet, debug_replicas, wait_for
from tests.support.procs import RouterProc, http


class Live:
    url = ""
    session: requests.Session | None = None


LIVE = Live()


@pytest.fixture(scope="module", autouse=True)
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterProc]:
    logs: Path = tmp_path_factory.mktemp("bad-input")
    sim = SimFleet(logs, 1, "--time-scale", "100", "--max-model-len", "512", name="sim-bad")
    r = RouterProc(
        logs,
        sim.urls,
        "--enable-debug",
        "--max-body-bytes",
        "262144",
        "--drain-grace",
        "0",
        "--first-byte-timeout",
        "5",
        name="r-bad",
    )
    wait_for(lambda: all(x["healthy"] for x in debug_replicas(r.url)["replicas"]), 10, "admitted")
    LIVE.url = r.url
    LIVE.session = requests.Session()
    yield r
    LIVE.session.close()
    try:
        assert r.proc.alive(), "router crashed on bad input"
        assert http("GET", r.url + "/health")[0] == 200
        assert "unhandled error" not in r.proc.log(tail=None), r.proc.log()
        assert debug_replicas(r.url)["index_invariants"] == "ok"
    finally:
        r.proc.stop()
        sim.proc.stop()


def check(status: int, ctype: str, raw: bytes, what: object, relayed: bool = False) -> None:
    assert status != 500, (what, raw[:300])
    if status >= 400 and not relayed:  # the router's own errors; an engine's 4xx is relayed as is
        assert ctype.startswith("application/json"), (status, ctype, raw[:200], what)
        err = json.loads(raw)["error"]
        assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)


def post(path: str, data: bytes) -> None:
    assert LIVE.session is not None
    resp = LIVE.session.post(
        LIVE.url + path, data=data, headers={"Content-Type": "application/json"}, timeout=15
    )
    check(
        resp.status_code,
        resp.headers.get("Content-Type", ""),
        resp.content,
        data[:300],
        "x-kvrouter-replica" in resp.headers,
    )


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
prompts = (
    st.text(max_size=200)
    | st.lists(st.text(max_size=20), max_size=3)
    | st.lists(st.integers(min_value=-(2**70), max_value=2**70), max_size=40)
    | st.lists(st.lists(st.integers(min_value=-5, max_value=2**40), max_size=10), max_size=3)
    | json_values
)
numbers = (
    st.none()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats()
    | st.text(max_size=5)
    | st.booleans()
)
completion_bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(["tiny", "nope", ""]) | json_values, "prompt": prompts},
    optional={
        "max_tokens": numbers,
        "stream": json_values,
        "cache_salt": json_values,
        "n": numbers,
        "temperature": numbers,
        "stream_options": json_values,
    },
)
messages = (
    st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "assistant", "tool", ""]) | json_values},
            optional={"content": json_values | st.text(max_size=100), "name": json_values},
        ),
        max_size=4,
    )
    | json_values
)
chat_bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(["tiny", "nope"]) | json_values, "messages": messages},
    optional={"max_tokens": numbers, "max_completion_tokens": numbers, "stream": json_values},
)
raw_bytes = (
    st.binary(max_size=300)
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.just(b"[" * 5000)
    | st.just(b'{"a":' * 3000 + b"1" + b"}" * 3000)
)

SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)


@SETTINGS
@given(body=completion_bodies)
def test_random_completion_bodies(body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    post("/v1/completions", data)
    post("/debug/route", data)


@SETTINGS
@given(body=chat_bodies)
def test_random_chat_bodies(body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    post("/v1/chat/completions", data)
    post("/debug/route", data)


@SETTINGS
@given(
    data=raw_bytes,
    path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/debug/route", "/tokenize"]),
)
def test_random_bytes(data: bytes, path: str) -> None:
    post(path, data)


SCHEMA = schemathesis.openapi.from_dict(
    openapi_spec(build_config({"server": {"enable_debug": True}}, env={}))
)


@SCHEMA.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_openapi_cases(case: Any) -> None:
    if case.path == "/metrics":
        case.headers = {**(case.headers or {}), "Accept": "text/plain"}
    resp = case.call(base_url=LIVE.url, session=LIVE.session, timeout=15)
    headers = {k.lower(): v[0] for k, v in resp.headers.items()}  # schemathesis: name -> [values]
    check(
        resp.status_code,
        headers.get("content-type", ""),
        resp.content,
        (case.method, case.path, case.body),
        "x-kvrouter-replica" in headers,
    )
    case.validate_response(resp, checks=[schemathesis.checks.not_a_server_error], excluded_checks=[])


@pytest.mark.parametrize(
    "path,data",
    [
        ("/v1/completions", b'{"model":"\\ud800","prompt":"x"}'),
        ("/v1/completions", b'{"model":"tiny","prompt":"x","cache_salt":"\\udfff"}'),
        ("/v1/completions", b'{"model":"tiny","prompt":[-1, 2]}'),
        ("/v1/completions", b'{"model":"tiny","prompt":[4294967296]}'),
        ("/v1/completions", b'{"model":"tiny","prompt":"x","max_tokens":1e400}'),
        ("/v1/chat/completions", b'{"model":"tiny","messages":[{"role":"user","content":"\\ud800"}]}'),
        ("/v1/completions", b'{"model":"tiny","prompt":"\xff\xfe"}'),
        ("/v1/completions", b"[" * 100000),
    ],
)
def test_known_edge_cases(path: str, data: bytes) -> None:
    post(path, data)
