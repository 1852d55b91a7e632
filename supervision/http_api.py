"""The HTTP API of CONTRACT.md ("HTTP API"), a plain WSGI app served by waitress.

:class:`RelayApp` turns requests into calls on a :class:`~supervision.relay.RelaySystem`;
:class:`HttpApi` serves it. Every answer is JSON. Anything a client can get wrong is a 4xx
with a reason; a 500 means a bug in tgrelay, is logged, and says nothing more to the client.

Threading: waitress runs its event loop (accepting, parsing, writing) on the ``tgrelay-http``
thread and calls the app on a pool of worker threads. A ``POST /v1/messages`` worker blocks in
:meth:`RelaySystem.accept` until the store's group commit holding the message is durable, so
the worker count bounds how many single-message requests share one commit.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from wsgiref.types import StartResponse, WSGIEnvironment

import pykka
import waitress
from waitress import wasyncore

from actors.errors import DedupConflict, InvalidMessage, MessageNotFound, StoreUnavailable, TgrelayError
from actors.messages import OutgoingMessage, Receipt
from supervision.config import HttpConfig
from supervision.intake import message_from_json
from supervision.openapi import openapi_document
from supervision.redact import redact
from supervision.relay import MAX_BATCH, RelaySystem

log = logging.getLogger("tgrelay.http")

# The largest legal batch must fit in any JSON encoding a client may choose. Python's json
# (and so requests' json=) escapes non-ASCII: a character outside the BMP becomes a 12-byte
# surrogate pair escape, so 1000 texts of 4096 such characters take 49,152,000 bytes, plus up
# to 3 MB of escaped 256-character dedup keys and the field names. 64 MiB covers that; waitress
# spools bodies over 512 KiB to a temporary file, so the limit costs no memory until parsed.
MAX_BODY_BYTES = 64 * 1024 * 1024
# One message is at most 4096 characters of text plus a 256-character key (12 bytes each when
# escaped, about 53 KB): 1 MiB is generous and keeps a stray upload off the single endpoint.
MAX_MESSAGE_BODY_BYTES = 1024 * 1024
RETRY_AFTER_SECONDS = 5
_MESSAGE_ID = re.compile(r"[0-9]{1,30}")
_MAX_ROW_ID = 2**63 - 1
_BATCH_FIELDS = ("messages",)


@dataclass(frozen=True)
class Response:
    status: int
    body: Any
    headers: tuple[tuple[str, str], ...] = ()


class HttpError(Exception):
    """Raised by a handler to answer ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


Handler = Callable[[WSGIEnvironment, str], Response]


