"""The HTTP side: a threaded HTTP/1.1 keep-alive server in front of the Bot API.

One daemon thread per connection runs :class:`_Handler`; each request is read whole (so the
connection stays usable), then the network faults are applied (partition, reset, latency,
an nginx 502 page), then :class:`~simulator.api.BotApi` answers. ``/_control/...`` requests go
to the control endpoint and are never faulted. ``serve_forever`` runs on the thread that
:class:`~simulator.simulator.BotApiSimulator` starts.

Paths carry tokens, so nothing here logs a path: only bot ids.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.client import HTTPMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

from simulator.api import ApiOutcome, BotApi
from simulator.bots import TOKEN_PATTERN
from simulator.envelope import ApiError, JsonObject, error_envelope
from simulator.faults import FaultAction, Faults
from simulator.params import parse_params
from simulator.record import Call, Record

logger = logging.getLogger("simulator")

ControlHandler = Callable[[str, str, dict[str, str], JsonObject], tuple[int, JsonObject]]

KEEP_ALIVE_IDLE_SECONDS = 300
MAX_BODY_BYTES = 10 * 1024 * 1024
_MAX_HEADERS = 100
_MAX_HEADER_LINE = 65536
_BOT_PATH = re.compile(r"/bot([^/]*)/([^/]*)")
_CONTROL_PREFIX = "/_control/"
_SERVER_HEADER = "nginx/1.18.0"
BAD_GATEWAY_PAGE = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n"
    b"<hr><center>nginx/1.18.0</center>\r\n</body>\r\n</html>\r\n"
)


class _BadFraming(Exception):
    """The request body cannot be read reliably; answer 400 and close the connection."""


class SimulatorHttpServer(ThreadingHTTPServer):
    """Threaded server that knows its open connections, so :meth:`stop` can cut them."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024

    def __init__(
        self,
        address: tuple[str, int],
        api: BotApi,
        faults: Faults,
        record: Record,
        control: ControlHandler,
    ) -> None:
        self.api = api
        self.faults = faults
        self.record = record
        self.control = control
        self.stopping = threading.Event()
        self.connections_accepted = 0
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can stall on DNS.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def process_request(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: object
    ) -> None:
        assert isinstance(request, socket.socket)
        with self._connections_lock:
            self._connections.add(request)
            self.connections_accepted += 1
        super().process_request(request, client_address)

    def shutdown_request(self, request: socket.socket | tuple[bytes, socket.socket]) -> None:
        assert isinstance(request, socket.socket)
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: object
    ) -> None:
        logger.warning("simulator: a connection handler failed", exc_info=True)

    def stop(self) -> None:
        """Stop accepting, wake delayed answers and cut every open connection."""
        self.stopping.set()
        self.shutdown()
        self.server_close()
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                logger.debug("simulator: connection already closed at stop")


