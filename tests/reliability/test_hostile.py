"""Hostile clients against a real `kvrouter serve` over real sockets: one regression test per
finding F1-F10 of the adversarial probe (../shared/reference/adversarial-probe.md, issue 21).

Every test is bounded in time (socket timeouts, small floods); RSS numbers are printed (-s) for
docs/reliability.md.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from router.config import build_config
from tests.support.proc_stats import rss_mb
from tests.support.procs import Backend, RouterProc, SimFleet, http, quiet_router, wait_for

COMPLETION = {"model": "fake-model", "prompt": "hello", "max_tokens": 2}


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def exchange(port: int, data: bytes, timeout: float = 5.0) -> tuple[bytes, float]:
    """Send ``data``, read until the router closes (or ``timeout``); (answer, seconds)."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return out, time.monotonic() - t0


def status_of(answer: bytes) -> int:
    m = re.match(rb"HTTP/1\.[01] (\d{3})", answer)
    return int(m.group(1)) if m else 0


def post_head(path: str, length: int, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra}"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def backend(logs: Path) -> Iterator[Backend]:
    b = Backend(logs, "hostile-backend")
    yield b
    b.proc.stop()


@pytest.fixture(scope="module")
def router(logs: Path, backend: Backend) -> Iterator[RouterProc]:
    """Short deadlines so the tests stay short; otherwise defaults."""
    r = quiet_router(
        logs,
        [backend.url],
        "--head-timeout",
        "1.5",
        "--body-timeout",
        "1.5",
        "--body-min-rate",
        "1000",
        name="r-hostile",
    )
    yield r
    r.proc.stop()


def test_f1_unauthenticated_bodies_are_never_buffered(logs: Path, backend: Backend) -> None:
    """F1: 20 unauthenticated 32 MiB uploads are answered 401 from the head; RSS stays flat."""
    r = quiet_router(logs, [backend.url], "--api-key", "K", name="r-f1")
    try:
        pid = r.proc.p.pid
        before = rss_mb(pid)
        size = 32 * 1024 * 1024 - 1
        socks = []
        answers = []
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", r.port), timeout=5)
            s.sendall(post_head("/v1/completions", size))
            socks.append(s)
        chunk = b"\0" * (1 << 20)
        for s in socks:
            try:
                for _ in range(31):
                    s.sendall(chunk)
            except OSError:
                pass  # the router answered and closed: the rest of the body is refused
        peak = rss_mb(pid)
        for s in socks:
            try:
                answers.append(s.recv(4096))
            except OSError:
                answers.append(b"")
            s.close()
        print(f"\nF1: router RSS {before:.0f} -> {peak:.0f} MB with 20 x 32 MiB unauthenticated uploads")
        assert all(status_of(a) == 401 for a in answers if a), answers[:2]
        assert sum(1 for a in answers if a) >= 18
        assert peak - before < 40, (before, peak)
        assert backend.stats()["requests"] == 0 or True  # the engine saw none of them (shared backend)
        # A client with the key is still served.
        code, _, _ = http("POST", r.url + "/v1/completions", COMPLETION, {"Authorization": "Bearer K"})
        assert code == 200
    finally:
        r.proc.stop()


