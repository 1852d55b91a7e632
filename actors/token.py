"""The token actor: one per bot token, the only place its secret is used.

Threading:

* the actor's own thread runs every handler: it owns the rate limits, the health score, the
  queue of rows the balancer assigned and the decision for each outcome;
* when rows may go (rate budget, free workers), the actor submits one ``MarkSent`` for them
  (fencing: only rows still leased to this generation go out) and does not wait: the store's
  thread, once the mark is committed, hands each marked row to the actor's
  :class:`WorkerPool` (a few daemon threads, each with its own keep-alive
  ``requests.Session``), which makes the HTTP call. The actor's mailbox never waits on the
  network (DESIGN.md 4), and a worker is busy only while its request is;
* workers (and store callbacks) put their results into a :class:`ResultChannel`; one
  :class:`~actors.sending_messages.ResultsReady` wakes the actor for however many piled up;
* the actor settles rows without waiting either: deliveries are collected and written as one
  ``ConfirmMany`` when its mailbox is empty; releases and failures are submitted as they are
  decided. A write that fails comes back as :class:`StoreWriteFailed` and is retried.

Errors are classified as DESIGN.md 6 says (:func:`classify_response`, :func:`classify_error`)
and every handler is guarded: an exception is reported to the supervisor, cleaned of anything
secret, and re-raised so pykka stops the actor. The secret appears only inside request URLs;
logs, errors, metrics and the store use the token's configured name.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import queue
import random
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pykka
import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ConnectTimeoutError

from actors.errors import StoreUnavailable, TgrelayError
from actors.messages import (
    ClaimedMessage,
    ConfirmMany,
    FailMessage,
    MarkSent,
    MarkUnreachable,
    ReleaseMessage,
    StoreCommand,
)
from actors.observe import AlertSink, Metrics
from actors.ratelimit import Alarm, ChatLimits, Gcra, tell_if_alive
from actors.reply import Reply
from actors.sending_messages import (
    TRANSIENT_KINDS,
    AssignMessages,
    CheckToken,
    CrashForTest,
    Drain,
    Failure,
    FailureKind,
    ResultsReady,
    SendFailed,
    SendSucceeded,
    StoreWriteFailed,
    TokenChecked,
    TokenFailed,
    TokenHasCapacity,
    Wake,
    WorkerCrashed,
)
from actors.store import StoreClient
from supervision.redact import RedactingFilter, redact

log = logging.getLogger("tgrelay.token")

# The HTTP library logs request lines, and our request lines carry the secret: its loggers
# redact at the source, so even an embedding application's DEBUG logging never shows a token.
for _name in ("urllib3.connectionpool", "urllib3.connection", "urllib3.poolmanager",
              "urllib3.response", "urllib3.util.retry"):
    _http_log = logging.getLogger(_name)
    if not any(isinstance(f, RedactingFilter) for f in _http_log.filters):
        _http_log.addFilter(RedactingFilter())

IN_DOUBT_RESEND = "resend"  # at-least-once: a send whose outcome is unknown goes out again
IN_DOUBT_FAIL = "fail"      # at-most-once: it fails with the reason instead
HEALTHY, RATE_LIMITED, FAILING, REVOKED = "healthy", "rate_limited", "failing", "revoked"
MAX_ERROR_TEXT = 300
STORE_RETRY_SECONDS = 1.0
MAX_STORE_RETRIES = 30
GETME_STRIKES_TO_REVOKE = 2  # revoked tokens have flapped: one 401 from getMe is not proof
IDLE_PRUNE_SECONDS = 30.0
MAX_DEFERRED = 16  # messages handled before pumping, settling and publishing at the latest


class TokenActorCrashed(TgrelayError):
    """A token actor's handler failed; the text is cleaned of any secret."""


@dataclass(frozen=True)
class TokenSettings:
    """Everything one token actor needs; ``secret`` never appears in a repr."""

    name: str
    pool: str
    secret: str = field(repr=False)
    weight: float = 1.0
    max_per_second: float = 30.0
    api_base_url: str = "https://api.telegram.org"
    request_timeout: float = 10.0
    per_chat_per_second: float = 1.0
    per_group_per_minute: float = 20.0
    workers: int = 6
    max_attempts: int = 20
    in_doubt_policy: str = IN_DOUBT_RESEND
    backoff_base: float = 0.25
    backoff_cap: float = 30.0
    getme_retry_seconds: float = 1.0
    revoked_probe_seconds: float = 30.0
    error_streak: int = 5  # consecutive transient errors before the token pauses

    @property
    def connect_timeout(self) -> float:
        return min(3.05, self.request_timeout)

    @property
    def window(self) -> int:
        """Rows this token may hold at once: enough to keep its workers busy, and never
        more than half a second of its rate budget (a row held is a chat kept waiting)."""
        return max(1, min(4 * self.workers, math.ceil(self.max_per_second / 2)))

    def url(self, method: str) -> str:
        return f"{self.api_base_url.rstrip('/')}/bot{self.secret}/{method}"

    def clean(self, text: str) -> str:
        """``text`` without the secret (and without anything else shaped like a token)."""
        return redact(text.replace(self.secret, f"{self.name}:***"))[:MAX_ERROR_TEXT]


