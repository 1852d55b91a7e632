"""StatsD metrics (the ``statsd`` package) behind the small :class:`actors.observe.Metrics` protocol.

Names are the contract's (CONTRACT.md); only token *names* ever appear in them. Sending is
one UDP datagram per call, which is thread-safe and never blocks on the daemon.
"""

from __future__ import annotations

from actors.observe import Metrics, NullMetrics
from supervision.config import StatsdConfig


class StatsdMetrics:
    def __init__(self, config: StatsdConfig) -> None:
        import statsd  # imported here so a config without [statsd] never opens a socket

        self._client = statsd.StatsClient(config.host, config.port, prefix=config.prefix)

    def incr(self, name: str, count: int = 1) -> None:
        self._client.incr(name, count)

    def timing(self, name: str, milliseconds: float) -> None:
        self._client.timing(name, milliseconds)

    def gauge(self, name: str, value: float) -> None:
        self._client.gauge(name, value)


def metrics_for(config: StatsdConfig | None) -> Metrics:
    return NullMetrics() if config is None else StatsdMetrics(config)