class _Handler(BaseHTTPRequestHandler):
    """Serves one connection, request after request (HTTP/1.1 keep-alive)."""

    protocol_version = "HTTP/1.1"
    timeout = KEEP_ALIVE_IDLE_SECONDS
    server: SimulatorHttpServer
    raw_requestline: bytes  # set by BaseHTTPRequestHandler.handle_one_request

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def parse_request(self) -> bool:
        """Read the request line and headers, without the email parser the base class uses.

        ``http.client.parse_headers`` costs more than the whole Bot API logic; benchmarks push
        thousands of requests a second through here, so headers are split by hand.
        """
        self.request_version = "HTTP/1.0"
        self.close_connection = True
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = self.requestline.split()
        if len(words) != 3 or words[2] not in ("HTTP/1.0", "HTTP/1.1"):
            self.send_error(HTTPStatus.BAD_REQUEST, "Bad request line")
            return False
        self.command, self.path, self.request_version = words
        headers = HTTPMessage()
        for _ in range(_MAX_HEADERS):
            line = self.rfile.readline(_MAX_HEADER_LINE + 1)
            if len(line) > _MAX_HEADER_LINE:
                self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
                return False
            if line in (b"\r\n", b"\n", b""):
                break
            name, colon, value = str(line, "iso-8859-1").partition(":")
            if not colon:
                self.send_error(HTTPStatus.BAD_REQUEST, "Bad header line")
                return False
            headers[name.strip()] = value.strip()
        else:
            self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Too many headers")
            return False
        self.headers = headers
        connection = headers.get("Connection", "").lower()
        self.close_connection = "close" in connection or (
            self.request_version == "HTTP/1.0" and "keep-alive" not in connection
        )
        expects_continue = headers.get("Expect", "").lower() == "100-continue"
        return not (expects_continue and self.request_version == "HTTP/1.1") or (self.handle_expect_100())

    def log_message(self, format: str, *args: object) -> None:
        """Silent: the standard access log would print paths, and paths carry tokens."""

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def _serve(self) -> None:
        arrival = (time.time(), time.monotonic())
        try:
            body = self._read_body()
        except _BadFraming as problem:
            self.close_connection = True
            self._send_json(400, error_envelope(400, f"Bad Request: {problem}"))
            return
        url = urlsplit(self.path)
        if url.path.startswith(_CONTROL_PREFIX):
            self._serve_control(url.path.removeprefix(_CONTROL_PREFIX), url.query, body)
            return
        match = _BOT_PATH.fullmatch(url.path)
        token_match = TOKEN_PATTERN.fullmatch(match.group(1)) if match else None
        if match is None or token_match is None:
            self._send_json(404, error_envelope(404, "Not Found"))
            if match is not None:
                self._record(None, match.group(2), 404, None, None, None, arrival)
            return
        token, method = match.groups()
        bot_id = int(token_match.group(1))
        self._serve_bot(token, bot_id, method, url.query, body, arrival)

    def _serve_bot(
        self,
        token: str,
        bot_id: int,
        method: str,
        query: str,
        body: bytes,
        arrival: tuple[float, float],
    ) -> None:
        plan = self.server.faults.plan(bot_id)
        if plan.action in (FaultAction.RESET, FaultAction.PARTITION):
            self._record(bot_id, method, None, None, None, plan.action.value, arrival)
            self._reset_connection()
            return
        if plan.latency_seconds:
            self.server.stopping.wait(plan.latency_seconds)
        if plan.action is FaultAction.BAD_GATEWAY:
            self._record(bot_id, method, 502, None, None, plan.action.value, arrival)
            self._send(502, BAD_GATEWAY_PAGE, "text/html")
            return
        try:
            params = parse_params(query, self.headers.get("Content-Type"), body)
        except ApiError as error:
            outcome = ApiOutcome(error.error_code, error.envelope())
        else:
            outcome = self._call_api(token, bot_id, method, params, plan.retry_after)
        fault = plan.action.value if plan.action is FaultAction.FLOOD else None
        if outcome.answer_delay:
            fault = "accept_then_timeout"
        self._record(bot_id, method, outcome.status, outcome.chat_ref, outcome.retry_after, fault, arrival)
        if outcome.answer_delay and self.server.stopping.wait(outcome.answer_delay):
            self._reset_connection()
            return
        self._send_json(outcome.status, outcome.body)

    def _call_api(
        self, token: str, bot_id: int, method: str, params: JsonObject, retry_after: int | None
    ) -> ApiOutcome:
        """The API's answer; a bug in the simulator becomes a logged 500, as Telegram would answer."""
        try:
            return self.server.api.call(token, method, params, retry_after)
        except Exception:
            logger.exception("simulator: %s for bot %s failed", method, bot_id)
            return ApiOutcome(500, error_envelope(500, "Internal Server Error"))

    def _serve_control(self, action: str, query: str, body: bytes) -> None:
        try:
            payload = json.loads(body) if body else {}
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            self._send_json(400, {"ok": False, "description": "the body must be a JSON object"})
            return
        status, answer = self.server.control(
            self.command, action, dict(parse_qsl(query, keep_blank_values=True)), payload
        )
        self._send_json(status, answer)

    def _record(
        self,
        bot_id: int | None,
        method: str,
        status: int | None,
        chat_ref: int | str | None,
        retry_after: int | None,
        fault: str | None,
        arrival: tuple[float, float],
    ) -> None:
        self.server.record.add_call(
            Call(bot_id, method, status, chat_ref, retry_after, fault, arrival[0], arrival[1])
        )
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("bot %s %s -> %s %s", bot_id, method, status or "reset", fault or "")

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            return b""
        try:
            length = int(length_header)
        except ValueError:
            raise _BadFraming("invalid Content-Length") from None
        if not 0 <= length <= MAX_BODY_BYTES:
            raise _BadFraming("request body too large")
        return self.rfile.read(length)

    def _read_chunked(self) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while True:
            size_line = self.rfile.readline(1024).split(b";", 1)[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError:
                raise _BadFraming("invalid chunk size") from None
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            total += size
            if total > MAX_BODY_BYTES:
                raise _BadFraming("request body too large")
            chunks.append(self.rfile.read(size))
            self.rfile.readline(1024)

    def _send_json(self, status: int, body: JsonObject) -> None:
        encoded = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        self._send(status, encoded, "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        connection = "close" if self.close_connection else "keep-alive"
        head = (
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
            f"Server: {_SERVER_HEADER}\r\n"
            f"Date: {self.date_time_string()}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"Connection: {connection}\r\n\r\n"
        )
        try:
            self.wfile.write(head.encode("latin-1") + body)
        except OSError:
            self.close_connection = True

    def _reset_connection(self) -> None:
        """Drop the connection with a TCP RST (SO_LINGER 0), answering nothing."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            logger.debug("simulator: connection already gone before the reset")
        self.connection.close()
