"""``tgrelay run``, ``send``, ``status`` and ``check-config`` (called by :mod:`supervision.cli`).

Each function takes the parsed arguments and returns an exit code: 0 ok, 1 operational
failure, 2 usage or config error (a :class:`ConfigError` raised here becomes 2 in ``cli.main``).
``send`` and ``status`` talk to the running relay through its HTTP API, like any other client.

Threading: ``run`` blocks SIGTERM and SIGINT before any thread starts, so every thread
inherits the mask and the main thread alone receives them, synchronously, in ``sigwait``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import requests

from actors.errors import ConfigError, StoreUnavailable, TgrelayError
from actors.messages import STATUSES
from supervision.config import Config, load_config, resolve_config_path
from supervision.http_api import HttpApi
from supervision.relay import RelaySystem

log = logging.getLogger("tgrelay.service")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
SEND_CHUNK = 500
CONNECT_TIMEOUT_SECONDS = 5.0
READ_TIMEOUT_SECONDS = 120.0
UNAVAILABLE_RETRIES = 5
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class RelayUnreachable(TgrelayError):
    """No relay answers at the configured address."""


# --- check-config ---------------------------------------------------------------------------


def check_config(args: argparse.Namespace) -> int:
    path = resolve_config_path(args.config)
    config = load_config(path)
    tokens = config.tokens()
    print(f"{path}: OK")
    print(f"  store   {config.store.path} (synchronous={config.store.synchronous}, "
          f"retention {config.store.retention_days:g} days)")
    print(f"  http    {config.http.listen} "
          f"({'bearer token required' if config.http.auth_token else 'no authentication'})")
    print(f"  pools   {len(config.pools)} pool(s), {len(tokens)} token(s)")
    for pool in config.pools.values():
        names = ", ".join(f"{token.name} (weight {token.weight:g}, {token.max_per_second:g}/s)"
                          for token in pool.tokens)
        print(f"    {pool.name}: {names}")
    if not config.pools:
        print("  warning: no pools are configured, so no message can be sent")
    print(f"  statsd  {'off' if config.statsd is None else f'{config.statsd.host}:{config.statsd.port}'}")
    if config.alerts is not None:
        print(f"  alerts  chat {config.alerts.chat_id} through pool {config.alerts.pool}")
    return EXIT_OK


# --- run ------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    config = load_config(resolve_config_path(args.config))
    return serve_until_signalled(config, drain_seconds=args.drain_seconds)


def serve_until_signalled(config: Config, *, drain_seconds: float = 10.0, send: bool = True) -> int:
    """:func:`serve` until SIGTERM or SIGINT. Call it from the main thread."""
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        return serve(config, drain_seconds=drain_seconds, send=send, wait_for_stop=_wait_for_signal)
    finally:
        _discard_pending_signals()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


def serve(config: Config, *, drain_seconds: float = 10.0, send: bool = True,
          wait_for_stop: Callable[[], object]) -> int:
    """Start the relay and its HTTP API, wait for ``wait_for_stop()`` to return, stop both.

    ``send=False`` runs only the accepting side (see :meth:`RelaySystem.start`).
    """
    try:
        relay = RelaySystem.start(config, send=send)
    except StoreUnavailable as error:
        log.error("cannot open the store %s: %s", config.store.path, error)
        return EXIT_FAILURE
    try:
        api = HttpApi(relay, config.http)
    except OSError as error:
        log.error("cannot listen on %s: %s", config.http.listen, error.strerror or error)
        relay.stop(drain_seconds)
        return EXIT_FAILURE
    api.start()
    log.info("tgrelay listening on %s", api.url)
    try:
        wait_for_stop()
        log.info("stopping: closing the HTTP API, then draining sends for up to %g s", drain_seconds)
    finally:
        api.stop()
        relay.stop(drain_seconds)
    log.info("tgrelay stopped")
    return EXIT_OK


def _wait_for_signal() -> None:
    received = signal.sigwait(_STOP_SIGNALS)
    log.info("received %s", signal.Signals(received).name)


def _discard_pending_signals() -> None:
    """A second SIGTERM during shutdown must not kill the process once signals are unblocked."""
    while signal.sigtimedwait(_STOP_SIGNALS, 0) is not None:
        pass


# --- talking to the running relay -----------------------------------------------------------


class RelayClient:
    """The running relay's HTTP API at ``config.http.listen``, with its bearer token."""

    def __init__(self, config: Config) -> None:
        host, port = config.http.host, config.http.port
        if port == 0:
            raise ConfigError("http.listen", "has port 0 (any free port), so the running relay's "
                                             "port is unknown; set a fixed port")
        # A relay listening on every interface is reachable on the loopback one.
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # noqa: S104
        self.url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        self._session = requests.Session()
        self._session.trust_env = False  # a proxy from the environment must not see the token
        if config.http.auth_token:
            self._session.headers["Authorization"] = f"Bearer {config.http.auth_token}"

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any, requests.Response]:
        """Status, decoded JSON body (``None`` if not JSON) and the response itself."""
        try:
            response = self._session.request(method, self.url + path, json=body,
                                             timeout=(CONNECT_TIMEOUT_SECONDS, READ_TIMEOUT_SECONDS))
        except requests.ConnectionError:
            raise RelayUnreachable(f"no relay is running at {self.url} (is `tgrelay run` up, "
                                   "with the same config?)") from None
        except requests.Timeout:
            raise RelayUnreachable(f"the relay at {self.url} did not answer in time") from None
        try:
            payload = response.json()
        except ValueError:
            payload = None
        return response.status_code, payload, response

    def get_ok(self, path: str) -> Any:
        code, payload, _ = self.request("GET", path)
        if code != 200:
            raise TgrelayError(_failure(code, payload, self.url))
        return payload

    def close(self) -> None:
        self._session.close()


