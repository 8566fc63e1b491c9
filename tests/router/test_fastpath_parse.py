"""router/http/fastpath.py parse_head: serves plain generate POSTs, leaves everything unusual to aiohttp."""

from __future__ import annotations

import pytest

from router.http.fastpath import parse_head
from router.http.proxy import request_header_lines

OK = b"POST /v1/completions HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\nContent-Length: 12"


def test_plain_generate_post_is_served() -> None:
    head = parse_head(OK + b"\r\nAuthorization: Bearer k1", 16384)
    assert head is not None
    assert (head.path, head.target, head.length, head.keep_alive, head.auth) == (
        "/v1/completions",
        b"/v1/completions",
        12,
        True,
        "Bearer k1",
    )
    assert (b"Content-Type", b"application/json") in head.headers


def test_chat_path_query_string_and_connection_close() -> None:
    raw = b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nContent-Length: 0\r\nConnection: Close"
    head = parse_head(raw, 16384)
    assert head is not None
    assert head.path == "/v1/chat/completions" and head.target == b"/v1/chat/completions?x=1"
    assert head.keep_alive is False


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /v1/completions HTTP/1.1\r\nContent-Length: 0",  # other method
        b"POST /v1/embeddings HTTP/1.1\r\nContent-Length: 2",  # other path
        b"POST /v1/completions HTTP/1.0\r\nContent-Length: 2",  # HTTP/1.0: aiohttp frames it
        b"POST /v1/completions HTTP/1.1\r\nHost: r",  # no Content-Length
        b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 2",  # TE + CL
        b"POST /v1/completions HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3",  # duplicate CL
        b"POST /v1/completions HTTP/1.1\r\nContent-Length: +2",  # not digits
        b"POST /v1/completions HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue",
        b"POST /v1/completions HTTP/1.1\r\nContent-Length: 2\r\nUpgrade: h2c",
        b"POST /v1/completions HTTP/1.1\r\nContent-Length : 2",  # space before the colon
        b"POST /v1/completions HTTP/1.1\r\nContent-Length: 2\r\n folded",  # obs-fold
        b"POST /v1/completions HTTP/1.1\r\nContent-Length: 2\nX-Smuggle: 1",  # bare LF
        b"POST /v1/completions HTTP/1.1\r\nContent-Length: 2\rX: 1",  # bare CR
        b"POST /v1/completions HTTP/1.1\r\nX: a\x00b\r\nContent-Length: 2",  # NUL
        b"POST /v1/completions HTTP/1.1\r\nNoColon\r\nContent-Length: 2",
        b"POST  /v1/completions HTTP/1.1\r\nContent-Length: 2",  # double space
    ],
)
def test_unusual_heads_are_left_to_aiohttp(raw: bytes) -> None:
    assert parse_head(raw, 16384) is None


def test_header_line_over_the_limit_is_left_to_aiohttp() -> None:
    raw = OK + b"\r\nX-Long: " + b"a" * 100
    assert parse_head(raw, 64) is None
    assert parse_head(raw, 16384) is not None


@pytest.mark.parametrize(
    "extra",
    [
        b"",
        b"\r\nConnection: keep-alive\r\nAuthorization: Bearer k\r\nX-Trace: 1",
        b"\r\nConnection: close\r\nKeep-Alive: timeout=5\r\nExpect-CT: x",
        b"\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\nX-Trace: 1",  # lists a header
    ],
)
def test_header_lines_for_the_engine_match_request_header_lines(extra: bytes) -> None:
    """The lines built while parsing are what request_header_lines makes of the same head; a
    Connection header naming other headers leaves the decision to request_header_lines."""
    head = parse_head(OK + extra, 16384)
    assert head is not None
    expected = request_header_lines(head.headers, None)
    assert head.lines in (None, expected)
    assert (head.lines is None) == (b"X-Secret" in extra)
    assert b"X-Secret" not in expected and b"Host:" not in expected and b"Content-Length" not in expected
