"""What actors need to be observable: a metrics sink and an alert sink, injected.

Actors depend only on these small protocols; ``supervision.metrics`` provides the StatsD
implementation. Both are called from actor threads, so implementations must be thread-safe.
"""

from __future__ import annotations

import logging
from typing import Protocol


class Metrics(Protocol):
    def incr(self, name: str, count: int = 1) -> None: ...
    def timing(self, name: str, milliseconds: float) -> None: ...
    def gauge(self, name: str, value: float) -> None: ...


class AlertSink(Protocol):
    def __call__(self, kind: str, text: str) -> None: ...


class NullMetrics:
    """Metrics that go nowhere: the default when ``[statsd]`` is absent."""

    def incr(self, name: str, count: int = 1) -> None:
        pass

    def timing(self, name: str, milliseconds: float) -> None:
        pass

    def gauge(self, name: str, value: float) -> None:
        pass


_alert_log = logging.getLogger("tgrelay.alerts")


def log_alert(kind: str, text: str) -> None:
    """The minimal alert sink: one clear ERROR line."""
    _alert_log.error("ALERT %s: %s", kind, text)