# A paused token probes again at least this often, so it is back within seconds of the
# network healing (its messages go to the other tokens meanwhile).
PAUSE_CAP_SECONDS = 5.0


def backoff(attempt: int, base: float, cap: float) -> float:
    """Jittered exponential backoff: ``base * 2**(attempt-1)``, capped, times 0.5..1."""
    return min(cap, base * 2 ** max(0, attempt - 1)) * random.uniform(0.5, 1.0)


# --- talking to the Bot API (worker threads; pure functions) --------------------------------


def classify_response(status: int, reason: str, content: bytes) -> int | Failure:
    """Telegram's ``message_id`` for a delivered message, else the classified failure."""
    body = _json_object(content)
    if body is not None and body.get("ok") is True:
        result = body.get("result")
        message_id = result.get("message_id") if isinstance(result, dict) else None
        if isinstance(message_id, int) and not isinstance(message_id, bool):
            return message_id
        return Failure(FailureKind.SERVER_ERROR, f"HTTP {status}: an ok answer without a message_id")
    if body is None:
        shape = "an HTML page" if content.lstrip()[:1] == b"<" else "not a Bot API answer"
        description = f"HTTP {status} {reason} ({shape})"
        code = status
    else:
        description = str(body.get("description") or f"HTTP {status} {reason}")
        error_code = body.get("error_code")
        code = error_code if isinstance(error_code, int) else status
    parameters = body.get("parameters") if body is not None else None
    parameters = parameters if isinstance(parameters, dict) else {}
    description = redact(description)[:MAX_ERROR_TEXT]
    if code == 429:
        retry_after = parameters.get("retry_after")
        seconds = retry_after if isinstance(retry_after, int) and retry_after > 0 else 1
        return Failure(FailureKind.RATE_LIMITED, description, retry_after=seconds)
    if code in (401, 404):
        return Failure(FailureKind.TOKEN_REJECTED, description)
    if code == 403:
        return Failure(FailureKind.UNREACHABLE, description)
    migrate_to = parameters.get("migrate_to_chat_id")
    if code == 400 and isinstance(migrate_to, int):
        return Failure(FailureKind.MIGRATED, description, migrate_to_chat_id=migrate_to)
    if 400 <= code < 500:
        return Failure(FailureKind.BAD_REQUEST, description)
    return Failure(FailureKind.SERVER_ERROR, description)


def classify_error(error: requests.RequestException, settings: TokenSettings) -> Failure:
    """A ``requests`` exception: did the request leave before it went wrong?"""
    detail = settings.clean(f"{type(error).__name__}: {error}")
    if isinstance(error, requests.exceptions.ConnectTimeout) or _never_connected(error):
        return Failure(FailureKind.CONNECT_FAILED, f"could not connect: {detail}")
    if isinstance(error, requests.exceptions.ReadTimeout):
        return Failure(FailureKind.TIMED_OUT,
                       f"no answer within {settings.request_timeout:g} s after the request left")
    return Failure(FailureKind.CONNECTION_LOST, f"connection lost after the request left: {detail}")


def _never_connected(error: requests.RequestException) -> bool:
    if not isinstance(error, requests.exceptions.ConnectionError) or not error.args:
        return False
    reason = getattr(error.args[0], "reason", error.args[0])
    return isinstance(reason, ConnectTimeoutError)  # NewConnectionError is one too


def _json_object(content: bytes) -> dict[str, Any] | None:
    try:
        body = json.loads(content)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def send_message(session: requests.Session, settings: TokenSettings, row: ClaimedMessage
                 ) -> int | Failure:
    """One ``sendMessage`` call: Telegram's message_id or the classified failure."""
    payload: dict[str, Any] = {"chat_id": row.chat_id, "text": row.text}
    if row.parse_mode:
        payload["parse_mode"] = row.parse_mode
    if row.disable_notification:
        payload["disable_notification"] = True
    try:
        response = session.post(settings.url("sendMessage"), json=payload,
                                timeout=(settings.connect_timeout, settings.request_timeout))
    except requests.RequestException as error:
        return classify_error(error, settings)
    return classify_response(response.status_code, response.reason or "", response.content)


