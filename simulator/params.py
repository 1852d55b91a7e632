"""Reading a Bot API call's parameters the ways Telegram accepts them.

Query string, ``application/json``, ``application/x-www-form-urlencoded`` and
``multipart/form-data`` bodies; body parameters override query ones. Pure functions, called
from handler threads.
"""

from __future__ import annotations

import json
from email.message import Message
from email.parser import BytesParser
from email.policy import HTTP
from urllib.parse import parse_qsl

from simulator.envelope import JsonObject, bad_request


def parse_params(query: str, content_type: str | None, body: bytes) -> JsonObject:
    """Merge the query string and the body into one parameter mapping."""
    params: JsonObject = dict(parse_qsl(query, keep_blank_values=True))
    if not body:
        return params
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type == "application/json":
        params.update(_json_object(body))
    elif media_type == "application/x-www-form-urlencoded":
        params.update(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
    elif media_type == "multipart/form-data":
        params.update(_multipart_fields(content_type or "", body))
    return params


def _json_object(body: bytes) -> JsonObject:
    try:
        parsed = json.loads(body)
    except ValueError:
        raise bad_request("can't parse JSON object") from None
    if not isinstance(parsed, dict):
        raise bad_request("can't parse JSON object")
    return parsed


def _multipart_fields(content_type: str, body: bytes) -> JsonObject:
    head = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1")
    message = BytesParser(policy=HTTP).parsebytes(head + body)
    fields: JsonObject = {}
    if not message.is_multipart():
        return fields
    for part in message.iter_parts():
        assert isinstance(part, Message)
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if isinstance(name, str) and isinstance(payload, bytes):
            charset = part.get_content_charset() or "utf-8"
            fields[name] = payload.decode(charset, "replace")
    return fields