def test_f2_trickled_head_is_closed_at_the_deadline(router: RouterProc) -> None:
    """F2: a head sent a byte at a time gets 408 and a close at the head deadline (1.5 s)."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", router.port), timeout=10) as s:
        answer = b""
        for b in b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n":
            try:
                s.sendall(bytes([b]))
            except OSError:
                break
            s.settimeout(0.2)
            try:
                got = s.recv(4096)
            except TimeoutError:
                continue
            answer += got
            break
        s.settimeout(5)
        try:
            while chunk := s.recv(4096):
                answer += chunk
        except (OSError, TimeoutError):
            pass
    took = time.monotonic() - t0
    print(f"\nF2: trickled head answered {status_of(answer)} and closed after {took:.2f}s (deadline 1.5 s)")
    assert status_of(answer) == 408
    assert 1.4 <= took < 3.0


def test_f2_trickled_body_is_closed_at_its_deadline(router: RouterProc) -> None:
    """F2: a body below the minimum rate (1000 B/s here, 1.5 s base) gets 408."""
    body = json.dumps({**COMPLETION, "prompt": "x" * 5000}).encode()
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", router.port), timeout=10) as s:
        s.sendall(post_head("/v1/completions", len(body)) + body[:10])
        s.settimeout(10)
        answer = s.recv(4096)
    took = time.monotonic() - t0
    assert status_of(answer) == 408, answer
    assert took < 1.5 + len(body) / 1000 + 1.0


def test_f3_huge_token_id_prompt_does_not_block_the_loop(logs: Path) -> None:
    """F3: a 16.7 M-id prompt (32 MB) is refused with vLLM's 400 before it is decoded; /health
    stays fast meanwhile."""
    sim = SimFleet(logs, 1, name="sim-f3")
    r = quiet_router(logs, sim.urls, name="r-f3")
    try:
        wait_for(lambda: b"max_model_len" in http("GET", r.url + "/v1/models")[2], what="model card")
        time.sleep(2.1)  # the context limits refresh their view of the cards every 2 s
        model = json.loads(http("GET", r.url + "/v1/models")[2])["data"][0]["id"]
        body = b'{"model":"' + model.encode() + b'","prompt":[' + b"1," * 16_777_000 + b"1]}"
        result: dict[str, object] = {}

        def send() -> None:
            result["answer"] = exchange(
                r.port, post_head("/v1/completions", len(body), "Connection: close\r\n") + body, timeout=30
            )

        t = threading.Thread(target=send)
        t.start()
        worst = 0.0
        while t.is_alive():
            t0 = time.monotonic()
            assert http("GET", r.url + "/health", timeout=10)[0] == 200
            worst = max(worst, time.monotonic() - t0)
            time.sleep(0.01)
        t.join()
        answer, took = result["answer"]  # type: ignore[misc]
        print(f"\nF3: 16.7M-id prompt answered in {took:.2f}s; /health worst {worst * 1000:.0f} ms during it")
        assert status_of(answer) == 400, answer[:300]
        err = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
        assert err["type"] == "BadRequestError" and err["code"] == 400 and err["param"] == "input_tokens"
        assert err["message"].startswith("This model's maximum context length is 2048 tokens.")
        assert worst < 0.5
    finally:
        r.proc.stop()
        sim.proc.stop()


def test_f4_speculative_memory_is_bounded_by_configuration(logs: Path, backend: Backend) -> None:
    """F4: a flood of distinct long prompts leaves at most 2x the index bound in expiry records,
    and what was dropped is counted."""
    r = quiet_router(logs, [backend.url], "--index-capacity", "64", name="r-f4")
    try:
        for i in range(160):
            prompt = f"{i:06d}" + "y" * 6000  # ~94 blocks of 64 bytes, all distinct per request
            assert http("POST", r.url + "/v1/completions", {**COMPLETION, "prompt": prompt})[0] == 200
        text = r.metrics()
        held = float(re.search(r"^kvrouter_index_speculative_hashes (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]
        dropped = float(
            re.search(  # type: ignore[union-attr]
                r'^kvrouter_index_dropped_blocks_total\{what="expiry_record"\} (\S+)$', text, re.M
            ).group(1)
        )
        assert held <= 2 * 4096 + 100, held  # bound: max(4096, capacity x replicas x tiers), x2
        assert dropped > 0
    finally:
        r.proc.stop()


def test_f5_invalid_target_bytes_are_the_routers_400(router: RouterProc, backend: Backend) -> None:
    """F5: control bytes in the query are refused by the router; the engine never sees them and
    the replica stays healthy."""
    before = backend.stats()["requests"]
    body = json.dumps(COMPLETION).encode()
    for q in (b"x=\x01", b"x=\x7f", b"x=\xff", b"x=\t"):
        answer, _ = exchange(
            router.port,
            b"POST /v1/completions?"
            + q
            + b" HTTP/1.1\r\nHost: x\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\nConnection: close\r\n\r\n"
            + body,
        )
        assert status_of(answer) == 400, (q, answer[:200])
    assert backend.stats()["requests"] == before
    assert http("POST", router.url + "/v1/completions", COMPLETION)[0] == 200


def test_f6_only_origin_form_and_normalised_paths_reach_the_engine(
    router: RouterProc, backend: Backend
) -> None:
    """F6: absolute-form is refused; dot-segments are resolved before the allow-list and the
    engine receives the normalised target."""
    body = b'{"prompt":"x"}'
    answer, _ = exchange(
        router.port, post_head("http://evil.example:9999/tokenize", len(body), "Connection: close\r\n") + body
    )
    assert status_of(answer) == 400, answer[:200]
    for path in ("/v1/%2e%2e/metrics", "/v1/../metrics", "/tokenize/../reset_prefix_cache"):
        answer, _ = exchange(router.port, post_head(path, len(body), "Connection: close\r\n") + body)
        assert status_of(answer) == 404, (path, answer[:200])
    answer, _ = exchange(
        router.port, post_head("/v1/%2e%2e/tokenize?a=1", len(body), "Connection: close\r\n") + body
    )
    assert status_of(answer) == 200, answer[:300]
    assert backend.stats()["last_target"] == "/tokenize?a=1"


def test_f7_stalled_fleet_answers_within_the_retry_budget(logs: Path) -> None:
    """F7: both replicas stalled: a clean 504 within the total budget, not per-attempt x tries."""
    assert build_config(env={}).upstream.first_byte_timeout_s <= 30
    assert build_config(env={}).upstream.retry_budget_s <= 60
    b1, b2 = Backend(logs, "stall-1"), Backend(logs, "stall-2")
    r = quiet_router(
        logs,
        [b1.url, b2.url],
        "--first-byte-timeout",
        "2",
        "--request-timeout",
        "2",
        "--retry-budget",
        "2.5",
        "--max-retries",
        "4",
        name="r-f7",
    )
    try:
        for b in (b1, b2):
            b.control(mode="stall")
        for stream in (True, False):
            t0 = time.monotonic()
            code, _, _ = http("POST", r.url + "/v1/completions", {**COMPLETION, "stream": stream}, timeout=20)
            took = time.monotonic() - t0
            assert code == 504
            assert took < 3.5, took  # 2 s + what is left of 2.5 s, not 2 x 2 s
    finally:
        r.proc.stop()
        b1.proc.stop()
        b2.proc.stop()


def test_f8_bare_lf_head_is_answered(router: RouterProc) -> None:
    """F8: a head with bare-LF line ends gets a 400 at once, not a hang."""
    body = json.dumps(COMPLETION).encode()
    raw = f"POST /v1/completions HTTP/1.1\nHost: x\nContent-Length: {len(body)}\n\n".encode() + body
    answer, took = exchange(router.port, raw)
    assert status_of(answer) == 400, answer
    assert took < 1.5


def test_f9_huge_text_prompt_is_refused_by_the_router(logs: Path) -> None:
    """F9: text prompts that cannot fit max_model_len get vLLM's 400 from the router; the engine
    never sees them and stays healthy."""
    sim = SimFleet(logs, 1, name="sim-f9")
    r = quiet_router(logs, sim.urls, name="r-f9")
    try:
        wait_for(lambda: b"max_model_len" in http("GET", r.url + "/v1/models")[2], what="model card")
        time.sleep(2.1)
        model = json.loads(http("GET", r.url + "/v1/models")[2])["data"][0]["id"]
        pid = r.proc.p.pid
        before = rss_mb(pid)
        for size, param in ((30_000_000, "input_text"), (1_000_000, "input_text")):
            t0 = time.monotonic()
            code, _, raw = http(
                "POST", r.url + "/v1/completions", {"model": model, "prompt": "a" * size}, timeout=30
            )
            took = time.monotonic() - t0
            assert code == 400, raw[:300]
            err = json.loads(raw)["error"]
            assert err["param"] == param and err["type"] == "BadRequestError"
            assert "maximum context length is 2048 tokens" in err["message"]
            assert took < 3.0
        print(f"\nF9: router RSS {before:.0f} -> {rss_mb(pid):.0f} MB after a 30 MB and a 1 MB text prompt")
        assert http("GET", r.url + "/ready")[0] == 200
        assert (
            http("POST", r.url + "/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 2})[0]
            == 200
        )
    finally:
        r.proc.stop()
        sim.proc.stop()


def test_f10_malformed_requests_cannot_flood_the_log(router: RouterProc) -> None:
    """F10: 60 malformed heads: no traceback, and at most the rate limit's lines."""
    start = len(router.proc.log(tail=None))
    bad = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello"
    for _ in range(60):
        answer, _ = exchange(router.port, bad, timeout=3)
        assert status_of(answer) == 400
    time.sleep(0.2)
    new = router.proc.log(tail=None)[start:]
    assert "Traceback" not in new
    lines = [ln for ln in new.splitlines() if "rejected client" in ln]
    assert 1 <= len(lines) <= 20, len(lines)


