"""Validation of messages handed to tgrelay, shared by the embedded API and the HTTP API.

Everything a caller can get wrong is rejected here with a reason, before anything is stored.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any

from actors.errors import InvalidMessage, UnknownPool
from actors.messages import ChatId, OutgoingMessage

MAX_TEXT_CODE_POINTS = 4096  # Telegram counts Unicode code points, which is what len() counts
MAX_DEDUP_KEY = 256
PARSE_MODES = ("HTML", "Markdown", "MarkdownV2")
FIELDS = ("chat_id", "text", "pool", "dedup_key", "parse_mode", "disable_notification")
_CHANNEL_NAME = re.compile(r"@[A-Za-z][A-Za-z0-9_]{3,31}")  # used with fullmatch
_NUMERIC = re.compile(r"-?[0-9]{1,19}")  # used with fullmatch
_INT64 = 2**63


def default_pool(pools: Collection[str]) -> str | None:
    """The pool used when a message names none: ``default``, or the only pool there is."""
    if "default" in pools:
        return "default"
    if len(pools) == 1:
        return next(iter(pools))
    return None


def build_message(pools: Collection[str], chat_id: Any, text: Any, pool: Any = None,
                  dedup_key: Any = None, parse_mode: Any = None,
                  disable_notification: Any = False) -> OutgoingMessage:
    """Check every field and return the message, or raise :class:`InvalidMessage`."""
    return OutgoingMessage(
        chat_id=_chat_id(chat_id),
        text=_text(text),
        pool=_pool(pool, pools),
        dedup_key=_dedup_key(dedup_key),
        parse_mode=_parse_mode(parse_mode),
        disable_notification=_flag(disable_notification),
    )


def message_from_json(body: Any, pools: Collection[str]) -> OutgoingMessage:
    """A message from a decoded JSON object (one ``POST /v1/messages`` body)."""
    if not isinstance(body, Mapping):
        raise InvalidMessage("a message must be a JSON object")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise InvalidMessage(f"unknown field {unknown[0]!r} (allowed: {', '.join(FIELDS)})")
    for required in ("chat_id", "text"):
        if required not in body:
            raise InvalidMessage(f"{required} is required")
    return build_message(pools, **body)


def _chat_id(value: Any) -> ChatId:
    if isinstance(value, bool):
        raise InvalidMessage("chat_id must be an integer or an @channel name, not a boolean")
    if isinstance(value, int):
        if not -_INT64 <= value < _INT64 or value == 0:
            raise InvalidMessage("chat_id is not a valid Telegram chat id")
        return value
    if isinstance(value, str):
        if _NUMERIC.fullmatch(value):
            return _chat_id(int(value))
        if _CHANNEL_NAME.fullmatch(value):
            return value
        raise InvalidMessage("chat_id must be an integer or an @channel name (@ then 4-32 "
                             "letters, digits or underscores)")
    raise InvalidMessage("chat_id must be an integer or an @channel name")


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidMessage("text must be a string")
    if not value.strip():
        raise InvalidMessage("text must not be empty")
    _require_encodable(value, "text")
    if len(value) > MAX_TEXT_CODE_POINTS:
        raise InvalidMessage(f"text is {len(value)} characters; Telegram allows at most "
                             f"{MAX_TEXT_CODE_POINTS}")
    return value


def _pool(value: Any, pools: Collection[str]) -> str:
    if value is None:
        fallback = default_pool(pools)
        if fallback is None:
            raise InvalidMessage("pool is required: no pool is named 'default' "
                                 f"(pools: {', '.join(sorted(pools)) or 'none configured'})")
        return fallback
    if not isinstance(value, str):
        raise InvalidMessage("pool must be a string")
    if value not in pools:
        raise UnknownPool(f"unknown pool {value!r} (pools: {', '.join(sorted(pools)) or 'none'})")
    return value


def _dedup_key(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_DEDUP_KEY:
        raise InvalidMessage(f"dedup_key must be a string of 1-{MAX_DEDUP_KEY} characters")
    _require_encodable(value, "dedup_key")
    return value


def _require_encodable(value: str, field: str) -> None:
    """Lone surrogates (possible in Python strings and JSON escapes) are not valid UTF-8."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidMessage(f"{field} is not valid Unicode (it holds a lone surrogate)") from None


def _parse_mode(value: Any) -> str | None:
    if value is None:
        return None
    if value not in PARSE_MODES:
        raise InvalidMessage(f"parse_mode must be one of {', '.join(PARSE_MODES)}")
    return str(value)


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidMessage("disable_notification must be true or false")
    return value
