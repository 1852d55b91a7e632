"""The OpenAPI 3.0 description of the HTTP API, served at ``GET /openapi.json``.

The document states the rules :mod:`supervision.intake` and :mod:`supervision.http_api` enforce,
exactly, so that a property-based fuzzer (``tests/test_openapi_fuzz.py``) can hold the server to
it: what the schemas call valid is accepted, what they call invalid is a 4xx with a reason, and
every answer has the documented shape. It is built per relay because the configured pools and
token names are part of the rules (an unknown pool is a 400, an unknown token a 404).

OpenAPI 3.0 rather than 3.1 on purpose: its schema dialect (JSON Schema draft 4) counts ``5.0``
as a number, not an integer, which is the relay's rule for ``chat_id``; 3.1's draft 2020-12
would promise that ``5.0`` is accepted.

Pure functions of their arguments: safe on any thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import metadata
from typing import Any

from actors.messages import STATUSES
from supervision.intake import MAX_DEDUP_KEY, MAX_TEXT_CODE_POINTS, PARSE_MODES, default_pool

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# What str.strip() removes (str.isspace), spelled out so that every regex engine (Python's for
# generating, ECMA's for validating) agrees: a text must hold at least one other character.
NOT_ONLY_WHITESPACE = ("[^\\t-\\r\\x1c-\\x20\\x85\\xa0\\u1680\\u2000-\\u200a"
                       "\\u2028\\u2029\\u202f\\u205f\\u3000]")
CHANNEL_NAME = "^@[A-Za-z][A-Za-z0-9_]{3,31}$"
_DECIMAL_DIGITS = 19  # supervision.intake accepts a chat id written as at most 19 digits

_REF = "#/components/schemas/"


def decimal_above(bound: int, digits: int) -> str:
    """A regex alternation matching the ``digits``-digit decimals greater than ``bound``."""
    text = str(bound).zfill(digits)
    branches = [f"{text[:index]}[{int(digit) + 1}-9][0-9]{{{digits - index - 1}}}"
                for index, digit in enumerate(text) if digit != "9"]
    return "|".join(branches)


def _schema(name: str) -> dict[str, str]:
    return {"$ref": _REF + name}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    nullable = {**schema, "nullable": True}
    if "enum" in schema:
        nullable["enum"] = [*schema["enum"], None]
    return nullable


def _chat_id() -> dict[str, Any]:
    def numeric_string(sign: str, largest: int) -> dict[str, Any]:
        return {
            "type": "string",
            "pattern": f"^{sign}[0-9]{{1,{_DECIMAL_DIGITS}}}$",
            "not": {"anyOf": [{"pattern": f"^{sign}0+$"},
                              {"pattern": f"^{sign}(?:{decimal_above(largest, _DECIMAL_DIGITS)})$"}]},
        }

    return {
        "description": "A Telegram chat id (a non-zero 64-bit integer, also accepted written as a "
                       "decimal string) or a public channel's @username.",
        "anyOf": [
            {"type": "integer", "minimum": INT64_MIN, "maximum": INT64_MAX, "not": {"enum": [0]}},
            {"type": "string", "pattern": CHANNEL_NAME},
            numeric_string("", INT64_MAX),
            numeric_string("-", -INT64_MIN),
        ],
    }


def _message(pools: Sequence[str]) -> dict[str, Any]:
    fallback = default_pool(pools)
    pool: dict[str, Any] = {"type": "string", "enum": sorted(pools)}
    properties: dict[str, Any] = {
        "chat_id": _chat_id(),
        "text": {"type": "string", "minLength": 1, "maxLength": MAX_TEXT_CODE_POINTS,
                 "pattern": NOT_ONLY_WHITESPACE,
                 "description": "At most 4096 code points, not only whitespace."},
        "pool": pool if fallback is None else _nullable(pool),
        "dedup_key": _nullable({"type": "string", "minLength": 1, "maxLength": MAX_DEDUP_KEY}),
        "parse_mode": _nullable({"type": "string", "enum": list(PARSE_MODES)}),
        "disable_notification": {"type": "boolean"},
    }
    if fallback is not None:
        properties["pool"]["description"] = f"Absent or null: the {fallback!r} pool."
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["chat_id", "text"] if fallback is not None else ["chat_id", "text", "pool"],
        "properties": properties,
    }


def _schemas(pools: Sequence[str], max_batch: int) -> dict[str, Any]:
    status = {"type": "string", "enum": list(STATUSES)}
    counts = {"type": "integer", "minimum": 0}
    seconds = {"type": "number"}
    return {
        "Message": _message(pools),
        "Receipt": {
            "type": "object",
            "required": ["id", "status", "duplicate"],
            "properties": {
                "id": {"type": "integer", "minimum": 1},
                "status": {"type": "string", "enum": [*STATUSES, "archived"],
                           "description": "A duplicate's original may be archived already."},
                "duplicate": {"type": "boolean"},
            },
        },
        "Error": {
            "type": "object",
            "additionalProperties": False,
            "required": ["error"],
            "properties": {"error": {"type": "string", "minLength": 1}},
        },
        "BatchRequest": {
            "type": "object",
            "additionalProperties": False,
            "required": ["messages"],
            "properties": {"messages": {
                "type": "array",
                "maxItems": max_batch,
                "description": "Each entry is judged on its own: an entry that is not a valid "
                               "Message gets a 400 result and does not hold back the others.",
                "items": {"anyOf": [_schema("Message"), {}]},
            }},
        },
        "BatchResult": {
            "anyOf": [
                {"allOf": [_schema("Receipt"), {
                    "required": ["http_status"],
                    "properties": {"http_status": {"type": "integer", "enum": [200, 202]}}}]},
                {"type": "object", "required": ["error", "http_status"],
                 "properties": {"error": {"type": "string", "minLength": 1},
                                "http_status": {"type": "integer", "enum": [400, 409]}}},
            ],
        },
        "BatchResponse": {
            "type": "object",
            "required": ["results"],
            "properties": {"results": {"type": "array", "maxItems": max_batch,
                                       "items": _schema("BatchResult")}},
        },
        "StoredMessage": {
            "type": "object",
            "required": ["id", "chat_id", "pool", "status", "retry_count", "telegram_message_id",
                         "token", "last_error", "created_at", "updated_at"],
            "properties": {
                "id": {"type": "integer", "minimum": 1},
                "chat_id": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
                "pool": {"type": "string"},
                "status": status,
                "retry_count": counts,
                "telegram_message_id": _nullable({"type": "integer"}),
                "token": _nullable({"type": "string", "description": "The token's name."}),
                "last_error": _nullable({"type": "string"}),
                "created_at": seconds,
                "updated_at": seconds,
            },
        },
        "Token": {
            "type": "object",
            "required": ["name", "pool", "state", "weight", "sent", "failed", "rate_limited_until"],
            "properties": {
                "name": {"type": "string"},
                "pool": {"type": "string"},
                "state": {"type": "string", "enum": ["healthy", "rate_limited", "failing", "revoked"]},
                "weight": {"type": "number", "minimum": 0, "exclusiveMinimum": True},
                "sent": counts,
                "failed": counts,
                "rate_limited_until": _nullable({"type": "number"}),
            },
        },
        "TokenList": {
            "type": "object",
            "required": ["tokens"],
            "properties": {"tokens": {"type": "array", "items": _schema("Token")}},
        },
        "TokenValidation": {
            "type": "object",
            "required": ["name", "valid", "bot_username", "error"],
            "properties": {
                "name": {"type": "string"},
                "valid": _nullable({"type": "boolean", "description":
                                    "null: getMe could not be reached, so nobody knows."}),
                "bot_username": _nullable({"type": "string"}),
                "error": _nullable({"type": "string"}),
            },
        },
        "Stats": {
            "type": "object",
            "required": ["counts", "delivery_rate", "db_bytes"],
            "properties": {
                "counts": {"type": "object", "required": list(STATUSES),
                           "properties": {name: counts for name in STATUSES}},
                "delivery_rate": _nullable({"type": "number", "minimum": 0, "maximum": 1}),
                "db_bytes": counts,
                "in_flight": counts,
                "in_doubt": counts,
                "oldest_pending_age_seconds": _nullable({"type": "number"}),
            },
        },
        "Health": {
            "type": "object",
            "required": ["ok"],
            "properties": {"ok": {"type": "boolean"}},
        },
    }


def _json(schema: dict[str, Any], description: str, headers: dict[str, Any] | None = None
          ) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description,
                                "content": {"application/json": {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


def _responses(max_body_bytes: int, max_message_body_bytes: int) -> dict[str, Any]:
    error = _schema("Error")
    return {
        "BadRequest": _json(error, "The request is malformed; the error says what is wrong."),
        "Unauthorized": _json(error, "A valid 'Authorization: Bearer <token>' header is required.", {
            "WWW-Authenticate": {"required": True, "schema": {"type": "string"}}}),
        "NotFound": _json(error, "No such resource."),
        "Conflict": _json(error, "The dedup_key was already used for a different message."),
        "TooLarge": _json(error, f"The body is larger than the endpoint accepts "
                                 f"({max_message_body_bytes} bytes for one message, "
                                 f"{max_body_bytes} for a batch)."),
        "NotJson": _json(error, "The body is not declared as UTF-8 JSON."),
        "Unavailable": _json(error, "Nothing can be committed now (the database is full, locked, "
                                    "or the relay is stopping); try again later.", {
            "Retry-After": {"required": True, "schema": {"type": "integer", "minimum": 0}}}),
    }


def _ref_response(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/responses/{name}"}


def _operation(summary: str, responses: dict[str, Any], *, authenticated: bool,
               body: str | None = None, parameters: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "responses": dict(responses)}
    if parameters:
        operation["parameters"] = list(parameters)
    if body is not None:
        operation["requestBody"] = {"required": True,
                                    "content": {"application/json": {"schema": _schema(body)}}}
        operation["responses"]["413"] = _ref_response("TooLarge")
        operation["responses"]["415"] = _ref_response("NotJson")
    if authenticated:
        operation["responses"]["401"] = _ref_response("Unauthorized")
    return operation


def openapi_document(*, pools: Sequence[str], tokens: Sequence[str], authenticated: bool,
                     max_batch: int, max_body_bytes: int, max_message_body_bytes: int
                     ) -> dict[str, Any]:
    """The description of a relay with these pools and token names.

    ``authenticated``: the relay requires a bearer token on everything but ``/healthz``.
    """
    def op(summary: str, responses: dict[str, Any], **options: Any) -> dict[str, Any]:
        return _operation(summary, responses, authenticated=authenticated, **options)

    unavailable = _ref_response("Unavailable")
    bad_request = _ref_response("BadRequest")
    message_id = {"name": "id", "in": "path", "required": True,
                  "schema": {"type": "integer", "minimum": 0, "maximum": INT64_MAX}}
    token_name = {"name": "name", "in": "path", "required": True,
                  "schema": {"type": "string", "enum": sorted(tokens)} if tokens else {"type": "string"}}
    document: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {
            "title": "tgrelay",
            "version": _version(),
            "description": "Durable, deduplicated delivery of Telegram Bot API messages. A message "
                           "is accepted only once it is committed to the relay's database.",
        },
        "paths": {
            "/v1/messages": {"post": op("Accept one message", {
                "202": _json(_schema("Receipt"), "Accepted: committed, pending delivery."),
                "200": _json(_schema("Receipt"), "A duplicate: the original's id and status."),
                "400": bad_request,
                "409": _ref_response("Conflict"),
                "503": unavailable,
            }, body="Message")},
            "/v1/messages/batch": {"post": op(f"Accept up to {max_batch} messages in one transaction", {
                "200": _json(_schema("BatchResponse"), "One result per message, in order."),
                "400": bad_request,
                "503": unavailable,
            }, body="BatchRequest")},
            "/v1/messages/{id}": {"get": op("One message's state", {
                "200": _json(_schema("StoredMessage"), "The message."),
                "400": bad_request,
                "404": _ref_response("NotFound"),
                "503": unavailable,
            }, parameters=[message_id])},
            "/v1/tokens": {"get": op("Every token's state", {
                "200": _json(_schema("TokenList"), "The tokens, by name (never the secret)."),
                "503": unavailable,
            })},
            "/v1/tokens/{name}/validate": {"post": op("Ask Telegram (getMe) whether a token works", {
                "200": _json(_schema("TokenValidation"), "getMe's verdict."),
                "404": _ref_response("NotFound"),
                "503": unavailable,
            }, parameters=[token_name])},
            "/v1/stats": {"get": op("Counts by status, delivery rate, database size", {
                "200": _json(_schema("Stats"), "A snapshot."),
                "503": unavailable,
            })},
            "/openapi.json": {"get": op("This description", {
                "200": _json({"type": "object"}, "The OpenAPI document."),
            })},
            "/healthz": {"get": {
                "summary": "Whether the relay can reach its database (no authentication)",
                "security": [],
                "responses": {"200": _json(_schema("Health"), "Healthy."),
                              "503": _json(_schema("Health"), "Not healthy.")},
            }},
        },
        "components": {
            "schemas": _schemas(pools, max_batch),
            "responses": _responses(max_body_bytes, max_message_body_bytes),
        },
    }
    if authenticated:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        document["security"] = [{"bearer": []}]
    return document


def _version() -> str:
    try:
        return metadata.version("tgrelay")
    except metadata.PackageNotFoundError:
        return "unknown"


__all__ = ["openapi_document"]
