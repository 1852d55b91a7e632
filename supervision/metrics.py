"""StatsD metrics (the ``statsd`` package) behind the small :class:`actors.observe.Metrics` protocol,
the gauges the relay publishes on a schedule, and the recent totals behind delivery rates.

Names are the contract's (CONTRACT.md, "StatsD metrics"); only token *names* ever appear in
them, and every name is made safe for the StatsD line format (no ``:``, ``|``, ``@``, spaces
or non-ASCII characters).

Threading: :class:`StatsdMetrics` is called from every actor thread. A call only adds to an
in-memory buffer under a lock (counters are summed per name, gauges keep their last value,
timer samples are kept one by one so the daemon's percentiles stay true); a daemon thread
flushes the buffer through a ``statsd`` pipeline every :data:`FLUSH_INTERVAL_SECONDS`, or at
once when :data:`FLUSH_AT_SAMPLES` timer samples are waiting. So the hot path never touches a
socket, and a burst of thousands of increments leaves as a handful of datagrams.
"""

from __future__ import annotations

import atexit
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from actors.observe import Metrics, NullMetrics
from supervision.config import StatsdConfig

log = logging.getLogger("tgrelay.metrics")

FLUSH_INTERVAL_SECONDS = 0.1
FLUSH_AT_SAMPLES = 1000
MAX_DATAGRAM_BYTES = 1432  # fits an Ethernet MTU with room for headers: never fragmented
RECENT_HISTORY_SECONDS = 3600.0

_UNSAFE = re.compile(r"[^\x21-\x7e]|[:|@]")


def metric_name(name: str) -> str:
    """``name`` made safe for a StatsD line: ``:``, ``|``, ``@``, whitespace and non-ASCII
    characters become ``_``."""
    return _UNSAFE.sub("_", name)


class StatsdMetrics:
    """Buffered StatsD metrics; see the module docstring for the threading story."""

    def __init__(self, config: StatsdConfig, *, flush_interval: float = FLUSH_INTERVAL_SECONDS,
                 flush_at_samples: int = FLUSH_AT_SAMPLES) -> None:
        import statsd  # imported here so a config without [statsd] never opens a socket

        self._client = statsd.StatsClient(config.host, config.port,
                                          prefix=metric_name(config.prefix) or None,
                                          maxudpsize=MAX_DATAGRAM_BYTES, ipv6=":" in config.host)
        self._flush_interval = flush_interval
        self._flush_at_samples = flush_at_samples
        self._lock = threading.Lock()
        self._counters: dict[str, int] = {}
        self._timings: list[tuple[str, float]] = []
        self._gauges: dict[str, float] = {}
        self._names: dict[str, str] = {}
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._flush_periodically, name="tgrelay-statsd",
                                        daemon=True)
        self._thread.start()
        atexit.register(self.close)

    # --- the Metrics protocol (any thread) --------------------------------------------------

    def incr(self, name: str, count: int = 1) -> None:
        if not count:
            return
        key = self._names.get(name) or self._safe(name)
        with self._lock:
            self._counters[key] = self._counters.get(key, 0) + count

    def timing(self, name: str, milliseconds: float) -> None:
        key = self._names.get(name) or self._safe(name)
        with self._lock:
            self._timings.append((key, milliseconds))
            full = len(self._timings) >= self._flush_at_samples
        if full:
            self._wake.set()

    def gauge(self, name: str, value: float) -> None:
        key = self._names.get(name) or self._safe(name)
        with self._lock:
            self._gauges[key] = value

    # --- flushing ---------------------------------------------------------------------------

    def flush(self) -> None:
        """Send everything buffered now, packed into as few datagrams as fit."""
        with self._lock:
            counters, self._counters = self._counters, {}
            timings, self._timings = self._timings, []
            gauges, self._gauges = self._gauges, {}
        if not (counters or timings or gauges):
            return
        pipe = self._client.pipeline()
        for name, count in counters.items():
            pipe.incr(name, count)
        for name, milliseconds in timings:
            pipe.timing(name, milliseconds)
        for name, value in gauges.items():
            pipe.gauge(name, value)
        pipe.send()

    def close(self) -> None:
        """Flush what is buffered and stop the flushing thread; idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        self._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self.flush()
        self._client.close()

    def _flush_periodically(self) -> None:
        while not self._closed:
            self._wake.wait(self._flush_interval)
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # a metrics bug must not end metrics for good: say so and go on
                log.exception("flushing StatsD metrics failed")

    def _safe(self, name: str) -> str:
        key = metric_name(name)
        self._names[name] = key  # bounded: names come from code and configured token names
        return key


def metrics_for(config: StatsdConfig | None) -> Metrics:
    return NullMetrics() if config is None else StatsdMetrics(config)


def close_metrics(metrics: Metrics) -> None:
    """Flush and close ``metrics`` if it holds resources (a :class:`StatsdMetrics`)."""
    if isinstance(metrics, StatsdMetrics):
        metrics.close()


# --- recent totals: delivery rate and throughput over the last minute and hour ---------------


@dataclass(frozen=True)
class Totals:
    """Cumulative counts at one instant (``at`` is monotonic)."""

    at: float
    confirmed: int = 0
    failed: int = 0
    sent_by_token: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Window:
    """What happened between two :class:`Totals`."""

    seconds: float
    confirmed: int
    failed: int
    sent_by_token: Mapping[str, int]

    @property
    def finished(self) -> int:
        return self.confirmed + self.failed

    @property
    def delivery_rate(self) -> float | None:
        """Confirmed share of the messages finished in the window; ``None`` if none finished."""
        return None if self.finished == 0 else self.confirmed / self.finished

    def per_second(self, count: int) -> float:
        return count / self.seconds if self.seconds > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        return {"seconds": round(self.seconds, 1), "confirmed": self.confirmed,
                "failed": self.failed, "delivery_rate": self.delivery_rate,
                "confirmed_per_second": round(self.per_second(self.confirmed), 2)}


def totals_of(tokens: Iterable[Mapping[str, Any]], at: float) -> Totals:
    """Totals from the sending side's token entries (their cumulative ``sent`` and ``failed``)."""
    sent = {str(token["name"]): int(token.get("sent") or 0) for token in tokens}
    failed = sum(int(token.get("failed") or 0) for token in tokens)
    return Totals(at, sum(sent.values()), failed, sent)


