"""The router's own HTTP surface as an OpenAPI 3.0 document, served at ``GET /openapi.json``.

It describes what the *router* accepts and answers, not the engines' full OpenAI API: the request
schemas list the fields the router reads for routing (the rest pass through untouched, hence
``additionalProperties: true``), and every error is the OpenAI shape from errors.py. The property
and schemathesis tests (tests/reliability/test_bad_input.py) generate requests from this document,
so a field the router starts to read belongs here too.
"""

from __future__ import annotations

from typing import Any

from router.config import Config

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": "string", "nullable": True},
                "code": {"type": "string", "nullable": True},
            },
        }
    },
}

_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_PROMPT = {
    "oneOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}, "minItems": 1},
        _TOKEN_IDS,
        {"type": "array", "items": _TOKEN_IDS, "minItems": 1},
    ]
}
_COMMON = {
    "model": {"type": "string"},
    "max_tokens": {"type": "integer", "minimum": 0, "nullable": True},
    "stream": {"type": "boolean"},
    "cache_salt": {"type": "string"},
}
_COMPLETION = {
    "type": "object",
    "required": ["model", "prompt"],
    "additionalProperties": True,
    "properties": {**_COMMON, "prompt": _PROMPT},
}
_MESSAGE = {
    "type": "object",
    "required": ["role"],
    "additionalProperties": True,
    "properties": {
        "role": {"type": "string"},
        "content": {
            "oneOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "object", "additionalProperties": True}},
            ],
            "nullable": True,
        },
    },
}
_CHAT = {
    "type": "object",
    "required": ["model", "messages"],
    "additionalProperties": True,
    "properties": {
        **_COMMON,
        "messages": {"type": "array", "items": _MESSAGE, "minItems": 1},
        "max_completion_tokens": {"type": "integer", "minimum": 0, "nullable": True},
    },
}
_ANY_JSON = {"type": "object", "additionalProperties": True}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "Malformed request (OpenAI error body)",
        401: "Missing or invalid router API key",
        403: "Missing or invalid admin token",
        404: "Unknown model or path",
        413: "Request body over --max-body-bytes",
        429: "Router at capacity (Retry-After)",
        502: "Replica failed before the first byte, on every retry",
        503: "No healthy replica, or the router is draining (Retry-After)",
        504: "Replica did not answer within --first-byte-timeout",
    }
    return {str(c): _json({"$ref": "#/components/schemas/Error"}, text[c]) for c in codes}


_ROUTED_ERRORS = (400, 401, 404, 413, 429, 502, 503, 504)


def _generate(summary: str, schema_ref: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": schema_ref}}},
            },
            "responses": {
                "200": {
                    "description": "The engine's answer, relayed byte for byte (JSON, or SSE when stream=true)",
                    "content": {
                        "application/json": {"schema": _ANY_JSON},
                        "text/event-stream": {"schema": {"type": "string"}},
                    },
                },
                # An engine's own 4xx for a request the router could route is relayed unchanged.
                "422": {"description": "Rejected by the engine (relayed)"},
                **_errors(*_ROUTED_ERRORS),
            },
        }
    }


def openapi_spec(cfg: Config) -> dict[str, Any]:
    """The document for this configuration (debug paths only when they are enabled)."""
    paths: dict[str, Any] = {
        "/v1/completions": _generate("Routed completion", "#/components/schemas/CompletionRequest"),
        "/v1/chat/completions": _generate("Routed chat completion", "#/components/schemas/ChatRequest"),
        "/v1/models": {
            "get": {
                "summary": "Union of the replicas' models",
                "responses": {"200": _json(_ANY_JSON, "OpenAI model list"), **_errors(401)},
            }
        },
        "/health": {
            "get": {"summary": "Liveness", "responses": {"200": _json(_ANY_JSON, "The event loop answers")}}
        },
        "/ready": {
            "get": {
                "summary": "Readiness",
                "responses": {
                    "200": _json(_ANY_JSON, "At least one routable replica"),
                    "503": _json(_ANY_JSON, "No routable replica, or draining"),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "Text exposition",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
    }
    if cfg.server.enable_debug:
        paths["/debug/route"] = {
            "post": {
                "summary": "The routing decision for a body, without forwarding it",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "oneOf": [
                                    {"$ref": "#/components/schemas/CompletionRequest"},
                                    {"$ref": "#/components/schemas/ChatRequest"},
                                ]
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json(_ANY_JSON, "Decision and per-replica scores"),
                    **_errors(400, 403, 404, 413, 503),
                },
            }
        }
        paths["/debug/replicas"] = {
            "get": {
                "summary": "Per-replica state, index sizes included",
                "responses": {"200": _json(_ANY_JSON, "Replica rows"), **_errors(403)},
            }
        }
    doc: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {
            "title": "kvrouter",
            "version": "0.1.0",
            "description": "Cache-aware OpenAI-compatible router for vLLM",
        },
        "paths": paths,
        "components": {
            "schemas": {"Error": _ERROR, "CompletionRequest": _COMPLETION, "ChatRequest": _CHAT},
        },
    }
    if cfg.server.api_keys:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc
