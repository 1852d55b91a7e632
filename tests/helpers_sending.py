"""A relay with its sending side, against the real Bot API simulator, for the sending tests.

Real parts only: a SQLite file in a temporary directory, the simulator on a loopback port,
``requests`` over real sockets. Settings are shortened (restart backoff, retry backoff, tick)
so that failures play out in a second instead of a minute.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import apsw

from actors.errors import TgrelayError
from simulator import BotApiSimulator, Limits, Rate, SimBot, make_bots
from supervision.config import Config, parse_config
from supervision.relay import RelaySystem
from supervision.supervisor import SendingSystem, SupervisionSettings, start_sending

UNLIMITED = Limits(per_bot=Rate(100_000, 1.0), per_private_chat=Rate(100_000, 1.0),
                   per_group=Rate(100_000, 1.0))
FAST = SupervisionSettings(restart_backoff_base=0.02, restart_backoff_cap=0.2,
                           store_check_seconds=0.1, workers_per_token=4, backoff_base=0.02,
                           tick_seconds=0.03)
NAMES = ("alpha", "bravo", "charlie", "delta", "echo")


class RecordingMetrics:
    """A thread-safe Metrics sink that remembers everything."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counters: Counter[str] = Counter()
        self.gauges: dict[str, float] = {}
        self.timings: defaultdict[str, list[float]] = defaultdict(list)

    def incr(self, name: str, count: int = 1) -> None:
        with self._lock:
            self.counters[name] += count

    def timing(self, name: str, milliseconds: float) -> None:
        with self._lock:
            self.timings[name].append(milliseconds)

    def gauge(self, name: str, value: float) -> None:
        with self._lock:
            self.gauges[name] = value

    def count(self, name: str) -> int:
        with self._lock:
            return self.counters[name]


@dataclass
class Harness:
    sim: BotApiSimulator
    relay: RelaySystem
    metrics: RecordingMetrics
    bots: dict[str, SimBot]
    db_path: Path
    alerts: list[tuple[str, str]] = field(default_factory=list)

    @property
    def sending(self) -> SendingSystem:
        assert isinstance(self.relay.sending, SendingSystem)
        return self.relay.sending

    def name_of(self, bot_id: int) -> str:
        return next(name for name, bot in self.bots.items() if bot.id == bot_id)

    def send(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        ids: list[int] = []
        for start in range(0, len(messages), 1000):
            for outcome in self.relay.send_many(messages[start:start + 1000]):
                if isinstance(outcome, TgrelayError):
                    raise outcome
                ids.append(outcome.id)
        return ids

    def send_to(self, count: int, chat: Callable[[int], int | str] = lambda i: 1000 + i,
                prefix: str = "message") -> list[int]:
        return self.send([{"chat_id": chat(i), "text": f"{prefix} {i}"} for i in range(count)])

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = self.relay.store.statistics()["counts"]
        return counts

    def wait_until(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:g} s waiting for {what}; "
                                     f"counts {self.counts()}")
            time.sleep(0.02)

    def wait_settled(self, timeout: float = 20.0) -> dict[str, int]:
        """Until every message is confirmed or failed; the final counts."""
        def settled() -> bool:
            counts = self.counts()  # one snapshot: a row may move from sent back to pending
            return counts["pending"] + counts["sent"] == 0

        self.wait_until(settled, timeout, "every message to be confirmed or failed")
        return self.counts()

    def rows(self) -> list[dict[str, Any]]:
        """Every row of message_store, read from the SQLite file itself."""
        db = apsw.Connection(str(self.db_path), flags=apsw.SQLITE_OPEN_READONLY)
        try:
            cursor = db.execute("SELECT * FROM message_store ORDER BY id")
            names = [d[0] for d in cursor.getdescription()]
            return [dict(zip(names, row, strict=True)) for row in cursor]
        finally:
            db.close()

    def duplicate_copies(self) -> int:
        return sum(d.count - 1 for d in self.sim.record.duplicates())

    def in_doubt(self) -> int:
        return sum(row["in_doubt_count"] for row in self.rows())

    def restart(self, drain_seconds: float = 1.0, settings: SupervisionSettings = FAST) -> None:
        """Stop this relay and start another on the same database (and simulator)."""
        self.relay.stop(drain_seconds=drain_seconds)
        self.relay = start_relay(self.relay.config, self.metrics, self.alerts, settings)


def config_text(directory: Path, url: str, tokens: Sequence[tuple[str, SimBot, float]],
                max_per_second: float, telegram: str) -> str:
    entries = "".join(
        f'[[pools.default.tokens]]\nname = "{name}"\ntoken = "{bot.token}"\nweight = {weight}\n'
        f"max_per_second = {max_per_second}\n" for name, bot, weight in tokens)
    return (f'[store]\npath = "{directory / "relay.db"}"\narchive_path = ""\n'
            f'synchronous = "normal"\n\n[telegram]\napi_base_url = "{url}"\n{telegram}\n\n'
            f"[pools.default]\n{entries}")


UNLIMITED_TELEGRAM = "per_chat_per_second = 100000\nper_group_per_minute = 1000000"


@contextmanager
def running_relay(directory: Path, weights: Sequence[float] = (1, 1), *,
                  limits: Limits | None = UNLIMITED, max_per_second: float = 10_000,
                  telegram: str = UNLIMITED_TELEGRAM,
                  settings: SupervisionSettings = FAST, **simulator: Any) -> Iterator[Harness]:
    """The simulator with one bot per weight, and a relay sending through all of them.

    ``limits=None`` means Telegram's own limits in the simulator.
    """
    bots = make_bots(len(weights))
    names = NAMES[:len(weights)]
    with BotApiSimulator(bots=bots, limits=limits, seed=11, **simulator) as sim:
        text = config_text(directory, sim.url, list(zip(names, bots, weights, strict=True)),
                           max_per_second, telegram)
        alerts: list[tuple[str, str]] = []
        metrics = RecordingMetrics()
        relay = start_relay(parse_config(text, environ={}), metrics, alerts, settings)
        harness = Harness(sim, relay, metrics, dict(zip(names, bots, strict=True)),
                          directory / "relay.db", alerts)
        try:
            yield harness
        finally:
            harness.relay.stop(drain_seconds=1.0)


def start_relay(config: Config, metrics: RecordingMetrics, alerts: list[tuple[str, str]],
                settings: SupervisionSettings) -> RelaySystem:
    relay = RelaySystem.start(config, send=False, metrics=metrics,
                              alert=lambda kind, text: alerts.append((kind, text)))
    relay.sending = start_sending(relay, settings)
    return relay