class RecentTotals:
    """Samples of cumulative totals for the last hour; differences give recent rates.

    Sampling the token counters the sending side keeps anyway costs the hot path nothing.
    Thread-safe: sampled by the scheduler, read by ``stats()`` on HTTP threads.
    """

    def __init__(self, keep_seconds: float = RECENT_HISTORY_SECONDS,
                 clock: Any = time.monotonic) -> None:
        self._keep = keep_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._samples: deque[Totals] = deque([Totals(clock())])

    def sample(self, tokens: Iterable[Mapping[str, Any]]) -> Totals:
        totals = totals_of(tokens, self._clock())
        with self._lock:
            self._samples.append(totals)
            # keep one sample older than the horizon, as the base of the longest window
            while len(self._samples) > 2 and self._samples[1].at <= totals.at - self._keep:
                self._samples.popleft()
        return totals

    def window(self, seconds: float, now: Totals) -> Window:
        """From the latest sample at least ``seconds`` before ``now`` (or the oldest) to ``now``."""
        with self._lock:
            base = self._samples[0]
            for sample in self._samples:
                if sample.at > now.at - seconds:
                    break
                base = sample
        sent = {name: count - base.sent_by_token.get(name, 0)
                for name, count in now.sent_by_token.items()}
        return Window(now.at - base.at, now.confirmed - base.confirmed, now.failed - base.failed,
                      sent)


# --- gauges on a schedule ---------------------------------------------------------------------


def publish_gauges(metrics: Metrics, store_stats: Mapping[str, Any] | None,
                   tokens: Iterable[Mapping[str, Any]], last_minute: Window | None,
                   active_alerts: int) -> None:
    """The scheduled gauges: queue depth and age, database size, token health, delivery rate."""
    if store_stats is not None:
        metrics.gauge("queue.pending", store_stats["counts"]["pending"])
        metrics.gauge("queue.in_flight", store_stats["in_flight"])
        metrics.gauge("queue.oldest_pending_seconds",
                      round(store_stats["oldest_pending_age_seconds"] or 0.0, 3))
        metrics.gauge("store.db_bytes", store_stats["db_bytes"])
    healthy = 0
    for token in tokens:
        metrics.gauge(f"tokens.{token['name']}.health", float(token.get("health", 0.0)))
        if token.get("state") == "healthy" and not token.get("quarantined"):
            healthy += 1
    metrics.gauge("tokens.healthy", healthy)
    if last_minute is not None and last_minute.delivery_rate is not None:
        metrics.gauge("messages.delivery_rate", round(last_minute.delivery_rate, 4))
    metrics.gauge("alerts.active", active_alerts)


__all__ = [
    "RecentTotals",
    "StatsdMetrics",
    "Totals",
    "Window",
    "close_metrics",
    "metric_name",
    "metrics_for",
    "publish_gauges",
    "totals_of",
]
