"""Request targets the router accepts and forwards (issue 21, F5/F6).

Only origin-form (``/path?query``) is accepted: an absolute-form target (``http://host/path``)
would reach the engine verbatim, and a spec-following proxy in front of it routes by that
authority (RFC 9112 3.2.2), carrying the upstream key. The path is normalised before the
allow-list sees it, and the same normalised string is what the engine receives:

* percent-encoded unreserved characters are decoded (``%7E`` -> ``~``, ``%2e`` -> ``.``), other
  escapes upper-cased (RFC 3986 6.2.2.1-2);
* dot-segments are removed (RFC 3986 5.2.4), so ``/v1/%2e%2e/metrics`` is ``/metrics`` and meets
  the allow-list as that;
* an encoded slash, backslash or NUL (``%2F``, ``%5C``, ``%00``) is refused: engines and
  proxies disagree on whether it separates segments.

Bytes outside RFC 3986 (controls, DEL, space, non-ASCII, ``"<>\\^`{|}#``) are refused with a 400 by
the router, so no engine parse error can be charged to a replica's health.
"""

from __future__ import annotations

from router.errors import BadRequest

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset(b"0123456789abcdefABCDEF")
# pchar (RFC 3986 3.3) minus "%", which is checked as an escape: unreserved / sub-delims / ":" / "@"
_PCHAR = _UNRESERVED | frozenset(b"!$&'()*+,;=:@")
_PATH_OK = _PCHAR | frozenset(b"/%")
# The query also allows "/" and "?"; "[" "]" "|" are outside RFC 3986 but sent unescaped by common
# clients and harmless to every HTTP parser we forward to.
_QUERY_OK = _PCHAR | frozenset(b"/?%[]|")
_FORBIDDEN_ESCAPES = frozenset(("2F", "5C", "00"))


def query_ok(query: bytes) -> bool:
    """Whether a query string (without the ``?``) has only bytes the router forwards."""
    if not query:
        return True
    if not _QUERY_OK.issuperset(query):
        return False
    i = query.find(b"%")
    while i >= 0:
        if not _valid_escape(query, i):
            return False
        i = query.find(b"%", i + 3)
    return True


def _valid_escape(s: bytes, i: int) -> bool:
    return i + 2 < len(s) and s[i + 1] in _HEX and s[i + 2] in _HEX


def normalise_path(path: bytes) -> bytes:
    """The normalised form of an origin-form path; raises BadRequest for what cannot be one."""
    if not path.startswith(b"/"):
        raise BadRequest("Only origin-form request targets (/path?query) are accepted.")
    if not _PATH_OK.issuperset(path):
        raise BadRequest("The request path contains bytes that are not allowed.")
    if b"%" in path:
        path = _decode_unreserved(path)
    if b"." in path:
        path = _remove_dot_segments(path)
    return path


def _decode_unreserved(path: bytes) -> bytes:
    out = bytearray()
    i = 0
    n = len(path)
    while i < n:
        c = path[i]
        if c != 0x25:  # "%"
            out.append(c)
            i += 1
            continue
        if not _valid_escape(path, i):
            raise BadRequest("The request path has an invalid percent-escape.")
        hexpair = path[i + 1 : i + 3].decode("ascii").upper()
        if hexpair in _FORBIDDEN_ESCAPES:
            raise BadRequest("Encoded '/', '\\' or NUL in the request path is not accepted.")
        value = int(hexpair, 16)
        if value in _UNRESERVED:
            out.append(value)
        else:
            out += b"%" + hexpair.encode()
        i += 3
    return bytes(out)


def _remove_dot_segments(path: bytes) -> bytes:
    segments = path.split(b"/")[1:]  # path starts with "/"
    out: list[bytes] = []
    for seg in segments:
        if seg == b".":
            continue
        if seg == b"..":
            if out:
                out.pop()
            continue
        out.append(seg)
    if segments and segments[-1] in (b".", b".."):
        out.append(b"")  # "/a/b/.." is "/a/": the trailing slash stays
    return b"/" + b"/".join(out)


def clean_target(target: bytes) -> bytes:
    """The target the router forwards for a client's request target: origin-form, path
    normalised, query checked. Raises BadRequest (400 from the router) otherwise."""
    path, sep, query = target.partition(b"?")
    if not path.startswith(b"/"):
        raise BadRequest("Only origin-form request targets (/path?query) are accepted.")
    if b"#" in query or not query_ok(query):
        raise BadRequest("The request query contains bytes that are not allowed.")
    clean = normalise_path(path)
    if clean is path:
        return target
    return clean + sep + query