def _failure(code: int, payload: Any, url: str) -> str:
    if code == 401:
        return (f"the relay at {url} refused the API token: http.auth_token in this config "
                "does not match the running relay's")
    reason = payload.get("error") if isinstance(payload, dict) else None
    return f"the relay answered HTTP {code}: {reason or 'no reason given'}"


# --- send -----------------------------------------------------------------------------------


def send(args: argparse.Namespace) -> int:
    single = args.chat is not None or args.text is not None
    if args.file is not None and (single or args.key is not None):
        print("usage: tgrelay send takes either --file FILE or --chat/--text, not both "
              "(--key applies to a single message)", file=sys.stderr)
        return EXIT_USAGE
    if args.file is None and (args.chat is None or args.text is None):
        print("usage: tgrelay send --chat ID --text TEXT [--pool NAME] [--key KEY], "
              "or tgrelay send --file FILE.jsonl", file=sys.stderr)
        return EXIT_USAGE
    config = load_config(resolve_config_path(args.config))
    client = RelayClient(config)
    try:
        if args.file is not None:
            return _send_file(client, Path(args.file), args.pool)
        return _send_one(client, args)
    finally:
        client.close()


def _send_one(client: RelayClient, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"chat_id": args.chat, "text": args.text}
    if args.pool is not None:
        body["pool"] = args.pool
    if args.key is not None:
        body["dedup_key"] = args.key
    code, payload, _ = client.request("POST", "/v1/messages", body)
    if code == 202:
        print(f"id {payload['id']} accepted")
        return EXIT_OK
    if code == 200:
        print(f"id {payload['id']} duplicate (status {payload['status']})")
        return EXIT_OK
    if code in (400, 409) and isinstance(payload, dict):
        print(f"rejected: {payload.get('error')}", file=sys.stderr)
    else:
        print(f"error: {_failure(code, payload, client.url)}", file=sys.stderr)
    return EXIT_FAILURE


@dataclass
class _Tally:
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def done(self) -> int:
        return self.accepted + self.duplicates + self.rejected