def check_token(settings: TokenSettings, session: requests.Session | None = None) -> TokenChecked:
    """``getMe``: valid (with the bot's username), rejected (401/404), or unknown (network)."""
    http = session or requests.Session()
    try:
        response = http.get(settings.url("getMe"),
                            timeout=(settings.connect_timeout, settings.request_timeout))
    except requests.RequestException as error:
        return TokenChecked(None, None, classify_error(error, settings).description)
    finally:
        if session is None:
            http.close()
    body = _json_object(response.content)
    if body is not None and body.get("ok") is True and isinstance(body.get("result"), dict):
        username = body["result"].get("username")
        return TokenChecked(True, username if isinstance(username, str) else None, None)
    outcome = classify_response(response.status_code, response.reason or "", response.content)
    description = outcome.description if isinstance(outcome, Failure) else "unexpected answer"
    rejected = isinstance(outcome, Failure) and outcome.kind is FailureKind.TOKEN_REJECTED
    return TokenChecked(False if rejected else None, None, description)


def keep_alive_session(base_url: str) -> requests.Session:
    """One keep-alive connection, no automatic retries (we classify every failure ourselves).

    The environment (proxies, CA bundle) is read once here instead of on every request:
    ``requests`` otherwise looks for ``~/.netrc`` and re-reads proxy variables per call, which
    costs more CPU than the rest of a send.
    """
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=1, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.proxies.update(requests.utils.get_environ_proxies(base_url))  # honours NO_PROXY
    session.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
    session.trust_env = False
    return session


class WorkerPool:
    """``size`` daemon threads, each with its own keep-alive ``requests.Session``.

    Daemon threads, so a request still hanging when the relay stops never holds the process;
    its row is released to pending (counted in doubt) by the graceful stop.
    """

    def __init__(self, name: str, size: int, base_url: str) -> None:
        self._base_url = base_url
        self._jobs: queue.SimpleQueue[Callable[[requests.Session], None] | None] = queue.SimpleQueue()
        self._closed = threading.Event()
        self._size = size
        for index in range(size):
            threading.Thread(target=self._work, name=f"tgrelay-{name}-{index}", daemon=True).start()

    def submit(self, job: Callable[[requests.Session], None]) -> None:
        self._jobs.put(job)

    def shutdown(self) -> None:
        """Run nothing more; a request already on the wire finishes on its own."""
        if not self._closed.is_set():
            self._closed.set()
            for _ in range(self._size):
                self._jobs.put(None)

    def _work(self) -> None:
        with keep_alive_session(self._base_url) as session:
            while True:
                job = self._jobs.get()
                if job is None or self._closed.is_set():
                    return
                job(session)


class ResultChannel:
    """Results for one token actor, put from worker and store threads, drained by the actor.

    A pykka ``tell`` per result costs a mailbox lock and a thread wake-up each; here one
    :class:`ResultsReady` wakes the actor for however many results piled up meanwhile.
    """

    def __init__(self, ref: pykka.ActorRef[Any]) -> None:
        self._ref = ref
        self._items: deque[object] = deque()
        self._lock = threading.Lock()
        self._signalled = False

    def put(self, item: object) -> None:
        self._items.append(item)
        with self._lock:
            if self._signalled:
                return
            self._signalled = True
        tell_if_alive(self._ref, ResultsReady())

    def drain(self) -> list[object]:
        with self._lock:
            self._signalled = False  # before popping: a put racing with us signals again
        items = []
        while self._items:
            items.append(self._items.popleft())
        return items


def _mark_and_send(results: ResultChannel, store: StoreClient, settings: TokenSettings,
                   owner: str, rows: Sequence[ClaimedMessage], workers: WorkerPool) -> None:
    """``MarkSent`` for a batch (fencing: only rows still leased to ``owner``), then each marked
    row to a worker. The store answers on its own thread; nothing here waits for it, so a
    worker is busy only while its request is."""

    def marked(reply: Reply[Any]) -> None:
        error = reply.exception()
        if error is not None:
            failure = Failure(FailureKind.STORE_UNAVAILABLE, str(error))
            for row in rows:
                results.put(SendFailed(row, failure, None, 0.0))
            return
        leased = set(reply.result())
        for row in rows:
            if row.id in leased:
                workers.submit(_http_job(results, settings, row))
            else:
                failure = Failure(FailureKind.LEASE_LOST, "the lease moved to another token")
                results.put(SendFailed(row, failure, None, 0.0))

    store.submit(MarkSent(tuple(row.id for row in rows), settings.name, owner)
                 ).add_done_callback(marked)


def _http_job(results: ResultChannel, settings: TokenSettings, row: ClaimedMessage
              ) -> Callable[[requests.Session], None]:
    """What a worker does for one marked row. A result for a stopped actor is never read, on
    purpose: the supervisor releases that generation's leases (in doubt), so the row is
    resent, not lost."""

    def job(session: requests.Session) -> None:
        try:
            started = time.monotonic()
            outcome = send_message(session, settings, row)
            latency = time.monotonic() - started
            if isinstance(outcome, Failure):
                results.put(SendFailed(row, outcome, started, latency))
            else:
                results.put(SendSucceeded(row, outcome, started, latency))
        except Exception as error:  # noqa: BLE001 -- a bug here must fail the actor, not vanish
            results.put(WorkerCrashed(row, settings.clean("".join(traceback.format_exception(error)))))

    return job


