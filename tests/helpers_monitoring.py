"""Helpers for the monitoring tests: a real UDP socket that collects StatsD lines, and configs
for a relay sending through the Bot API simulator with metrics and an alert chat."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from simulator import BotApiSimulator, SimBot
from supervision.config import Config, parse_config

ALERT_CHAT = 777_000
_LINE = re.compile(r"^(?P<name>[^:|@\s]+):(?P<value>[^|]+)\|(?P<type>c|ms|g|s)(?:\|@[0-9.]+)?$")


class StatsdCapture:
    """A real UDP socket on 127.0.0.1; every datagram it receives is split into StatsD lines."""

    def __init__(self) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 0))
        self._socket.settimeout(0.05)
        self.port: int = self._socket.getsockname()[1]
        self._lock = threading.Lock()
        self.datagrams: list[bytes] = []
        self._running = True
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while self._running:
            try:
                data = self._socket.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.datagrams.append(data)

    def close(self) -> None:
        self._running = False
        self._thread.join(timeout=2)
        self._socket.close()

    def lines(self) -> list[str]:
        with self._lock:
            datagrams = list(self.datagrams)
        return [line for data in datagrams for line in data.decode("ascii").split("\n") if line]

    def parsed(self) -> list[tuple[str, float, str]]:
        """(name, value, type) of every line; a line that is not StatsD fails the test."""
        found = []
        for line in self.lines():
            match = _LINE.match(line)
            assert match, f"not a StatsD line: {line!r}"
            found.append((match["name"], float(match["value"]), match["type"]))
        return found

    def counter(self, name: str) -> float:
        return sum(value for found, value, kind in self.parsed() if found == name and kind == "c")

    def timings(self, name: str) -> list[float]:
        return [value for found, value, kind in self.parsed() if found == name and kind == "ms"]

    def gauge(self, name: str) -> float | None:
        values = [value for found, value, kind in self.parsed() if found == name and kind == "g"]
        return values[-1] if values else None

    def names(self) -> set[tuple[str, str]]:
        return {(name, kind) for name, _, kind in self.parsed()}


def wait_until(condition: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or condition}")
        time.sleep(0.02)


def name_of(bot: SimBot) -> str:
    return bot.username.removesuffix("_bot")


def relay_config(directory: Path, sim: BotApiSimulator, pools: dict[str, Iterable[SimBot]], *,
                 statsd_port: int | None = None, alerts: bool = True, store_extra: str = "",
                 alerts_extra: str = "") -> Config:
    """A relay on a fresh SQLite file, sending through ``sim``; ``[alerts]`` to pool ``ops``."""
    tables = []
    for pool, bots in pools.items():
        tables.append(f"[pools.{pool}]")
        tables += [f'[[pools.{pool}.tokens]]\nname = "{name_of(bot)}"\ntoken = "{bot.token}"\n'
                   f"max_per_second = 200" for bot in bots]
    statsd = "" if statsd_port is None else (
        f'[statsd]\nhost = "127.0.0.1"\nport = {statsd_port}\nprefix = "tgrelay"\n')
    alert_table = f'[alerts]\nchat_id = {ALERT_CHAT}\npool = "ops"\n{alerts_extra}\n' if alerts else ""
    text = (f'[store]\npath = "{directory / "relay.db"}"\narchive_path = "{directory / "archive.db"}"\n'
            f'synchronous = "normal"\n{store_extra}\n'
            f'[telegram]\napi_base_url = "{sim.url}"\nrequest_timeout_seconds = 2\n'
            f"{statsd}{alert_table}" + "\n".join(tables) + "\n")
    return parse_config(text, environ={})


def alert_texts(sim: BotApiSimulator) -> list[str]:
    return sim.record.delivered_texts(chat_id=ALERT_CHAT)


# --- the Grafana dashboard and etsy statsd's Graphite naming -------------------------------------

DASHBOARD = Path(__file__).resolve().parent.parent / "conf" / "grafana" / "tgrelay-dashboard.json"
TIMER_STATISTICS = ("mean", "upper", "lower", "count", "count_ps", "sum", "sum_squares", "median",
                    "std", "mean_90", "upper_90", "sum_90", "sum_squares_90", "count_90")
_SERIES_IN_TARGET = re.compile(r"stats(?:_counts)?\.(?:\{[^}]*\}|[\w.*$\-])+")


def etsy_series(name: str, kind: str) -> set[str]:
    """The Graphite series etsy statsd (legacyNamespace, percentThreshold [90]) flushes for one
    StatsD metric: counters as a rate and a count, timers as statistics, gauges as values."""
    if kind == "c":
        return {f"stats.{name}", f"stats_counts.{name}"}
    if kind == "ms":
        return {f"stats.timers.{name}.{statistic}" for statistic in TIMER_STATISTICS}
    if kind == "g":
        return {f"stats.gauges.{name}"}
    return {f"stats.sets.{name}.count"}


def expand_braces(pattern: str) -> list[str]:
    """Graphite's ``{a,b}`` alternatives, each as its own pattern."""
    match = re.search(r"\{([^}]*)\}", pattern)
    if match is None:
        return [pattern]
    return [expanded for choice in match.group(1).split(",")
            for expanded in expand_braces(pattern[:match.start()] + choice + pattern[match.end():])]


def graphite_regex(pattern: str) -> re.Pattern[str]:
    """A Graphite glob (``*`` stays inside one node) as a regular expression."""
    return re.compile(".".join(re.escape(node).replace(r"\*", "[^.]*") for node in pattern.split(".")))


def dashboard_targets() -> list[str]:
    import json

    def walk(panels: list[dict]) -> Iterable[str]:
        for panel in panels:
            yield from (target["target"] for target in panel.get("targets", []))
            yield from walk(panel.get("panels", []))

    return list(walk(json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"]))


def dashboard_series(prefix: str = "tgrelay") -> list[str]:
    """Every series pattern the dashboard queries, variables filled in (any token: ``*``)."""
    patterns = []
    for target in dashboard_targets():
        for found in _SERIES_IN_TARGET.findall(target):
            filled = found.replace("${prefix}", prefix).replace("$prefix", prefix)
            patterns += expand_braces(filled.replace("${token}", "*").replace("$token", "*"))
    return patterns