def _send_file(client: RelayClient, path: Path, pool: str | None) -> int:
    try:
        with path.open("rb") as file:
            total = sum(1 for line in file if line.strip())
    except OSError as error:
        print(f"cannot read {path}: {error.strerror}", file=sys.stderr)
        return EXIT_USAGE
    tally = _Tally()
    progress = Progress(total, sys.stderr)
    started = time.monotonic()
    outcome = EXIT_OK
    try:
        for chunk in _chunks(_read_lines(path, pool, tally, progress), SEND_CHUNK):
            _send_chunk(client, chunk, tally, progress)
            progress.update(tally.done, tally)
    except TgrelayError as error:
        progress.note(f"stopped after {tally.done} of {total} lines: {error}\n"
                      "Sending the same file again is safe: what was accepted already comes back "
                      "as a duplicate (within the dedup window).")
        outcome = EXIT_FAILURE
    progress.finish(tally.done, tally)
    elapsed = time.monotonic() - started
    rate = tally.done / elapsed if elapsed > 0 else 0.0
    print(f"{tally.done} of {total} lines in {elapsed:.1f} s ({rate:,.0f}/s): "
          f"{tally.accepted} accepted, {tally.duplicates} duplicates, {tally.rejected} rejected")
    return EXIT_FAILURE if outcome or tally.rejected else EXIT_OK


def _read_lines(path: Path, pool: str | None, tally: _Tally, progress: Progress
                ) -> Iterator[tuple[int, Any]]:
    """(line number, message object) for each line; bad lines are counted as rejected."""
    with path.open("rb") as file:
        for number, raw in enumerate(file, start=1):
            if not raw.strip():
                continue
            try:
                message = json.loads(raw.decode("utf-8"))
            except (ValueError, RecursionError) as error:  # also UnicodeDecodeError
                tally.rejected += 1
                progress.note(f"line {number}: not a JSON object: {error}")
                continue
            if pool is not None and isinstance(message, dict):
                message.setdefault("pool", pool)
            yield number, message


def _chunks(items: Iterator[tuple[int, Any]], size: int) -> Iterator[list[tuple[int, Any]]]:
    chunk: list[tuple[int, Any]] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _send_chunk(client: RelayClient, chunk: list[tuple[int, Any]], tally: _Tally,
                progress: Progress) -> None:
    body = {"messages": [message for _, message in chunk]}
    for attempt in range(UNAVAILABLE_RETRIES + 1):
        code, payload, response = client.request("POST", "/v1/messages/batch", body)
        if code != 503 or attempt == UNAVAILABLE_RETRIES:
            break
        # Resending is safe: a batch is one transaction, and what did commit is a duplicate now.
        delay = min(30.0, float(response.headers.get("Retry-After", "1") or 1))
        progress.note(f"the relay cannot store messages right now; retrying in {delay:g} s")
        time.sleep(delay)
    if code != 200:
        raise TgrelayError(_failure(code, payload, client.url))
    for (number, _), result in zip(chunk, payload["results"], strict=True):
        if result["http_status"] == 202:
            tally.accepted += 1
        elif result["http_status"] == 200:
            tally.duplicates += 1
        else:
            tally.rejected += 1
            progress.note(f"line {number}: rejected: {result['error']}")