class RelayApp:
    """The WSGI application. Stateless apart from the relay it serves; safe on any thread."""

    def __init__(self, relay: RelaySystem, auth_token: str = "",
                 max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self._relay = relay
        self._auth_token = auth_token.encode()
        self._pools = frozenset(relay.config.pools)
        self._max_body_bytes = max_body_bytes
        self._max_message_bytes = min(MAX_MESSAGE_BODY_BYTES, max_body_bytes)
        self._routes: dict[str, dict[str, Handler]] = {
            "/v1/messages": {"POST": self._post_message},
            "/v1/messages/batch": {"POST": self._post_batch},
            "/v1/tokens": {"GET": self._get_tokens},
            "/v1/stats": {"GET": self._get_stats},
            "/openapi.json": {"GET": self._get_openapi},
        }
        # Behind the bearer token like /v1: it names the configured pools and tokens.
        self._openapi = openapi_document(
            pools=sorted(self._pools), tokens=[token.name for _, token in relay.config.tokens()],
            authenticated=bool(auth_token), max_batch=MAX_BATCH, max_body_bytes=max_body_bytes,
            max_message_body_bytes=self._max_message_bytes)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        path = environ.get("PATH_INFO", "")
        try:
            response = self._dispatch(method, path, environ)
            body = _encode(response.body)
        except HttpError as error:
            response = Response(error.status, {"error": error.message}, error.headers)
            body = _encode(response.body)
        except (StoreUnavailable, pykka.ActorDeadError) as error:
            reason = str(error) if isinstance(error, StoreUnavailable) else "the relay is stopping"
            response = Response(503, {"error": reason}, (("Retry-After", str(RETRY_AFTER_SECONDS)),))
            body = _encode(response.body)
        except Exception:
            log.exception("unexpected error answering %s %s", method, path)
            response = Response(500, {"error": "internal error; the relay's log has the details"})
            body = _encode(response.body)
        start_response(_STATUS_LINES[response.status], [
            ("Content-Type", "application/json"), ("Content-Length", str(len(body))),
            *response.headers])
        return [body]

    # --- routing ----------------------------------------------------------------------------

    def _dispatch(self, method: str, path: str, environ: WSGIEnvironment) -> Response:
        if path == "/healthz":
            return self._choose({"GET": self._get_health}, method)(environ, "")
        if self._auth_token and not self._authorized(environ):
            raise HttpError(401, "a valid 'Authorization: Bearer <token>' header is required",
                            (("WWW-Authenticate", 'Bearer realm="tgrelay"'),))
        handlers, argument = self._route(path)
        return self._choose(handlers, method)(environ, argument)

    def _route(self, path: str) -> tuple[Mapping[str, Handler], str]:
        handlers = self._routes.get(path)
        if handlers is not None:
            return handlers, ""
        message_id = _suffix(path, "/v1/messages/", "")
        if message_id:
            return {"GET": self._get_message}, message_id
        token_name = _suffix(path, "/v1/tokens/", "/validate")
        if token_name:
            return {"POST": self._validate_token}, token_name
        raise HttpError(404, f"no such endpoint: {path}")

    @staticmethod
    def _choose(handlers: Mapping[str, Handler], method: str) -> Handler:
        handler = handlers.get(method)
        if handler is None:
            allowed = ", ".join(sorted(handlers))
            raise HttpError(405, f"method {method} is not allowed here (allowed: {allowed})",
                            (("Allow", allowed),))
        return handler

    def _authorized(self, environ: WSGIEnvironment) -> bool:
        scheme, _, credentials = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        # Header values arrive as latin-1 strings (PEP 3333); compare bytes, which also keeps
        # compare_digest from raising on non-ASCII input.
        return scheme.lower() == "bearer" and hmac.compare_digest(
            credentials.strip().encode("latin-1", "replace"), self._auth_token)

    # --- handlers ---------------------------------------------------------------------------

    def _post_message(self, environ: WSGIEnvironment, _: str) -> Response:
        try:
            message = self._message(self._read_json(environ, self._max_message_bytes))
        except InvalidMessage as error:
            raise HttpError(400, str(error)) from None
        (outcome,) = self._relay.accept([message])
        status, body = _answer(outcome)
        if status >= 400:
            raise HttpError(status, body["error"])
        return Response(status, body)

    def _post_batch(self, environ: WSGIEnvironment, _: str) -> Response:
        body = self._read_json(environ, self._max_body_bytes)
        if not isinstance(body, dict):
            raise HttpError(400, 'the body must be a JSON object: {"messages": [...]}')
        unknown = sorted(set(body) - set(_BATCH_FIELDS))
        if unknown:
            raise HttpError(400, f"unknown field {unknown[0]!r} (allowed: messages)")
        entries = body.get("messages")
        if not isinstance(entries, list):
            raise HttpError(400, "messages must be an array of message objects")
        if len(entries) > MAX_BATCH:
            raise HttpError(400, f"a batch holds at most {MAX_BATCH} messages, not {len(entries)}")
        # relay.send_many's semantics (a rejected entry does not hold back the others), with
        # this module's stricter validation.
        checked: list[OutgoingMessage | InvalidMessage] = []
        for entry in entries:
            try:
                checked.append(self._message(entry))
            except InvalidMessage as error:
                checked.append(error)
        accepted = iter(self._relay.accept([m for m in checked if isinstance(m, OutgoingMessage)]))
        results = []
        for entry in checked:
            status, result = _answer(next(accepted) if isinstance(entry, OutgoingMessage) else entry)
            result["http_status"] = status
            results.append(result)
        return Response(200, {"results": results})

    def _get_message(self, _: WSGIEnvironment, raw_id: str) -> Response:
        if not _MESSAGE_ID.fullmatch(raw_id):
            raise HttpError(400, f"a message id is a positive integer, not {raw_id!r}")
        message_id = int(raw_id)
        try:
            if message_id > _MAX_ROW_ID:
                raise MessageNotFound(f"no message with id {message_id}")
            return Response(200, self._relay.get(message_id).as_api())
        except MessageNotFound as error:
            raise HttpError(404, str(error)) from None

    def _get_tokens(self, _: WSGIEnvironment, __: str) -> Response:
        sending = self._relay.sending
        return Response(200, {"tokens": [] if sending is None else sending.tokens()})

    def _validate_token(self, _: WSGIEnvironment, name: str) -> Response:
        sending = self._relay.sending
        if sending is None:
            raise HttpError(503, "the sending side is not running, so no token can be validated",
                            (("Retry-After", str(RETRY_AFTER_SECONDS)),))
        try:
            return Response(200, sending.validate_token(name))
        except KeyError:
            raise HttpError(404, f"no token named {name!r}") from None

    def _get_stats(self, _: WSGIEnvironment, __: str) -> Response:
        return Response(200, self._relay.stats())

    def _get_openapi(self, _: WSGIEnvironment, __: str) -> Response:
        return Response(200, self._openapi)

    def _get_health(self, _: WSGIEnvironment, __: str) -> Response:
        healthy = self._relay.healthy()
        return Response(200 if healthy else 503, {"ok": healthy})

    # --- input ------------------------------------------------------------------------------

    def _read_json(self, environ: WSGIEnvironment, limit: int) -> Any:
        content_type = environ.get("CONTENT_TYPE", "")
        if content_type and not _is_json(content_type):
            raise HttpError(415, f"the body must be JSON (Content-Type: application/json), "
                                 f"not {content_type!r}")
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            raise HttpError(400, "Content-Length is not a number") from None
        if length > limit:
            raise HttpError(413, f"the body is {length} bytes; this endpoint accepts at most {limit}")
        raw = environ["wsgi.input"].read(length) if length > 0 else b""
        if not raw or raw.isspace():
            raise HttpError(400, "the body is empty; send a JSON object")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise HttpError(400, f"the body is not valid UTF-8 (byte {error.start})") from None
        try:
            return json.loads(text)
        except RecursionError:
            raise HttpError(400, "the body is not valid JSON: nested too deeply") from None
        except ValueError as error:  # JSONDecodeError, and integers over Python's digit limit
            raise HttpError(400, f"the body is not valid JSON: {error}") from None

    def _message(self, body: Any) -> OutgoingMessage:
        message = message_from_json(body, self._pools)
        # A JSON "\ud800" escape decodes to a lone surrogate, which no store or hash can
        # encode: refuse it here rather than fail the whole commit group or batch later.
        for name, value in (("text", message.text), ("dedup_key", message.dedup_key)):
            if value is not None and not _encodable(value):
                raise InvalidMessage(f"{name} is not valid Unicode (it holds a lone surrogate)")
        return message


class HttpApi:
    """Serves :class:`RelayApp` on waitress at ``http_config.listen``.

    The socket is bound in the constructor, so a taken port fails there with ``OSError``;
    :meth:`start` runs the server on a daemon thread, :meth:`stop` lets requests in progress
    finish (up to ``grace_seconds``) and closes every connection.
    """

    def __init__(self, relay: RelaySystem, http_config: HttpConfig, *, threads: int = 16,
                 max_body_bytes: int = MAX_BODY_BYTES, channel_timeout: float = 60.0,
                 connection_limit: int = 512) -> None:
        self.app = RelayApp(relay, http_config.auth_token, max_body_bytes)
        self._socket = _listen_socket(http_config.host, http_config.port)
        try:
            # Our own socket rather than host=/port=: waitress would bind one socket per
            # address "localhost" resolves to and return a server without a single port.
            self._server = waitress.create_server(
                self.app, sockets=[self._socket], threads=threads,
                max_request_body_size=max_body_bytes, channel_timeout=channel_timeout,
                connection_limit=connection_limit, asyncore_use_poll=True,
                clear_untrusted_proxy_headers=True, ident="tgrelay")
        except BaseException:
            self._socket.close()
            raise
        self.host, self.port = self._socket.getsockname()[:2]
        self._thread: threading.Thread | None = None
        self._stopped = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.run, name="tgrelay-http", daemon=True)
        self._thread.start()

    def stop(self, grace_seconds: float = 5.0) -> None:
        """Stop accepting, let requests in progress finish, close every connection. Idempotent."""
        server = self._server
        if self._stopped:
            return
        self._stopped = True
        if self._thread is None:
            server.task_dispatcher.shutdown(timeout=grace_seconds)
            server.close()
            return
        # The event loop owns the sockets: changes to them run on its thread, as trigger thunks.
        server.trigger.pull_trigger(lambda: wasyncore.dispatcher.close(server))
        server.task_dispatcher.shutdown(cancel_pending=True, timeout=grace_seconds)
        deadline = time.monotonic() + grace_seconds
        while (time.monotonic() < deadline
               and any(channel.total_outbufs_len for channel in list(server.active_channels.values()))):
            time.sleep(0.01)
        # OSError: the loop was already awake (a worker's own wake-up) and ran the thunk,
        # closing the trigger, between the thunk being queued and this wake-up byte written.
        with contextlib.suppress(OSError):
            server.trigger.pull_trigger(self._close_connections)
        self._thread.join(timeout=grace_seconds + 5)

    def _close_connections(self) -> None:
        for channel in list(self._server.active_channels.values()):
            channel.handle_close()
        self._server.trigger.close()  # the loop ends when it has nothing left to watch

    def __enter__(self) -> HttpApi:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _listen_socket(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def _answer(outcome: Receipt | TgrelayError) -> tuple[int, dict[str, Any]]:
    """The HTTP status and body for one message's outcome."""
    if isinstance(outcome, Receipt):
        return (200 if outcome.duplicate else 202), {
            "id": outcome.id, "status": outcome.status, "duplicate": outcome.duplicate}
    if isinstance(outcome, DedupConflict):
        return 409, {"error": str(outcome)}
    if isinstance(outcome, InvalidMessage):
        return 400, {"error": str(outcome)}
    raise outcome


def _suffix(path: str, prefix: str, suffix: str) -> str:
    """The single path segment between ``prefix`` and ``suffix``, or ``""``."""
    if not (path.startswith(prefix) and path.endswith(suffix)):
        return ""
    segment = path[len(prefix):len(path) - len(suffix)]
    return "" if "/" in segment else segment


def _is_json(content_type: str) -> bool:
    media_type, _, parameters = content_type.partition(";")
    media_type = media_type.strip().lower()
    if media_type != "application/json" and not (
            media_type.startswith("application/") and media_type.endswith("+json")):
        return False
    for parameter in parameters.split(";"):
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            return False
    return True


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json_default(value: Any) -> Any:
    if isinstance(value, set | frozenset):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _encode(body: Any) -> bytes:
    # Redacting the whole answer is the safety net of DESIGN.md 8: whatever a component put
    # in it, no bot token secret leaves through the API.
    return redact(json.dumps(body, separators=(",", ":"), default=_json_default)).encode()


_STATUS_LINES = {status.value: f"{status.value} {status.phrase}" for status in HTTPStatus}

__all__ = ["MAX_BODY_BYTES", "MAX_MESSAGE_BODY_BYTES", "HttpApi", "RelayApp"]