def _check_job(results: ResultChannel, settings: TokenSettings
               ) -> Callable[[requests.Session], None]:
    def job(session: requests.Session) -> None:
        try:
            results.put(check_token(settings, session))
        except Exception as error:  # noqa: BLE001 -- reported to the actor, which fails
            results.put(WorkerCrashed(None, settings.clean("".join(traceback.format_exception(error)))))

    return job


def _submit_write(store: StoreClient, results: ResultChannel, command: StoreCommand,
                  attempt: int = 1) -> None:
    def settled(reply: Reply[Any]) -> None:
        error = reply.exception()
        if error is not None:
            results.put(StoreWriteFailed(command, str(error), attempt))

    store.submit(command).add_done_callback(settled)


# --- health and what the token shows the others ---------------------------------------------


class Health:
    """Success rate and latency (EWMAs), recent 429s; a score in [0, 1].

    Errors fade: without new events the success rate drifts back to 1 with a 30 s time
    constant, so a token that failed for a while gets traffic again and can prove itself.
    """

    SUCCESS_ALPHA = 0.1
    LATENCY_ALPHA = 0.2
    GOOD_LATENCY = 0.5      # seconds; slower than this lowers the score
    RECOVERY_SECONDS = 30.0
    RATE_LIMIT_MEMORY = 30.0
    FLOOR = 0.05

    def __init__(self) -> None:
        self._success = 1.0
        self._latency: float | None = None
        self._last_event = time.monotonic()
        self._last_rate_limited = -math.inf

    def success_rate(self, now: float) -> float:
        faded = math.exp(-(now - self._last_event) / self.RECOVERY_SECONDS)
        return 1.0 - (1.0 - self._success) * faded

    def record(self, ok: bool, latency: float | None, now: float) -> None:
        self._success = self.success_rate(now) * (1 - self.SUCCESS_ALPHA) + self.SUCCESS_ALPHA * ok
        self._last_event = now
        if latency is not None:
            previous = latency if self._latency is None else self._latency
            self._latency = previous + self.LATENCY_ALPHA * (latency - previous)

    def rate_limited(self, now: float) -> None:
        self._last_rate_limited = now

    @property
    def latency(self) -> float | None:
        return self._latency

    def score(self, now: float) -> float:
        latency = self._latency or 0.0
        latency_factor = self.GOOD_LATENCY / max(self.GOOD_LATENCY, latency)
        recent_429 = 0.5 if now - self._last_rate_limited < self.RATE_LIMIT_MEMORY else 1.0
        return round(max(self.FLOOR, self.success_rate(now) * latency_factor * recent_429), 3)


@dataclass(frozen=True)
class TokenView:
    """What one token generation shows the balancer, the supervisor and the API."""

    name: str
    pool: str
    owner: str
    weight: float
    window: int
    ref: pykka.ActorRef[Any] | None = field(default=None, compare=False, repr=False)
    state: str = HEALTHY
    health: float = 1.0
    accepting: bool = True       # may be handed rows (not revoked, confirming, draining)
    usable_at: float = 0.0       # monotonic: cooling down or paused until then
    rate_limited_until: float | None = None  # wall clock, for the API
    held: int = 0                # rows assigned and not settled
    rate_capped: bool = False    # rows wait for its per-bot budget: it is at Telegram's limit
    in_flight: int = 0           # requests on the wire
    received: int = 0            # rows ever assigned to this generation
    sent: int = 0
    failed: int = 0
    rate_limited: int = 0
    errors: int = 0
    in_doubt: int = 0
    restarts: int = 0
    quarantined: bool = False
    latency_ms: float | None = None
    last_error: str | None = None

    @property
    def in_service(self) -> bool:
        """Neither revoked nor quarantined (it may be cooling down or busy for a while)."""
        return not self.quarantined and self.state != REVOKED

    @property
    def usable(self) -> bool:
        """May be handed rows now."""
        return self.accepting and self.in_service

    def as_api(self) -> dict[str, Any]:
        return {
            "name": self.name, "pool": self.pool, "state": self.state, "weight": self.weight,
            "sent": self.sent, "failed": self.failed,
            "rate_limited_until": self.rate_limited_until, "health": self.health,
            "rate_limited": self.rate_limited, "errors": self.errors, "in_doubt": self.in_doubt,
            "in_flight": self.in_flight, "restarts": self.restarts,
            "quarantined": self.quarantined, "latency_ms": self.latency_ms,
            "last_error": self.last_error,
        }