class Progress:
    """A progress bar on ``stream``: redrawn in place on a terminal, periodic lines otherwise."""

    WIDTH = 24

    def __init__(self, total: int, stream: TextIO, clock: Callable[[], float] = time.monotonic,
                 interval: float | None = None) -> None:
        self.total = total
        self._stream = stream
        self._clock = clock
        self._tty = stream.isatty()
        self._interval = interval if interval is not None else (0.1 if self._tty else 5.0)
        self._started = clock()
        self._last_drawn = -math.inf
        self._drawn_width = 0

    def update(self, done: int, tally: _Tally, *, force: bool = False) -> None:
        now = self._clock()
        if not force and now - self._last_drawn < self._interval:
            return
        self._last_drawn = now
        line = self.render(done, tally, now)
        if self._tty:
            self._stream.write("\r" + line.ljust(self._drawn_width))
            self._drawn_width = len(line)
        else:
            self._stream.write(line + "\n")
        self._stream.flush()

    def note(self, text: str) -> None:
        """A line of its own, above the bar."""
        if self._tty and self._drawn_width:
            self._stream.write("\r" + " " * self._drawn_width + "\r")
            self._drawn_width = 0
        self._stream.write(text + "\n")
        self._stream.flush()

    def finish(self, done: int, tally: _Tally) -> None:
        self.update(done, tally, force=True)
        if self._tty:
            self._stream.write("\n")
            self._stream.flush()

    def render(self, done: int, tally: _Tally, now: float) -> str:
        fraction = done / self.total if self.total else 1.0
        filled = round(self.WIDTH * fraction)
        elapsed = now - self._started
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = f"{(self.total - done) / rate:.0f} s" if rate > 0 and done < self.total else "-"
        return (f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {done}/{self.total} "
                f"{fraction:4.0%}  {tally.accepted} accepted, {tally.duplicates} duplicates, "
                f"{tally.rejected} rejected  {rate:,.0f}/s  ETA {eta}")


# --- status ---------------------------------------------------------------------------------


def status(args: argparse.Namespace) -> int:
    config = load_config(resolve_config_path(args.config))
    client = RelayClient(config)
    try:
        stats = client.get_ok("/v1/stats")
        tokens = client.get_ok("/v1/tokens")["tokens"]
    except RelayUnreachable as error:
        return _status_offline(config, client.url, str(error), as_json=args.json)
    finally:
        client.close()
    if args.json:
        print(json.dumps({"running": True, "url": client.url, "stats": stats, "tokens": tokens},
                         indent=2, sort_keys=True))
    else:
        print(render_status(client.url, stats, tokens))
    return EXIT_OK


def render_status(url: str, stats: dict[str, Any], tokens: list[dict[str, Any]],
                  now: float | None = None) -> str:
    now = time.time() if now is None else now
    counts = stats.get("counts", {})
    rate = stats.get("delivery_rate")
    check = stats.get("last_integrity_check")
    delivery = stats.get("delivery") or {}
    rows = [
        ("relay", f"running at {url}"),
        ("messages", "  ".join(f"{name} {counts.get(name, 0):,}" for name in STATUSES)),
        ("in flight", f"{stats.get('in_flight', 0):,}"),
        ("in doubt", f"{stats.get('in_doubt', 0):,}"),
        ("oldest pending", _age(stats.get("oldest_pending_age_seconds"))),
        ("delivery rate", "-" if rate is None else f"{rate:.2%} of finished messages confirmed"),
        ("last minute", _recent(delivery.get("last_minute"))),
        ("last hour", _recent(delivery.get("last_hour"))),
        ("database", _size(stats.get("db_bytes"))),
        ("integrity check", "never" if not check else
            f"{'ok' if check.get('ok') else 'FAILED'} at {_clock_time(check.get('at'))}"),
        ("alerts", _active_alerts(stats.get("alerts"))),
    ]
    lines = [f"{label:<15} {value}" for label, value in rows]
    sending = stats.get("sending")
    if isinstance(sending, dict):
        figures = [f"{name.replace('_', ' ')} {value}" for name, value in sorted(sending.items())
                   if isinstance(value, int | float | str) and not isinstance(value, bool)]
        lines.append(f"{'sending':<15} {', '.join(figures) or '-'}")
    lines.append("")
    if not tokens:
        lines.append("tokens: none (the sending side is not running)")
        return "\n".join(lines)
    header = ("TOKEN", "POOL", "STATE", "WEIGHT", "SENT", "FAILED", "RATE LIMITED UNTIL")
    table = [header] + [(
        str(token.get("name")), str(token.get("pool")), str(token.get("state")),
        f"{token.get('weight', 0):g}", f"{token.get('sent', 0):,}", f"{token.get('failed', 0):,}",
        _until(token.get("rate_limited_until"), now)) for token in tokens]
    lines += _table(table)
    # How each token is doing; the throughput covers the last minute.
    measured = {str(t.get("name")): t for t in stats.get("tokens") or [] if isinstance(t, dict)}
    health = [("TOKEN", "HEALTH", "MSG/S", "LATENCY", "429S", "ERRORS", "RESTARTS", "LAST ERROR")]
    for token in tokens:
        seen = {**token, **measured.get(str(token.get("name")), {})}
        latency = seen.get("latency_ms")
        health.append((
            str(seen.get("name")), _number(seen.get("health"), "{:.2f}"),
            _number(seen.get("sent_per_second"), "{:,.1f}"),
            "-" if latency is None else f"{latency:,.0f} ms", _number(seen.get("rate_limited"), "{:,}"),
            _number(seen.get("errors"), "{:,}"), _number(seen.get("restarts"), "{:,}"),
            _shorten(seen.get("last_error"))))
    lines += ["", *_table(health)]
    return "\n".join(lines)


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in rows]


