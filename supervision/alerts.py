"""Alerts: one router for everything the system raises, and the watch that raises what no
single actor can see (delivery rate, backlog age) and notices when a condition clears.

Every alert that is announced goes, once:

* to the log, as one ERROR line ``ALERT <kind> [<subject>]: <text>``;
* to StatsD, as the counter ``alerts.<kind>``;
* when ``[alerts]`` is configured, to the alert chat as a Telegram message through the relay.

**De-duplication and rate limits.** A *condition* is (kind, subject); the subject is the token's
name for ``token_*`` alerts and empty otherwise. The first alert of a condition is announced;
repeats within ``repeat_minutes`` are counted, not announced, and the count rides along with the
next announcement (a repeat after the window, or the reminder :meth:`AlertRouter.remind_due`
sends once the window has passed). When the condition clears, the recovery is announced once.

**What clears a condition** (seen by :class:`Watch` on each tick): ``delivery_rate_low`` when
the confirmed share over the window is back at the threshold (or nothing failed in it);
``backlog_old`` when the oldest pending message is younger than the threshold;
``persistence`` when a message is accepted after the last failure; ``database_corruption``
when an integrity check passes after the alert; ``token_revoked`` and ``token_quarantined``
when the token's state says so. ``supervisor_gave_up`` clears only with a restart.

**No recursion, no raising.** :meth:`AlertRouter.__call__` never sends from the caller's
thread: the store raises alerts on its own thread, and ``relay.send`` waits for that thread.
A delivery thread hands each message to ``relay.send``; when the relay cannot take it (the
store is failing), has no sending side, or the supervisor gave up on sending, the message goes
straight to the Bot API with the alert pool's tokens (``actors.token.send_message``: the
secret stays inside the request URL). The store's own alert about that failed write is a
repeat of an active condition: counted, not announced, so nothing loops. A message that cannot
be delivered at all is logged, never raised.

Threading: the router is called from any thread (a lock guards the conditions); its delivery
thread is a daemon. :class:`Watch` runs on the relay's scheduler thread.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import requests

from actors.errors import TgrelayError
from actors.messages import ClaimedMessage, Receipt
from actors.observe import AlertSink, Metrics
from actors.sending_messages import Failure
from supervision.config import AlertsConfig, Config
from supervision.metrics import Window, metric_name
from supervision.redact import redact

log = logging.getLogger("tgrelay.alerts")

DATABASE_CORRUPTION = "database_corruption"
PERSISTENCE = "persistence"
TOKEN_REVOKED = "token_revoked"  # noqa: S105 -- an alert kind, not a secret
TOKEN_QUARANTINED = "token_quarantined"  # noqa: S105 -- an alert kind
SUPERVISOR_GAVE_UP = "supervisor_gave_up"
DELIVERY_RATE_LOW = "delivery_rate_low"
BACKLOG_OLD = "backlog_old"

MIN_FINISHED_FOR_RATE = 20  # fewer finished messages than this say nothing about a rate
MAX_TELEGRAM_TEXT = 4000
DELIVERY_STOP_SECONDS = 5.0
_TOKEN_SUBJECT = re.compile(r"\btoken ([A-Za-z0-9_-]{1,64})\b")


@dataclass(frozen=True)
class MonitorSettings:
    """Thresholds (from ``[alerts]``; these defaults otherwise) and how often the watch runs."""

    check_seconds: float = 10.0
    delivery_rate_threshold: float = 0.95
    delivery_rate_window_seconds: float = 300.0
    backlog_age_seconds: float = 600.0
    repeat_seconds: float = 900.0
    min_finished_for_rate: int = MIN_FINISHED_FOR_RATE

    @classmethod
    def from_config(cls, alerts: AlertsConfig | None, **overrides: Any) -> MonitorSettings:
        if alerts is None:
            return cls(**overrides)
        return cls(**{
            "delivery_rate_threshold": alerts.delivery_rate_threshold,
            "delivery_rate_window_seconds": alerts.delivery_rate_window_seconds,
            "backlog_age_seconds": alerts.backlog_age_seconds,
            "repeat_seconds": alerts.repeat_minutes * 60,
            **overrides})


@dataclass
class Condition:
    """One (kind, subject) the router has heard of; kept after it clears, for the rate limit."""

    kind: str
    subject: str
    since: float                   # wall clock: first alert of the current episode
    raised_at: float               # monotonic: the latest alert
    text: str                      # the latest alert's text
    active: bool = True
    announced: bool = False        # the current episode has been announced
    announced_at: float = -math.inf  # monotonic
    announced_wall: float = 0.0    # wall clock of the last announcement
    suppressed: int = 0            # repeats not announced since the last announcement
    reminder_due: bool = False     # something happened since the last announcement

    def as_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "subject": self.subject, "since": self.since,
                "text": self.text, "suppressed": self.suppressed}


class AlertRelay(Protocol):
    """What the router needs of the relay (:class:`~supervision.relay.RelaySystem`)."""

    sending: Any

    def send(self, chat_id: int | str, text: str, pool: str | None = None, *,
             dedup_key: str | None = None) -> Receipt: ...


class AlertNotDelivered(TgrelayError):
    """No token of the alert pool could deliver a message straight to the alert chat."""


@dataclass(frozen=True)
class _Outgoing:
    text: str
    key: str
    kind: str


class AlertRouter:
    """The relay's :class:`~actors.observe.AlertSink`; see the module docstring.

    ``also`` is an extra destination that receives every announced alert (kind, text).
    """

    def __init__(self, config: Config, metrics: Metrics, repeat_seconds: float, *,
                 also: AlertSink | None = None, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self._metrics = metrics
        self._repeat = repeat_seconds
        self._also = also
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._conditions: dict[tuple[str, str], Condition] = {}
        self._host = socket.gethostname()
        self._relay: AlertRelay | None = None
        self._direct_only = False
        self._outbox: queue.SimpleQueue[_Outgoing | None] = queue.SimpleQueue()
        self._delivery: threading.Thread | None = None
        self._closed = False
        self.delivered = 0
        self.undelivered = 0

    # --- raising (any thread) ---------------------------------------------------------------

    def __call__(self, kind: str, text: str) -> None:
        """An alert happened: announce it, or count it if its condition was announced lately."""
        self._raise(kind, _subject_of(kind, text), redact(text), event=True)

    def holds(self, kind: str, subject: str, text: str) -> None:
        """A watched condition holds now (it is not a new event when it is already active)."""
        self._raise(kind, subject, redact(text), event=False)

    def resolve(self, kind: str, subject: str, text: str) -> bool:
        """The condition cleared: announce the recovery once. ``True`` if it was announced."""
        with self._lock:
            condition = self._conditions.get((kind, subject))
            if condition is None or not condition.active:
                return False
            condition.active = False
            condition.reminder_due = False
            if not condition.announced:  # a repeat inside the window came and went: no news
                return False
        text = redact(text)
        log.warning("RECOVERED %s%s: %s", kind, _bracketed(subject), text)
        self._send(f"✅ tgrelay on {self._host} recovered: {kind}{_bracketed(subject)}\n{text}",
                   kind)
        return True

    def remind_due(self) -> None:
        """Announce active conditions that had repeats and whose quiet window has passed."""
        now = self._clock()
        with self._lock:
            due = [c for c in self._conditions.values()
                   if c.active and c.reminder_due and now - c.announced_at >= self._repeat]
        for condition in due:
            self._raise(condition.kind, condition.subject, condition.text, event=False)

    def _raise(self, kind: str, subject: str, text: str, *, event: bool) -> None:
        now, wall = self._clock(), self._wall_clock()
        with self._lock:
            condition = self._conditions.get((kind, subject))
            new_episode = condition is None or not condition.active
            if condition is None:
                condition = Condition(kind, subject, wall, now, text)
                self._conditions[(kind, subject)] = condition
            elif not condition.active:
                condition.active, condition.announced, condition.since = True, False, wall
            condition.raised_at, condition.text = now, text
            if now - condition.announced_at < self._repeat:
                if event or new_episode:
                    condition.suppressed += 1
                condition.reminder_due = True
                log.debug("alert %s%s repeated, not announced: %s", kind, _bracketed(subject), text)
                return
            suppressed, still, last_wall = condition.suppressed, condition.announced, \
                condition.announced_wall
            condition.announced, condition.announced_at, condition.announced_wall = True, now, wall
            condition.suppressed, condition.reminder_due = 0, False
        note = ""
        if suppressed:
            note = f" ({suppressed} more like this since {_clock_time(last_wall)})"
        elif still:
            note = " (still)"
        log.error("ALERT %s%s: %s%s", kind, _bracketed(subject), text, note)
        self._metrics.incr(f"alerts.{metric_name(kind)}")
        if kind == SUPERVISOR_GAVE_UP:
            self._direct_only = True  # sending has stopped: the relay would only queue it
        if self._also is not None:
            try:
                self._also(kind, text + note)
            except Exception:  # another destination failing must not stop this one
                log.exception("the extra alert sink failed on a %s alert", kind)
        self._send(f"🚨 tgrelay on {self._host}: {kind}{_bracketed(subject)}\n{text}{note}", kind)

    # --- reading ----------------------------------------------------------------------------

    def active(self, kind: str | None = None) -> list[Condition]:
        """Copies of the active conditions (of ``kind``)."""
        with self._lock:
            return [dataclasses.replace(c) for c in self._conditions.values()
                    if c.active and (kind is None or c.kind == kind)]

    def statistics(self) -> dict[str, Any]:
        return {"active": [c.as_json() for c in self.active()],
                "delivered_to_chat": self.delivered, "not_delivered": self.undelivered,
                "chat": None if self._config.alerts is None else {
                    "chat_id": self._config.alerts.chat_id, "pool": self._config.alerts.pool}}

    # --- delivering to the alert chat (the delivery thread) ---------------------------------

    def attach(self, relay: AlertRelay | None) -> None:
        """Start delivering through ``relay`` (``None``: straight to the Bot API only).
        Alerts raised before this moment (at start-up) are delivered now."""
        self._relay = relay
        if self._config.alerts is not None and self._delivery is None:
            self._delivery = threading.Thread(target=self._deliver_all, name="tgrelay-alerts",
                                              daemon=True)
            self._delivery.start()

    def close(self, timeout: float = DELIVERY_STOP_SECONDS) -> None:
        """Deliver what is queued (for at most ``timeout`` seconds), then stop delivering."""
        if self._closed:
            return
        self._closed = True
        self._outbox.put(None)
        if self._delivery is not None:
            self._delivery.join(timeout)
        left = 0
        while not self._outbox.empty():
            left += self._outbox.get_nowait() is not None
        if left:
            with self._lock:
                self.undelivered += left
            log.error("%d alert messages were not sent to the alert chat: the relay stopped", left)

    def _send(self, text: str, kind: str) -> None:
        if self._config.alerts is None:
            return
        if self._closed:
            with self._lock:
                self.undelivered += 1
            log.error("the relay is stopping: this %s alert is not sent to the alert chat", kind)
            return
        self._outbox.put(_Outgoing(text[:MAX_TELEGRAM_TEXT], f"tgrelay-alert:{uuid.uuid4().hex}",
                                   kind))

    def _deliver_all(self) -> None:
        while True:
            message = self._outbox.get()
            if message is None:
                return
            try:
                self._deliver(message)
                self.delivered += 1
            except Exception as error:  # noqa: BLE001 -- an undeliverable alert is logged, never raised
                with self._lock:
                    self.undelivered += 1
                log.error("the %s alert could not be sent to the alert chat: %s", message.kind,
                          redact(f"{type(error).__name__}: {error}"))

    def _deliver(self, message: _Outgoing) -> None:
        alerts = self._config.alerts
        assert alerts is not None
        relay = self._relay
        if relay is not None and relay.sending is not None and not self._direct_only:
            try:
                relay.send(alerts.chat_id, message.text, alerts.pool, dedup_key=message.key)
                return
            except TgrelayError as error:
                log.warning("the relay cannot take the %s alert (%s); sending it straight to "
                            "the Bot API", message.kind, error)
        self._send_directly(alerts, message.text)

    def _send_directly(self, alerts: AlertsConfig, text: str) -> None:
        """Try each token of the alert pool in turn until one delivers."""
        # Imported here: actors.token imports supervision (for redaction), which imports this.
        from actors.token import send_message, token_settings_from_config

        pool = self._config.pools[alerts.pool]
        problems = []
        with requests.Session() as session:
            for token in pool.tokens:
                settings = token_settings_from_config(
                    token.name, pool.name, token.token, token.weight, token.max_per_second,
                    self._config.telegram)
                row = ClaimedMessage(0, alerts.chat_id, text, pool.name, None, False, 0,
                                     owner="alerts", token=token.name)
                outcome = send_message(session, settings, row)
                if not isinstance(outcome, Failure):
                    return
                problems.append(f"{token.name}: {outcome.description}")
        raise AlertNotDelivered("; ".join(problems) or f"pool {pool.name} has no token")


class Watch:
    """Raises and clears the conditions that need a look at the whole system, on each tick."""

    def __init__(self, router: AlertRouter, settings: MonitorSettings) -> None:
        self._router = router
        self._settings = settings

    def check(self, store_stats: Mapping[str, Any] | None, tokens: Iterable[Mapping[str, Any]],
              window: Window, last_accepted: float) -> None:
        """``window`` spans ``delivery_rate_window_seconds``; ``last_accepted`` is the
        monotonic time the store last committed an accepted message."""
        self._delivery_rate(window)
        if store_stats is not None:
            self._backlog(store_stats)
            self._corruption(store_stats)
        self._persistence(last_accepted)
        self._tokens(tokens)
        self._router.remind_due()

    def _delivery_rate(self, window: Window) -> None:
        threshold = self._settings.delivery_rate_threshold
        rate, span = window.delivery_rate, _duration(self._settings.delivery_rate_window_seconds)
        if rate is not None and rate < threshold:
            if window.finished >= self._settings.min_finished_for_rate:
                self._router.holds(DELIVERY_RATE_LOW, "", (
                    f"only {rate:.1%} of the {window.finished} messages finished in the last "
                    f"{span} were confirmed ({window.failed} failed); the target is "
                    f"{threshold:.1%}"))
            return
        self._router.resolve(DELIVERY_RATE_LOW, "", (
            f"no message failed in the last {span}" if rate is None or not window.failed else
            f"{rate:.1%} of the {window.finished} messages finished in the last {span} "
            f"were confirmed (target {threshold:.1%})"))

    def _backlog(self, store_stats: Mapping[str, Any]) -> None:
        age, limit = store_stats["oldest_pending_age_seconds"], self._settings.backlog_age_seconds
        pending = store_stats["counts"]["pending"]
        if age is not None and age > limit:
            self._router.holds(BACKLOG_OLD, "", (
                f"the oldest of {pending} pending messages has waited {_duration(age)} "
                f"(threshold {_duration(limit)})"))
        else:
            self._router.resolve(BACKLOG_OLD, "", "the backlog is drained" if age is None else
                                 f"the oldest of {pending} pending messages has waited "
                                 f"{_duration(age)}, under {_duration(limit)}")

    def _corruption(self, store_stats: Mapping[str, Any]) -> None:
        check = store_stats.get("last_integrity_check")
        for condition in self._router.active(DATABASE_CORRUPTION):
            if check and check.get("ok") and check.get("at", 0) >= condition.since:
                self._router.resolve(DATABASE_CORRUPTION, condition.subject,
                                     f"the database passes its integrity check again "
                                     f"(last report: {condition.text})")

    def _persistence(self, last_accepted: float) -> None:
        for condition in self._router.active(PERSISTENCE):
            if last_accepted > condition.raised_at:
                self._router.resolve(PERSISTENCE, condition.subject,
                                     "the store commits writes again: a message was accepted "
                                     f"after the last failure ({condition.text})")

    def _tokens(self, tokens: Iterable[Mapping[str, Any]]) -> None:
        by_name = {str(token["name"]): token for token in tokens}
        for condition in self._router.active(TOKEN_REVOKED):
            token = by_name.get(condition.subject)
            if token is not None and token.get("state") != "revoked":
                self._router.resolve(TOKEN_REVOKED, condition.subject,
                                     f"token {condition.subject} answers getMe again "
                                     f"(state {token.get('state')})")
        for condition in self._router.active(TOKEN_QUARANTINED):
            token = by_name.get(condition.subject)
            if token is not None and not token.get("quarantined"):
                self._router.resolve(TOKEN_QUARANTINED, condition.subject,
                                     f"token {condition.subject} is back in service")


def _subject_of(kind: str, text: str) -> str:
    """The token's name for ``token_*`` alerts (their texts start "token <name> ..."), else ""."""
    if kind.startswith("token_"):
        match = _TOKEN_SUBJECT.search(text)
        if match:
            return match.group(1)
    return ""


def _bracketed(subject: str) -> str:
    return f" [{subject}]" if subject else ""


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _clock_time(at: float) -> str:
    return datetime.fromtimestamp(at).strftime("%H:%M:%S")


__all__ = [
    "BACKLOG_OLD",
    "DATABASE_CORRUPTION",
    "DELIVERY_RATE_LOW",
    "PERSISTENCE",
    "SUPERVISOR_GAVE_UP",
    "TOKEN_QUARANTINED",
    "TOKEN_REVOKED",
    "AlertRouter",
    "Condition",
    "MonitorSettings",
    "Watch",
]
