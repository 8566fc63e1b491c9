"""Prefill/decode disaggregation end to end: `kvrouter serve --prefill URL --decode URL` in front of
fake replicas that check the vLLM NixlConnector contract on each leg (tests/support/fake_pd.py)."""

from __future__ import annotations

import json
import re
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import PY, Proc, RouterProc, _ready, free_port, http, wait_for

MODEL = "fake-model"


class PDReplica:
    def __init__(self, log_dir: Path, role: str, name: str, version: str = "0.32.0") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = Proc(
            [
                PY,
                "-m",
                "tests.support.fake_pd",
                "--port",
                str(self.port),
                "--role",
                role,
                "--version",
                version,
            ],
            name,
            log_dir,
        )
        _ready(self.proc, self.url + "/health")

    def control(self, **kw: Any) -> None:
        http("POST", self.url + "/_control", kw)

    def stats(self) -> dict[str, Any]:
        return dict(json.loads(http("GET", self.url + "/_stats")[2]))


def _router(logs: Path, p: list[str], d: list[str], *extra: str, name: str) -> RouterProc:
    flags: list[str] = []
    for u in p:
        flags += ["--prefill", u]
    for u in d:
        flags += ["--decode", u]
    r = RouterProc(
        logs,
        [],
        *flags,
        "--kv-events",
        "off",
        "--metrics-interval",
        "0.1",
        "--enable-debug",
        "--drain-grace",
        "0",
        "--eject-after",
        "1000",
        *extra,
        name=name,
    )
    # /ready turns true with the first admitted replica; the tests need all of them
    wait_for(
        lambda: len(re.findall(r"kvrouter_replica_healthy\{[^}]*\} 1\.0", r.metrics())) == len(p) + len(d),
        what="every replica admitted",
    )
    return r


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pd-logs")


@pytest.fixture(scope="module")
def fleet(logs: Path) -> Iterator[tuple[PDReplica, PDReplica, RouterProc]]:
    p = PDReplica(logs, "prefill", "prefill")
    d = PDReplica(logs, "decode", "decode")
    d.control(running=32)  # a busy decode batch: local prefill would stall 32 sequences
    r = _router(logs, [p.url], [d.url], name="router-pd")
    # the decode replica's running batch must have been scraped before the decisions below
    wait_for(lambda: re.search(r'kvrouter_engine_running\{replica="[^"]+"\} 32', r.metrics()), what="scrape")
    yield p, d, r
    for proc in (r.proc, p.proc, d.proc):
        proc.stop()


@pytest.fixture(autouse=True)
def reset(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "fleet" in request.fixturenames:
        p, d, _ = request.getfixturevalue("fleet")
        p.control(mode="ok", prefill_delay=0.0, transfer_mode="pull")
        d.control(mode="ok", chunk_delay=0.0)


def _prompt(n_chars: int) -> str:
    tag = uuid.uuid4().hex
    words = (f"w{tag[i % 32]}{i} " for i in range(n_chars))
    return "".join(words)[:n_chars]


def _outcomes(r: RouterProc) -> dict[str, float]:
    out = {}
    for m in re.finditer(r'kvrouter_pd_decisions_total\{outcome="([^"]+)"\} ([0-9.e+]+)', r.metrics()):
        out[m.group(1)] = float(m.group(2))
    return out


def _stream(r: RouterProc, prompt: str, max_tokens: int = 6, **extra: Any) -> bytes:
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "min_tokens": 2,
        **extra,
    }
    code, headers, raw = http("POST", r.url + "/v1/completions", body, timeout=30)
    assert code == 200, raw
    assert headers.get("Content-Type", "").startswith("text/event-stream")
    return raw


def _expected_stream(max_tokens: int) -> bytes:
    """What the decode replica streams, byte for byte (fake_pd._chunk)."""
    out = b""
    for i in range(max_tokens):
        obj = {
            "id": "cmpl-d",
            "object": "text_completion",
            "model": MODEL,
            "choices": [{"index": 0, "text": f"d{i} ", "finish_reason": None}],
        }
        out += b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
    return out + b"data: [DONE]\n\n"