def _recent(window: Any) -> str:
    """One recent window of ``GET /v1/stats``'s ``delivery``."""
    if not isinstance(window, dict):
        return "-"
    rate = window.get("delivery_rate")
    finished = window.get("confirmed", 0) + window.get("failed", 0)
    if rate is None:
        return "no message finished"
    return (f"{rate:.2%} of {finished:,} finished confirmed, "
            f"{window.get('confirmed_per_second', 0):,.1f} msg/s")


def _active_alerts(alerts: Any) -> str:
    active = alerts.get("active") if isinstance(alerts, dict) else None
    if not active:
        return "none active"
    names = [f"{a.get('kind')} [{a['subject']}]" if a.get("subject") else str(a.get("kind"))
             for a in active]
    return f"{len(names)} active: {', '.join(names)}"


def _number(value: Any, shape: str) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return shape.format(value)
    return "-"


def _shorten(text: Any, width: int = 60) -> str:
    if not text:
        return "-"
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 1] + "…"


def _status_offline(config: Config, url: str, reason: str, *, as_json: bool) -> int:
    counts, problem = _counts_from_file(config.store.path)
    if as_json:
        print(json.dumps({"running": False, "url": url, "error": reason, "counts": counts,
                          "database": config.store.path}, indent=2, sort_keys=True))
        return EXIT_FAILURE
    print(f"tgrelay is not running: {reason}")
    if counts is None:
        print(f"no counts: {problem}")
    else:
        print(f"from {config.store.path} (read-only): "
              + "  ".join(f"{name} {counts.get(name, 0):,}" for name in STATUSES))
    return EXIT_FAILURE


def _counts_from_file(path: str) -> tuple[dict[str, int] | None, str]:
    """Counts by status straight from the SQLite file, opened read-only."""
    import apsw

    if not Path(path).exists():
        return None, f"there is no database at {path}"
    try:
        db = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
        try:
            db.setbusytimeout(2000)
            counts = dict.fromkeys(STATUSES, 0)
            counts.update(db.execute("SELECT status, count(*) FROM message_store GROUP BY status"))
        finally:
            db.close()
    except apsw.Error as error:
        return None, f"cannot read {path}: {error}"
    return counts, ""


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _size(size: float | None) -> str:
    if size is None:
        return "-"
    if size < 1024:
        return f"{size:,.0f} bytes"
    exponent = min(3, int(math.log(size, 1024)))
    return f"{size / 1024 ** exponent:,.1f} {('KiB', 'MiB', 'GiB')[exponent - 1]}"


def _clock_time(at: float | None) -> str:
    return "-" if at is None else datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M:%S")


def _until(value: Any, now: float) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value <= now:
            return "-"
        return f"{_clock_time(value)} (in {value - now:.0f} s)"
    return "-" if value is None else str(value)
