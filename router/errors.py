"""Error tree of the request path -> (HTTP status, OpenAI-style JSON body).

OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``. Count and log once, at the
boundary (proxy.py); everything below raises.
"""

from __future__ import annotations

import http

import msgspec

REASON_PHRASES = {s.value: s.phrase.encode() for s in http.HTTPStatus}


class RouterError(Exception):
    status: int = 500
    type: str = "internal_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.param, self.code)

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}

    def http_response(self, *, close: bool) -> bytes:
        """The whole HTTP/1.1 answer, for the places that write to a transport themselves (the
        generate fast path, the connection cap)."""
        body = self.body()
        head = [b"HTTP/1.1 %d %s\r\n" % (self.status, REASON_PHRASES.get(self.status, b"Error"))]
        head.append(b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body))
        head.extend(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in self.headers().items())
        if close:
            head.append(b"Connection: close\r\n")
        head.append(b"\r\n")
        return b"".join(head) + body


class BadRequest(RouterError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(RouterError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(RouterError):
    status = 403
    type = "permission_error"


class NotFound(RouterError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist.", param="model")


class PayloadTooLarge(RouterError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UriTooLong(RouterError):
    status = 414
    type = "invalid_request_error"
    code = "request_line_too_long"


class HeaderTooLarge(RouterError):
    status = 431
    type = "invalid_request_error"
    code = "request_header_too_large"


class Overloaded(RouterError):
    status = 429
    type = "rate_limit_error"
    code = "router_overloaded"


class UpstreamError(RouterError):
    status = 502
    type = "upstream_error"
    code = "bad_gateway"


class NoReplicaAvailable(RouterError):
    status = 503
    type = "service_unavailable"
    code = "no_replica_available"

    def __init__(self, model: str | None = None, retry_after: int = 1) -> None:
        what = f" serving `{model}`" if model else ""
        super().__init__(f"No healthy replica{what} is available.", retry_after=retry_after)


class Draining(NoReplicaAvailable):
    code = "router_draining"

    def __init__(self) -> None:
        RouterError.__init__(self, "The router is shutting down.", retry_after=1)


class TooManyConnections(RouterError):
    status = 503
    type = "service_unavailable"
    code = "too_many_connections"


class UpstreamTimeout(RouterError):
    status = 504
    type = "timeout_error"
    code = "upstream_timeout"


class _ErrorDetail(msgspec.Struct, omit_defaults=False):
    message: str
    type: str
    param: str | None
    code: str | None


class _ErrorBody(msgspec.Struct):
    error: _ErrorDetail


_enc = msgspec.json.Encoder()


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> bytes:
    return _enc.encode(_ErrorBody(_ErrorDetail(message, type_, param, code)))


def sse_error_event(
    message: str, type_: str = "upstream_error", code: str | None = "upstream_disconnected"
) -> bytes:
    """What a client gets when a stream breaks after bytes were relayed: an error event, then the
    end-of-stream marker, so every SSE client stops reading instead of hanging."""
    return b"data: " + error_body(message, type_, None, code) + b"\n\ndata: [DONE]\n\n"