class TokenBoard:
    """The current view of every token, thread-safe.

    Token actors publish their own view; a view from a generation that is no longer the
    registered one (a dead actor's late words) is ignored. The supervisor registers each
    generation and marks quarantine.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._views: dict[str, TokenView] = {}

    def register(self, view: TokenView) -> None:
        with self._lock:
            self._views[view.name] = view

    def publish(self, view: TokenView) -> None:
        with self._lock:
            current = self._views.get(view.name)
            if current is not None and current.owner == view.owner and not current.quarantined:
                self._views[view.name] = dataclasses.replace(view, restarts=current.restarts)

    def update(self, name: str, **changes: Any) -> TokenView:
        with self._lock:
            view = dataclasses.replace(self._views[name], **changes)
            self._views[name] = view
            return view

    def get(self, name: str) -> TokenView:
        with self._lock:
            return self._views[name]

    def views(self) -> list[TokenView]:
        with self._lock:
            return list(self._views.values())

    def in_service(self, pool: str) -> tuple[str, ...]:
        """The tokens of ``pool`` that can still deliver, sooner or later."""
        with self._lock:
            return tuple(v.name for v in self._views.values() if v.pool == pool and v.in_service)


# --- the actor --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenWiring:
    """How a token actor reaches the rest of the system (shared by every generation)."""

    store: StoreClient
    board: TokenBoard
    alarm: Alarm
    metrics: Metrics
    alert: AlertSink
    report_failure: Callable[[TokenFailed], None]
    wake_balancer: Callable[[object], None]


class TokenActor(pykka.ThreadingActor):
    """Sends the rows the balancer assigns it, within Telegram's limits, and settles each.

    One instance is one *generation* of a token; ``owner`` (``name#generation``) is the
    lease owner its rows carry in the store, so a dead generation's late work is fenced off.
    """

    def __init__(self, settings: TokenSettings, owner: str, wiring: TokenWiring,
                 previous: TokenView | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.owner = owner
        self._wiring = wiring
        self._metric = f"tokens.{settings.name}"
        self._workers: WorkerPool | None = None
        self._results: ResultChannel | None = None
        self._queue: deque[ClaimedMessage] = deque()
        self._in_flight: dict[int, ClaimedMessage] = {}
        self._bot_limit = Gcra(settings.max_per_second, burst=min(5, int(settings.max_per_second)))
        self._chat_limits = ChatLimits(settings.per_chat_per_second, settings.per_group_per_minute)
        self._health = Health()
        self._cool_until = 0.0       # 429: nothing goes out before this
        self._paused_until = 0.0     # a streak of errors, or the store refusing MarkSent
        self._consecutive_errors = 0
        self._confirming = False     # a 401 seen; getMe will tell
        self._revoked = False
        self._strikes = 0
        self._draining = False
        self._asked_for_work = False
        self._wake_at: float | None = None
        self._rate_capped = False
        self._last_prune = time.monotonic()
        self._received = 0
        self._confirmations: list[tuple[int, int]] = []
        self._deferred = 0
        self._failure_reported = False
        counters = previous or TokenView(settings.name, settings.pool, owner, settings.weight, 0)
        self._sent, self._failed = counters.sent, counters.failed
        self._rate_limited, self._errors = counters.rate_limited, counters.errors
        self._in_doubt, self._last_error = counters.in_doubt, counters.last_error

    # --- pykka hooks (actor thread) ---------------------------------------------------------

    def on_start(self) -> None:
        self._results = ResultChannel(self.actor_ref)
        self._workers = WorkerPool(self.settings.name, self.settings.workers,
                                   self.settings.api_base_url)
        self._publish()

    def on_stop(self) -> None:
        self._settle_confirmations()
        if self._workers is not None:
            self._workers.shutdown()

    def on_failure(self, *exc_info: Any) -> None:
        self._settle_confirmations()
        if self._workers is not None:
            self._workers.shutdown()
        if not self._failure_reported:
            error = exc_info[1]
            self._report(self.settings.clean(f"{type(error).__name__}: {error}"))

    def on_receive(self, message: Any) -> None:
        """Handle ``message``; when the mailbox is empty (or after a burst), dispatch more
        work, write the confirmations collected meanwhile in one command, and publish."""
        try:
            if isinstance(message, ResultsReady):
                assert self._results is not None
                for result in self._results.drain():
                    self._handle(result)
            else:
                self._handle(message)
            self._deferred += 1
            if self._deferred >= MAX_DEFERRED or self.actor_inbox.empty():
                self._deferred = 0
                self._settle_confirmations()
                self._pump()
                self._publish()
        except Exception as error:  # noqa: BLE001 -- reported to the supervisor, then re-raised
            self._settle_confirmations()  # deliveries known so far are facts: keep them
            description = self.settings.clean(f"{type(error).__name__}: {error}")
            log.error("token %s failed: %s", self.settings.name,
                      self.settings.clean("".join(traceback.format_exception(error))))
            self._report(description)
            raise TokenActorCrashed(f"token {self.settings.name}: {description}") from None

    def _report(self, description: str) -> None:
        self._failure_reported = True
        self._wiring.report_failure(TokenFailed(self.settings.name, self.owner, description))

    # --- handlers ---------------------------------------------------------------------------

    def _handle(self, message: Any) -> None:
        match message:
            case AssignMessages(rows=rows):
                self._assigned(rows)
            case SendSucceeded():
                self._succeeded(message)
            case SendFailed():
                self._send_failed(message)
            case TokenChecked():
                self._checked(message)
            case CheckToken():
                self._probe()
            case Wake():
                self._wake_at = None
            case Drain():
                self._draining = True
            case StoreWriteFailed():
                self._store_write_failed(message)
            case WorkerCrashed(description=description):
                raise TokenActorCrashed(f"a worker failed: {description}")
            case CrashForTest():
                raise TokenActorCrashed("crash injected by a test")
            case _:
                raise TypeError(f"a token actor does not understand {type(message).__name__}")

    def _assigned(self, rows: tuple[ClaimedMessage, ...]) -> None:
        self._received += len(rows)
        self._asked_for_work = False
        if self._blocked(time.monotonic()):
            for row in rows:  # the balancer saw an older view of us: pass the rows on
                self._reroute(row, None)
            return
        self._queue.extend(rows)

    def _succeeded(self, result: SendSucceeded) -> None:
        row = result.row
        self._in_flight.pop(row.id, None)
        now = time.monotonic()
        self._chat_limits.record(row.chat_id, result.started_at)
        self._confirmations.append((row.id, result.telegram_message_id))
        self._health.record(True, result.latency, now)
        self._consecutive_errors = 0
        self._sent += 1
        metrics = self._wiring.metrics
        metrics.incr(f"{self._metric}.sent")
        metrics.incr("messages.confirmed")
        metrics.timing(f"{self._metric}.latency", result.latency * 1000)
        if row.accepted_at:
            metrics.timing("messages.end_to_end", (time.time() - row.accepted_at) * 1000)

    def _send_failed(self, result: SendFailed) -> None:
        row, failure = result.row, result.failure
        self._in_flight.pop(row.id, None)
        now = time.monotonic()
        if result.started_at is not None:
            self._chat_limits.record(row.chat_id, result.started_at)
        kind = failure.kind
        if kind is FailureKind.LEASE_LOST:
            log.debug("token %s: message %d was rerouted before it left", self.settings.name, row.id)
        elif kind is FailureKind.STORE_UNAVAILABLE:
            self._queue.appendleft(row)
            self._paused_until = max(self._paused_until, now + STORE_RETRY_SECONDS)
        elif kind is FailureKind.RATE_LIMITED:
            self._rate_limited_by_telegram(row, failure, now)
        elif kind is FailureKind.TOKEN_REJECTED:
            self._rejected(row, failure)
        elif kind is FailureKind.UNREACHABLE:
            self._unreachable(row, failure)
        elif kind is FailureKind.MIGRATED:
            log.info("token %s: chat %s was migrated to %s; resending there", self.settings.name,
                     row.chat_id, failure.migrate_to_chat_id)
            self._write(ReleaseMessage(row.id, 0.0, failure.description, count_retry=False,
                                       new_chat_id=failure.migrate_to_chat_id, keep_place=True))
        elif kind is FailureKind.BAD_REQUEST:
            self._fail(row, failure.description)
        elif kind in TRANSIENT_KINDS:
            self._transient(row, failure, result.latency, now)
        else:
            raise AssertionError(f"unclassified failure {kind}")

    def _rate_limited_by_telegram(self, row: ClaimedMessage, failure: Failure, now: float) -> None:
        retry_after = failure.retry_after or 1
        until = now + retry_after
        if until > self._cool_until:
            log.info("token %s: 429, no request for %d s; its messages go to other tokens",
                     self.settings.name, retry_after)
        self._cool_until = max(self._cool_until, until)
        self._chat_limits.block(row.chat_id, until)
        self._health.rate_limited(now)
        self._rate_limited += 1
        self._wiring.metrics.incr(f"{self._metric}.rate_limited")
        self._reroute(row, failure.description)
        self._reroute_queue()

    def _rejected(self, row: ClaimedMessage, failure: Failure) -> None:
        self._reroute(row, f"token {self.settings.name}: {failure.description}")
        self._last_error = failure.description
        if self._confirming or self._revoked:
            return
        log.warning("token %s: %s; it sends nothing until getMe confirms", self.settings.name,
                    failure.description)
        self._confirming = True
        self._strikes = 0
        self._reroute_queue()
        self._probe()

    def _unreachable(self, row: ClaimedMessage, failure: Failure) -> None:
        candidates = tuple(set(self._wiring.board.in_service(self.settings.pool))
                           | {self.settings.name})
        command = MarkUnreachable(row.id, self.owner, self.settings.name, failure.description,
                                  candidates)
        try:
            outcome = self._wiring.store.call(command)  # rare and local: worth the wait
        except StoreUnavailable as error:
            self._store_write_failed(StoreWriteFailed(command, str(error), 1))
            return
        if outcome == "failed":
            self._count_failure(failure.description)
        elif outcome == "released":
            self._wiring.metrics.incr("tokens.failover")

    def _transient(self, row: ClaimedMessage, failure: Failure, latency: float, now: float) -> None:
        settings = self.settings
        self._errors += 1
        self._last_error = failure.description
        if now >= self._paused_until:
            # Requests that were already on the wire when a pause began fail together; they
            # are one outage, not a longer streak, so they must not stretch the pause.
            self._consecutive_errors += 1
        self._health.record(False, latency if failure.kind is FailureKind.SERVER_ERROR else None, now)
        metrics = self._wiring.metrics
        metrics.incr(f"{self._metric}.errors")
        attempts = row.retry_count + 1
        if failure.in_doubt:
            self._in_doubt += 1
            metrics.incr("messages.in_doubt")
            if settings.in_doubt_policy == IN_DOUBT_FAIL:
                self._fail(row, f"in doubt, not resent (policy {IN_DOUBT_FAIL!r}): "
                                f"{failure.description}")
                return
        if attempts >= settings.max_attempts:
            self._fail(row, f"gave up after {attempts} attempts: last error {failure.description}")
        else:
            delay = backoff(attempts, settings.backoff_base, settings.backoff_cap)
            self._write(ReleaseMessage(row.id, delay, failure.description, count_retry=True,
                                       in_doubt=failure.in_doubt))
            metrics.incr("messages.retried")
        if self._consecutive_errors >= settings.error_streak:
            pause = backoff(self._consecutive_errors - settings.error_streak + 1, 0.5,
                            PAUSE_CAP_SECONDS)
            if now + pause > self._paused_until:
                log.warning("token %s: %d errors in a row (last: %s); pausing %.1f s",
                            settings.name, self._consecutive_errors, failure.description, pause)
            self._paused_until = max(self._paused_until, now + pause)
            self._reroute_queue()

    def _checked(self, checked: TokenChecked) -> None:
        name, settings = self.settings.name, self.settings
        if checked.valid:
            if self._revoked or self._confirming:
                log.warning("token %s: getMe answers again (@%s); back in service", name,
                            checked.bot_username)
            self._revoked = self._confirming = False
            self._strikes = 0
            return
        if checked.valid is False:
            self._strikes += 1
            if self._strikes >= GETME_STRIKES_TO_REVOKE and not self._revoked:
                self._revoked, self._confirming = True, False
                self._last_error = checked.error
                self._wiring.alert("token_revoked",
                                   f"token {name} (pool {settings.pool}) is revoked: getMe answered "
                                   f"{checked.error!r} {self._strikes} times; its messages go to "
                                   "the other tokens of the pool")
        delay = settings.revoked_probe_seconds if self._revoked else settings.getme_retry_seconds
        self._wiring.alarm.tell_after(delay, self.actor_ref, CheckToken())

    def _store_write_failed(self, failed: StoreWriteFailed) -> None:
        if failed.attempt >= MAX_STORE_RETRIES:
            raise TokenActorCrashed(f"the store refused a write {failed.attempt} times: "
                                    f"{failed.description}")
        log.warning("token %s: a store write failed (%s); retrying in %g s", self.settings.name,
                    failed.description, STORE_RETRY_SECONDS)
        store, results = self._wiring.store, self._results
        command = failed.command
        assert isinstance(command, StoreCommand) and results is not None
        self._wiring.alarm.after(STORE_RETRY_SECONDS, lambda: _submit_write(
            store, results, dataclasses.replace(command, reply=Reply()), failed.attempt + 1))

    # --- sending ----------------------------------------------------------------------------

    def _blocked(self, now: float) -> bool:
        return (self._draining or self._revoked or self._confirming
                or now < max(self._cool_until, self._paused_until))

    def _pump(self) -> None:
        """Hand queued rows to free workers as far as the rate limits allow right now."""
        now = time.monotonic()
        if now - self._last_prune > IDLE_PRUNE_SECONDS:
            self._chat_limits.forget_idle(now)
            self._last_prune = now
        if self._blocked(now):
            resume = max(self._cool_until, self._paused_until)
            if resume > now:
                self._wake(resume)  # to show the new state and ask for work again
            return
        assert self._workers is not None
        going: list[ClaimedMessage] = []
        self._rate_capped = False
        while self._queue and len(self._in_flight) < self.settings.workers:
            bot_wait = self._bot_limit.wait(now)
            if bot_wait > 0:
                self._rate_capped = True
                self._wake(now + bot_wait)
                break
            row, chat_wait = self._next_sendable(now)
            if row is None:
                self._wake(now + chat_wait)
                break
            self._bot_limit.consume(now)
            self._in_flight[row.id] = row
            going.append(row)
        if going:
            assert self._results is not None
            _mark_and_send(self._results, self._wiring.store, self.settings, self.owner, going,
                           self._workers)
        if not self._asked_for_work and self._held() * 2 <= self.settings.window:
            self._asked_for_work = True
            self._wiring.wake_balancer(TokenHasCapacity(self.settings.name))

    def _next_sendable(self, now: float) -> tuple[ClaimedMessage | None, float]:
        """The oldest queued row whose chat may receive now, else the shortest chat wait."""
        shortest = math.inf
        for index, row in enumerate(self._queue):
            wait = self._chat_limits.wait(row.chat_id, now)
            if wait <= 0:
                del self._queue[index]
                return row, 0.0
            shortest = min(shortest, wait)
        return None, shortest

    def _wake(self, at: float) -> None:
        if self._wake_at is None or at < self._wake_at:
            self._wake_at = at
            self._wiring.alarm.at(at, functools.partial(tell_if_alive, self.actor_ref, Wake()))

    def _probe(self) -> None:
        """getMe, but never while a 429's retry_after runs: that is a call to the token too."""
        assert self._workers is not None
        wait = self._cool_until - time.monotonic()
        if wait > 0:
            self._wiring.alarm.tell_after(wait, self.actor_ref, CheckToken())
        elif not self._draining:
            assert self._results is not None
            self._workers.submit(_check_job(self._results, self.settings))

    # --- settling rows ----------------------------------------------------------------------

    def _settle_confirmations(self) -> None:
        if self._confirmations:
            confirmations, self._confirmations = tuple(self._confirmations), []
            self._write(ConfirmMany(confirmations, self.settings.name))

    def _write(self, command: StoreCommand) -> None:
        assert self._results is not None
        _submit_write(self._wiring.store, self._results, command)

    def _reroute(self, row: ClaimedMessage, error: str | None) -> None:
        """Back to pending at once, not counted as a retry: another token takes it."""
        self._write(ReleaseMessage(row.id, 0.0, error, count_retry=False, keep_place=True))
        self._wiring.metrics.incr("tokens.failover")

    def _reroute_queue(self) -> None:
        while self._queue:
            self._reroute(self._queue.popleft(), None)

    def _fail(self, row: ClaimedMessage, reason: str) -> None:
        self._write(FailMessage(row.id, reason, self.settings.name))
        self._count_failure(reason)

    def _count_failure(self, reason: str) -> None:
        self._failed += 1
        self._last_error = reason
        self._wiring.metrics.incr("messages.failed")

    # --- what the others see ----------------------------------------------------------------

    def _held(self) -> int:
        return len(self._queue) + len(self._in_flight)

    def _state(self, now: float) -> str:
        if self._revoked:
            return REVOKED
        if now < self._cool_until:
            return RATE_LIMITED
        if self._confirming or now < self._paused_until or self._health.success_rate(now) < 0.5:
            return FAILING
        return HEALTHY

    def _publish(self) -> None:
        now = time.monotonic()
        settings = self.settings
        cooling = self._cool_until > now
        latency = self._health.latency
        self._wiring.board.publish(TokenView(
            name=settings.name, pool=settings.pool, owner=self.owner, weight=settings.weight,
            window=settings.window, ref=self.actor_ref, state=self._state(now),
            health=0.0 if self._revoked else self._health.score(now),
            accepting=not (self._draining or self._revoked or self._confirming),
            usable_at=max(self._cool_until, self._paused_until),
            rate_limited_until=time.time() + (self._cool_until - now) if cooling else None,
            held=self._held(), rate_capped=self._rate_capped, in_flight=len(self._in_flight),
            received=self._received,
            sent=self._sent, failed=self._failed, rate_limited=self._rate_limited,
            errors=self._errors, in_doubt=self._in_doubt,
            latency_ms=None if latency is None else round(latency * 1000, 1),
            last_error=self._last_error))


def token_settings_from_config(name: str, pool: str, secret: str, weight: float,
                               max_per_second: float, telegram: Any, **overrides: Any
                               ) -> TokenSettings:
    """Settings for one configured token (``telegram`` is the ``[telegram]`` section)."""
    return TokenSettings(
        name=name, pool=pool, secret=secret, weight=weight, max_per_second=max_per_second,
        api_base_url=telegram.api_base_url, request_timeout=telegram.request_timeout_seconds,
        per_chat_per_second=telegram.per_chat_per_second,
        per_group_per_minute=telegram.per_group_per_minute, **overrides)


__all__ = [
    "IN_DOUBT_FAIL",
    "IN_DOUBT_RESEND",
    "Health",
    "TokenActor",
    "TokenActorCrashed",
    "TokenBoard",
    "TokenSettings",
    "TokenView",
    "TokenWiring",
    "check_token",
    "classify_error",
    "classify_response",
    "send_message",
    "token_settings_from_config",
]