def test_long_uncached_prompt_is_split_and_handed_off_exactly(
    fleet: tuple[PDReplica, PDReplica, RouterProc],
) -> None:
    p, d, r = fleet
    before = _outcomes(r)
    d0, p0 = d.stats(), p.stats()
    raw = _stream(r, _prompt(4000))
    assert raw == _expected_stream(6)  # the decode replica's stream, byte for byte
    ps, ds = p.stats(), d.stats()
    assert ps["violations"] == [] and ds["violations"] == []
    leg1 = ps["bodies"][-1]
    assert leg1["kv_transfer_params"] == {"do_remote_decode": True, "do_remote_prefill": False}
    assert leg1["stream"] is False and leg1["max_tokens"] == 1
    assert "stream_options" not in leg1 and "min_tokens" not in leg1
    leg2 = ds["bodies"][-1]
    # leg 2: the original request (stream options, min_tokens kept) + P's params verbatim,
    # remote_host corrected from "localhost" to P's address
    assert (
        leg2["stream"] is True
        and leg2["min_tokens"] == 2
        and leg2["stream_options"] == {"include_usage": True}
    )
    ktp = leg2["kv_transfer_params"]
    assert ktp["remote_host"] == "127.0.0.1" and ktp["do_remote_prefill"] is True
    assert ktp["remote_request_id"] in ps["handoffs"]
    # the same X-Request-Id on both legs
    assert ps["handoffs"][ktp["remote_request_id"]] == ds["request_ids"][-1] is not None
    # the decode replica counted the prompt as transferred, not computed
    assert ds["external_kv_transfer"] > d0["external_kv_transfer"]
    assert ds["local_compute"] == d0["local_compute"]
    assert ps["prefilled_tokens"] > p0["prefilled_tokens"]
    assert _outcomes(r).get("split", 0) == before.get("split", 0) + 1


def test_push_mode_omits_block_ids(fleet: tuple[PDReplica, PDReplica, RouterProc]) -> None:
    p, d, r = fleet
    p.control(transfer_mode="push")
    assert _stream(r, _prompt(4000)) == _expected_stream(6)
    ktp = d.stats()["bodies"][-1]["kv_transfer_params"]
    assert ktp["transfer_mode"] == "push" and "remote_block_ids" not in ktp
    assert d.stats()["violations"] == []


def test_short_and_decode_cached_prompts_stay_local(fleet: tuple[PDReplica, PDReplica, RouterProc]) -> None:
    p, d, r = fleet
    before = _outcomes(r)
    n_p = p.stats()["requests"]
    assert _stream(r, "short prompt") == _expected_stream(6)
    assert _outcomes(r).get("local_short", 0) == before.get("local_short", 0) + 1
    prompt = _prompt(4000)
    _stream(r, prompt)  # split: the decode replica now holds the prompt's KV
    n_p = p.stats()["requests"]
    ext = d.stats()["external_kv_transfer"]
    _stream(r, prompt)
    after = _outcomes(r)
    assert after.get("local_cached", 0) == before.get("local_cached", 0) + 1
    assert p.stats()["requests"] == n_p  # no prefill leg
    assert d.stats()["external_kv_transfer"] == ext
    assert "kv_transfer_params" not in d.stats()["bodies"][-1]


@pytest.mark.parametrize(
    ("mode", "outcome"), [("fail", "fallback_prefill_status_500"), ("no_params", "fallback_no_params")]
)
def test_failed_prefill_leg_falls_back_to_decode_only(
    fleet: tuple[PDReplica, PDReplica, RouterProc], mode: str, outcome: str
) -> None:
    p, d, r = fleet
    p.control(mode=mode)
    before = _outcomes(r)
    assert _stream(r, _prompt(4000)) == _expected_stream(6)
    assert _outcomes(r).get(outcome, 0) == before.get(outcome, 0) + 1
    assert "kv_transfer_params" not in d.stats()["bodies"][-1]  # decode-only, seen as such


