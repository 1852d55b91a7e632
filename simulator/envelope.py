"""Telegram's response envelopes and the error that turns into one.

``{"ok": true, "result": ...}`` on success; ``{"ok": false, "error_code": N, "description": ...,
"parameters": {...}}`` on failure, served with HTTP status ``N``. Pure functions.
"""

from __future__ import annotations

from typing import Any

JsonObject = dict[str, Any]


class ApiError(Exception):
    """A Bot API failure with Telegram's error code, description and optional parameters."""

    def __init__(self, error_code: int, description: str, parameters: JsonObject | None = None) -> None:
        super().__init__(f"{error_code} {description}")
        self.error_code = error_code
        self.description = description
        self.parameters = parameters

    def envelope(self) -> JsonObject:
        return error_envelope(self.error_code, self.description, self.parameters)


def ok_envelope(result: object) -> JsonObject:
    return {"ok": True, "result": result}


def error_envelope(error_code: int, description: str, parameters: JsonObject | None = None) -> JsonObject:
    body: JsonObject = {"ok": False, "error_code": error_code, "description": description}
    if parameters:
        body["parameters"] = parameters
    return body


def not_found() -> ApiError:
    return ApiError(404, "Not Found")


def unauthorized() -> ApiError:
    return ApiError(401, "Unauthorized")


def bad_request(reason: str, parameters: JsonObject | None = None) -> ApiError:
    return ApiError(400, f"Bad Request: {reason}", parameters)


def forbidden(reason: str) -> ApiError:
    return ApiError(403, f"Forbidden: {reason}")


def too_many_requests(retry_after: int) -> ApiError:
    return ApiError(429, f"Too Many Requests: retry after {retry_after}", {"retry_after": retry_after})
