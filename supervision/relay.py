"""The relay system: starts the actors, accepts messages, and stops without losing any.

``RelaySystem`` is the embedded API (CONTRACT.md, "Embedded use"); ``tgrelay run`` wraps the
same object in an HTTP server. All its methods are thread-safe: they only talk to actors.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Protocol

import pykka

from actors.dedup import AdmitMessages, DeduplicatorActor
from actors.errors import InvalidMessage, StoreUnavailable, TgrelayError
from actors.messages import (
    FINAL_STATUSES,
    CheckIntegrity,
    Housekeep,
    OutgoingMessage,
    Ping,
    Receipt,
    StoredMessage,
)
from actors.observe import AlertSink, Metrics
from actors.store import HOUSEKEEPING_PAGE, StoreClient, StoreSettings, start_store
from supervision.alerts import AlertRouter, MonitorSettings, Watch
from supervision.config import Config, load_config
from supervision.intake import build_message, message_from_json
from supervision.metrics import RecentTotals, close_metrics, metrics_for, publish_gauges, totals_of
from supervision.scheduler import Scheduler

log = logging.getLogger("tgrelay.relay")

HOUSEKEEPING_INTERVAL_SECONDS = 60.0
MAX_BATCH = 1000
MINUTE, HOUR = 60.0, 3600.0


class SendingSide(Protocol):
    """What the sending side (balancer, token actors, supervisor) offers the relay."""

    def notify_accepted(self, pools: set[str]) -> None:
        """New pending rows exist in these pools (called on the accepting thread)."""

    def stop(self, drain_seconds: float) -> None:
        """Stop claiming; let in-flight sends finish for ``drain_seconds``; release the rest."""

    def statistics(self) -> dict[str, Any]:
        """A snapshot for ``status`` and ``GET /v1/stats``."""

    def tokens(self) -> list[dict[str, Any]]:
        """``GET /v1/tokens`` entries: name, pool, state, weight, sent, failed, rate_limited_until."""

    def validate_token(self, name: str) -> dict[str, Any]:
        """getMe for one token: name, valid, bot_username, error. ``KeyError`` if unknown."""


class RelaySystem:
    """A running tgrelay: the store, the deduplicator and, when configured, the sending side."""

    def __init__(self, config: Config, metrics: Metrics, alert: AlertRouter, store: StoreClient,
                 dedup: pykka.ActorRef[DeduplicatorActor], monitor: MonitorSettings, *,
                 owns_metrics: bool = False) -> None:
        self.config = config
        self.metrics = metrics
        self.alert = alert
        self.store = store
        self.monitor = monitor
        self._dedup = dedup
        self._pools = frozenset(config.pools)
        self._scheduler = Scheduler(alert)
        self._owns_metrics = owns_metrics
        self._recent = RecentTotals()
        self._watch = Watch(alert, monitor)
        self._last_accepted = -math.inf  # monotonic: the last time the store committed a message
        self._store_unreadable = False
        self.sending: SendingSide | None = None
        self._stopped = False

    @classmethod
    def start(cls, config: Config | str | os.PathLike[str], *, send: bool = True,
              metrics: Metrics | None = None, alert: AlertSink | None = None,
              monitor: MonitorSettings | None = None) -> RelaySystem:
        """Open the store (recovering what a crash left), start the actors, start sending.

        ``send=False`` starts only the accepting side (the store and the deduplicator).
        ``metrics`` replaces the StatsD metrics ``[statsd]`` configures; ``alert`` receives every
        announced alert besides the log, StatsD and the alert chat; ``monitor`` replaces the
        thresholds of ``[alerts]`` and sets how often gauges and watched conditions are checked.
        """
        if not isinstance(config, Config):
            config = load_config(config)
        owns_metrics = metrics is None
        metrics = metrics or metrics_for(config.statsd)
        monitor = monitor or MonitorSettings.from_config(config.alerts)
        router = AlertRouter(config, metrics, monitor.repeat_seconds, also=alert)
        settings = StoreSettings(
            path=config.store.path, synchronous=config.store.synchronous,
            busy_timeout_ms=config.store.busy_timeout_ms,
            retention_days=config.store.retention_days, archive_path=config.store.archive_path,
            dedup_ttl_seconds=config.dedup.ttl_seconds,
            max_db_bytes=config.store.max_db_megabytes * 1024 * 1024)
        try:
            store = start_store(settings, metrics, router)
        except StoreUnavailable:
            router.attach(None)  # what the store said while failing still reaches the alert chat
            router.close()
            if owns_metrics:
                close_metrics(metrics)
            raise
        dedup = DeduplicatorActor.start(config.dedup.window_seconds, config.dedup.ttl_seconds,
                                        store.submit)
        relay = cls(config, metrics, router, store, dedup, monitor, owns_metrics=owns_metrics)
        relay._schedule_jobs()
        atexit.register(relay.stop)
        if send and config.pools:
            from supervision.supervisor import start_sending  # the sending side is optional

            relay.sending = start_sending(relay)
        router.attach(relay)
        return relay

    # --- accepting --------------------------------------------------------------------------

    def send(self, chat_id: int | str, text: str, pool: str | None = None, *,
             dedup_key: str | None = None, parse_mode: str | None = None,
             disable_notification: bool = False) -> Receipt:
        """Accept one message; durable (committed) when this returns.

        Raises :class:`~actors.errors.InvalidMessage` for bad input,
        :class:`~actors.errors.DedupConflict` for a reused key and
        :class:`~actors.errors.StoreUnavailable` when nothing could be committed.
        """
        message = build_message(self._pools, chat_id, text, pool, dedup_key, parse_mode,
                                disable_notification)
        (outcome,) = self.accept([message])
        if isinstance(outcome, TgrelayError):
            raise outcome
        return outcome

    def send_many(self, messages: Iterable[Mapping[str, Any]]) -> list[Receipt | TgrelayError]:
        """Accept a batch (dicts shaped like ``POST /v1/messages`` bodies), in one transaction.

        Returns one entry per message, in order: a :class:`Receipt`, or the error that
        rejected that message (the others are still accepted).
        """
        bodies = list(messages)
        if len(bodies) > MAX_BATCH:
            raise InvalidMessage(f"a batch holds at most {MAX_BATCH} messages, not {len(bodies)}; "
                                 "split it")
        results: list[Receipt | TgrelayError | None] = []
        valid: list[OutgoingMessage] = []
        for body in bodies:
            try:
                valid.append(message_from_json(body, self._pools))
                results.append(None)
            except TgrelayError as error:
                results.append(error)
        accepted = iter(self.accept(valid))
        return [next(accepted) if entry is None else entry for entry in results]

    def accept(self, messages: Sequence[OutgoingMessage]) -> list[Receipt | TgrelayError]:
        """Deduplicate and durably store validated messages; one result per message.

        The deduplicator batches concurrent callers into one store command (see
        ``actors.dedup``); this returns once the store has committed this caller's rows.
        """
        if self._stopped:
            raise StoreUnavailable("the relay is stopped")
        if not messages:
            return []
        command = AdmitMessages(tuple(messages))
        try:
            self._dedup.tell(command)
        except pykka.ActorDeadError:
            raise StoreUnavailable("the deduplicator is not running") from None
        try:
            results: list[Receipt | TgrelayError] = command.reply.result(timeout=self.store.timeout)
        except TimeoutError:
            raise StoreUnavailable(f"no answer from the store within {self.store.timeout:g} s") from None
        new_count = sum(1 for r in results if isinstance(r, Receipt) and not r.duplicate)
        duplicates = sum(1 for r in results if isinstance(r, Receipt) and r.duplicate)
        if new_count:
            self._last_accepted = time.monotonic()
            self.metrics.incr("messages.accepted", new_count)
            if self.sending is not None:
                self.sending.notify_accepted({m.pool for m in messages})
        if duplicates:
            self.metrics.incr("messages.duplicate", duplicates)
        return results

    # --- reading ----------------------------------------------------------------------------

    def get(self, message_id: int) -> StoredMessage:
        return self.store.get(message_id)

    def wait(self, message_id: int, timeout: float = 30.0) -> StoredMessage:
        """Block until the message is confirmed or failed; ``TimeoutError`` otherwise."""
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            message = self.store.get(message_id)
            if message.status in FINAL_STATUSES:
                return message
            if time.monotonic() >= deadline:
                raise TimeoutError(f"message {message_id} is still {message.status} "
                                   f"after {timeout:g} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def stats(self) -> dict[str, Any]:
        """Counts by status, backlog age, delivery rates, tokens, database, active alerts.

        ``delivery_rate`` covers every finished message in the database; ``delivery`` covers
        what this process finished in the last minute and hour.
        """
        stats = self.store.statistics()
        counts = stats["counts"]
        finished = counts["confirmed"] + counts["failed"]
        stats["delivery_rate"] = None if finished == 0 else counts["confirmed"] / finished
        stats["dedup"] = self._dedup.proxy().statistics().get()
        tokens = self.sending.tokens() if self.sending is not None else []
        now = totals_of(tokens, time.monotonic())
        last_minute = self._recent.window(MINUTE, now)
        stats["delivery"] = {"last_minute": last_minute.as_json(),
                             "last_hour": self._recent.window(HOUR, now).as_json()}
        stats["tokens"] = [{**token, "sent_per_second": round(last_minute.per_second(
            last_minute.sent_by_token.get(str(token["name"]), 0)), 2)} for token in tokens]
        stats["alerts"] = self.alert.statistics()
        if self.sending is not None:
            stats["sending"] = self.sending.statistics()
        return stats

    def healthy(self) -> bool:
        try:
            self.store.call(Ping())
        except TgrelayError:
            return False
        return not self._stopped

    # --- lifecycle --------------------------------------------------------------------------

    def _schedule_jobs(self) -> None:
        def housekeep() -> None:
            while True:
                done = self.store.call(Housekeep())
                if done["archived"] < HOUSEKEEPING_PAGE and done["expired"] < HOUSEKEEPING_PAGE:
                    return

        self._scheduler.every(HOUSEKEEPING_INTERVAL_SECONDS, "store.housekeeping", housekeep,
                              first_after=1.0)
        self._scheduler.every(self.config.store.integrity_check_minutes * 60,
                              "store.integrity_check", lambda: self.store.call(CheckIntegrity()))
        self._scheduler.every(self.monitor.check_seconds, "monitor", self._observe)
        self._scheduler.start()

    def _observe(self) -> None:
        """Gauges, recent totals and the watched alert conditions (scheduler thread)."""
        try:
            store_stats: dict[str, Any] | None = self.store.statistics()
            self._store_unreadable = False
        except StoreUnavailable as error:
            if not self._store_unreadable:  # once per outage, not once per tick
                log.warning("no store statistics for the gauges and alerts: %s", error)
            self._store_unreadable = True
            store_stats = None
        tokens = self.sending.tokens() if self.sending is not None else []
        now = self._recent.sample(tokens)
        publish_gauges(self.metrics, store_stats, tokens, self._recent.window(MINUTE, now),
                       len(self.alert.active()))
        self._watch.check(store_stats, tokens,
                          self._recent.window(self.monitor.delivery_rate_window_seconds, now),
                          self._last_accepted)

    def stop(self, drain_seconds: float = 10.0) -> None:
        """Stop sending (in-flight sends get ``drain_seconds``), then the deduplicator and store.

        Whatever was not confirmed stays ``pending`` in the store, to be resumed next start.
        """
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        self._scheduler.stop()
        self.alert.close()  # alerts still queued go to the relay while it can take them
        if self.sending is not None:
            self.sending.stop(drain_seconds)
        self._dedup.stop()
        self.store.actor.stop()
        if self._owns_metrics:
            close_metrics(self.metrics)

    def __enter__(self) -> RelaySystem:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()