def test_debug_route_shows_both_estimates(fleet: tuple[PDReplica, PDReplica, RouterProc]) -> None:
    _, _, r = fleet
    code, _, raw = http(
        "POST", r.url + "/debug/route", {"model": MODEL, "prompt": _prompt(4000), "max_tokens": 4}
    )
    assert code == 200, raw
    pd = json.loads(raw)["pd"]
    assert pd["outcome"] == "split" and pd["local_ttft_s"] > 0 and pd["remote_ttft_s"] > 0
    assert pd["decode"] and pd["prefill"]


def _raw_request(r: RouterProc, body: dict[str, Any]) -> socket.socket:
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", int(r.url.rsplit(":", 1)[1])), timeout=10)
    s.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(data), data)
    )
    return s


def test_disconnect_during_prefill_cancels_it_and_never_sends_leg_2(
    fleet: tuple[PDReplica, PDReplica, RouterProc],
) -> None:
    p, d, r = fleet
    p.control(mode="stall")
    n_d = d.stats()["requests"]
    cancelled = p.stats()["cancelled"]
    s = _raw_request(r, {"model": MODEL, "prompt": _prompt(4000), "max_tokens": 6, "stream": True})
    wait_for(
        lambda: p.stats()["requests"] > 0 and p.stats()["bodies"][-1].get("kv_transfer_params"), what="leg 1"
    )
    time.sleep(0.2)
    s.close()
    wait_for(lambda: p.stats()["cancelled"] > cancelled, what="prefill leg cancelled")
    time.sleep(0.3)
    assert d.stats()["requests"] == n_d


def test_disconnect_during_decode_cancels_it(fleet: tuple[PDReplica, PDReplica, RouterProc]) -> None:
    _, d, r = fleet
    d.control(chunk_delay=0.2)
    cancelled = d.stats()["cancelled"]
    s = _raw_request(r, {"model": MODEL, "prompt": _prompt(4000), "max_tokens": 50, "stream": True})
    assert s.recv(4096).startswith(b"HTTP/1.1 200")
    s.close()
    wait_for(lambda: d.stats()["cancelled"] > cancelled, what="decode leg cancelled")
    assert "kv_transfer_params" in d.stats()["bodies"][-1]


def test_n_greater_than_one_runs_decode_only(fleet: tuple[PDReplica, PDReplica, RouterProc]) -> None:
    _, d, r = fleet
    before = _outcomes(r)
    code, _, raw = http(
        "POST",
        r.url + "/v1/completions",
        {"model": MODEL, "prompt": _prompt(4000), "max_tokens": 3, "n": 2},
        timeout=30,
    )
    assert code == 200, raw
    assert _outcomes(r).get("local_n", 0) == before.get("local_n", 0) + 1
    assert "kv_transfer_params" not in d.stats()["bodies"][-1]


def test_version_mismatch_is_refused_loudly(logs: Path) -> None:
    p = PDReplica(logs, "prefill", "prefill-old", version="0.31.0")
    d = PDReplica(logs, "decode", "decode-v")
    d.control(running=32)
    r = _router(logs, [p.url], [d.url], name="router-pd-version")
    try:
        wait_for(
            lambda: re.search(r'kvrouter_engine_running\{replica="[^"]+"\} 32', r.metrics()), what="scrape"
        )
        wait_for(
            lambda: (_stream(r, _prompt(4000)), _outcomes(r).get("local_version_mismatch", 0))[1] > 0,
            what="version refusal",
            timeout=10,
            interval=0.2,
        )
        assert p.stats()["requests"] == 0
        assert "kvrouter_pd_version_mismatch_total" in r.metrics()
        assert "REFUSING to pair" in r.proc.log_path.read_text()
    finally:
        for proc in (r.proc, p.proc, d.proc):
            proc.stop()