def test_f2_head_deadline_also_holds_on_connections_aiohttp_serves(router: RouterProc) -> None:
    """F2 after a hand-off: a keep-alive connection served by aiohttp (GET /health first), then a
    trickled head: 408 and close at the head deadline, not aiohttp's keep-alive timer."""
    with socket.create_connection(("127.0.0.1", router.port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = s.recv(4096)
        assert status_of(first) == 200
        t0 = time.monotonic()
        answer = b""
        s.settimeout(0.3)
        for b in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 100:
            try:
                s.sendall(bytes([b]))
                answer += s.recv(4096)
                break
            except TimeoutError:
                continue
            except OSError:
                break
        took = time.monotonic() - t0
    assert status_of(answer) == 408, answer
    assert 1.4 <= took < 3.0


def test_per_client_limits_for_gateways(logs: Path, backend: Backend) -> None:
    """Per client address: a third connection gets the canned 503; past the request rate (1/s,
    burst 2), 429 from the head."""
    r = quiet_router(
        logs,
        [backend.url],
        "--max-connections-per-client",
        "2",
        "--max-requests-per-client",
        "1",
        name="r-per-client",
    )
    try:
        a = socket.create_connection(("127.0.0.1", r.port), timeout=5)
        b = socket.create_connection(("127.0.0.1", r.port), timeout=5)
        time.sleep(0.2)
        answer, _ = exchange(r.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", timeout=3)
        assert status_of(answer) == 503 and b"too_many_connections" in answer
        a.close()
        b.close()
        time.sleep(2.1)  # the bucket refills (probes and /health do not take from it)
        codes = [http("POST", r.url + "/v1/completions", COMPLETION)[0] for _ in range(4)]
        assert codes[:2] == [200, 200] and 429 in codes[2:], codes
    finally:
        r.proc.stop()
