"""Against the real StatsD daemon (the npm package ``statsd``, installed by ``.ci/run`` into
``.ci/node_modules``): a relay run through the simulator, then the aggregated counters, timers
and gauges read back through the daemon's admin interface, and the series its Graphite backend
flushes compared with the names the dashboard test assumes.

Without node or the package the tests fail in CI (``$CI`` set) and are skipped elsewhere.
``$TGRELAY_STATSD_JS`` may point at another ``stats.js``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from simulator import BotApiSimulator, make_bots
from supervision.alerts import MonitorSettings
from supervision.relay import RelaySystem
from tests.helpers_monitoring import etsy_series, relay_config, wait_until

REPO = Path(__file__).resolve().parent.parent
STATS_JS = Path(os.environ.get("TGRELAY_STATSD_JS", REPO / ".ci" / "node_modules" / "statsd" / "stats.js"))
MESSAGES = 200
_ENTRY = re.compile(r"(?:'((?:[^'\\]|\\.)*)'|([A-Za-z_$][\w$]*)):\s*(\[[^\]]*\]|[^,\n}]+)")


def node_and_daemon() -> tuple[str, Path]:
    node = shutil.which("node")
    if node is not None and STATS_JS.is_file():
        return node, STATS_JS
    problem = ("node is not on PATH" if node is None else
               f"the statsd package is not installed at {STATS_JS}")
    if os.environ.get("CI"):
        pytest.fail(f"{problem}: .ci/run installs it with npm")
    pytest.skip(f"{problem}; `npm install --no-save --prefix .ci statsd@0.9.0` installs it "
                "(CI fails instead of skipping)")


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def parse_inspected(text: str) -> dict[str, str]:
    """The daemon prints its tables with node's ``util.inspect``: ``{ 'key': value, ... }``,
    keys quoted or bare; the values are returned as printed."""
    body = text.split("\nEND", 1)[0].strip()
    return {quoted or bare: value.strip() for quoted, bare, value in _ENTRY.findall(body.strip("{} \n"))}


def sample_count(printed: str) -> int:
    """How many numbers an inspected array holds (past 100: "... N more items")."""
    items = [item.strip() for item in printed.strip("[] \n").split(",") if item.strip()]
    return sum(int(item.split()[1]) if item.startswith("...") else 1 for item in items)


@dataclass
class Daemon:
    process: subprocess.Popen[bytes]
    port: int
    admin_port: int

    def admin(self, command: str, end: bytes = b"END\n\n") -> str:
        with socket.create_connection(("127.0.0.1", self.admin_port), timeout=5) as connection:
            connection.sendall(f"{command}\n".encode())
            data = b""
            while not data.endswith(end):
                chunk = connection.recv(65536)
                if not chunk:
                    break
                data += chunk
        return data.decode()

    def values(self, command: str) -> dict[str, float]:
        """``counters`` or ``gauges``: each name's number."""
        return {key: float(value) for key, value in parse_inspected(self.admin(command)).items()}

    def timer_samples(self) -> dict[str, int]:
        """``timers``: how many samples each timer holds."""
        return {key: sample_count(value) for key, value in parse_inspected(self.admin("timers")).items()}


class GraphiteReceiver(socketserver.ThreadingTCPServer):
    """What Graphite's plaintext port would receive: ``path value timestamp`` lines."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                for raw in self.rfile:
                    with outer.lock:
                        outer.lines.append(raw.decode().strip())

        super().__init__(("127.0.0.1", 0), Handler)

    def series(self) -> dict[str, float]:
        with self.lock:
            lines = list(self.lines)
        return {line.split()[0]: float(line.split()[1]) for line in lines if len(line.split()) == 3}


@contextlib.contextmanager
def start_daemon(directory: Path, **settings: object) -> Iterator[Daemon]:
    node, stats_js = node_and_daemon()
    port, admin_port = free_port(socket.SOCK_DGRAM), free_port()
    config = {"port": port, "mgmt_port": admin_port, "address": "127.0.0.1",
              "mgmt_address": "127.0.0.1", "backends": [], "flushInterval": 3_600_000,
              "percentThreshold": [90], **settings}
    path = directory / "statsd-config.js"
    path.write_text(json.dumps(config), encoding="utf-8")
    log = (directory / "statsd.log").open("wb")
    process = subprocess.Popen([node, str(stats_js), str(path)], cwd=stats_js.parent,
                               stdout=log, stderr=subprocess.STDOUT)
    daemon = Daemon(process, port, admin_port)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if "health: up" in daemon.admin("health", end=b"\n"):
                    break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("the statsd daemon did not start: "
                                     + (directory / "statsd.log").read_text(errors="replace"))
            time.sleep(0.05)
        yield daemon
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        log.close()


@pytest.fixture
def statsd_daemon(tmp_path: Path) -> Iterator[Daemon]:
    with start_daemon(tmp_path) as daemon:
        yield daemon


def run_relay(directory: Path, statsd_port: int, count: int) -> None:
    with BotApiSimulator(bots=make_bots(2), enforce_limits=False) as sim:
        config = relay_config(directory, sim, {"default": sim.bots}, statsd_port=statsd_port,
                              alerts=False)
        with RelaySystem.start(config, monitor=MonitorSettings(check_seconds=0.1)) as relay:
            relay.send_many([{"chat_id": 1 + n, "text": f"daemon {n}"} for n in range(count)])
            relay.send_many([{"chat_id": 1 + n, "text": f"daemon {n}"} for n in range(10)])
            wait_until(lambda: relay.stats()["counts"]["confirmed"] == count, timeout=30)
            time.sleep(0.3)  # a monitor tick after the last confirmation: final gauges


def test_the_real_daemon_aggregates_the_counters_timers_and_gauges_of_a_relay_run(
        tmp_path: Path, statsd_daemon: Daemon) -> None:
    run_relay(tmp_path, statsd_daemon.port, MESSAGES)

    wait_until(lambda: statsd_daemon.values("counters").get("tgrelay.messages.confirmed") == MESSAGES,
               timeout=5, what="the daemon counting every confirmation")
    counters = statsd_daemon.values("counters")
    timers = statsd_daemon.timer_samples()
    gauges = statsd_daemon.values("gauges")

    assert counters["statsd.bad_lines_seen"] == 0, "every line tgrelay sent was valid"
    assert counters["tgrelay.messages.accepted"] == MESSAGES
    assert counters["tgrelay.messages.duplicate"] == 10
    assert counters["tgrelay.tokens.alpha.sent"] + counters["tgrelay.tokens.bravo.sent"] == MESSAGES
    assert counters["tgrelay.tokens.alpha.sent"] > 0 and counters["tgrelay.tokens.bravo.sent"] > 0
    assert timers["tgrelay.tokens.alpha.latency"] + timers["tgrelay.tokens.bravo.latency"] == MESSAGES
    assert timers["tgrelay.messages.end_to_end"] == MESSAGES
    assert timers["tgrelay.store.txn"] >= 1
    assert gauges["tgrelay.queue.pending"] == 0
    assert gauges["tgrelay.queue.in_flight"] == 0
    assert gauges["tgrelay.tokens.healthy"] == 2
    assert gauges["tgrelay.tokens.alpha.health"] == 1
    assert gauges["tgrelay.messages.delivery_rate"] == 1
    assert gauges["tgrelay.store.db_bytes"] > 0


def test_the_real_daemon_flushes_to_graphite_the_series_names_the_dashboard_test_assumes(
        tmp_path: Path) -> None:
    graphite = GraphiteReceiver()
    threading.Thread(target=graphite.serve_forever, daemon=True).start()
    try:
        with start_daemon(tmp_path, backends=["./backends/graphite"], flushInterval=300,
                          graphiteHost="127.0.0.1", graphitePort=graphite.server_address[1]) as daemon:
            run_relay(tmp_path, daemon.port, 20)
            received = [(name, kind) for command, kind in (("counters", "c"), ("gauges", "g"))
                        for name in daemon.values(command) if name.startswith("tgrelay.")]
            received += [(name, "ms") for name in daemon.timer_samples() if name.startswith("tgrelay.")]
            expected = {series for name, kind in received for series in etsy_series(name, kind)}
            wait_until(lambda: expected <= set(graphite.series()), timeout=5,
                       what="a flush of everything the daemon holds")
    finally:
        graphite.shutdown()
        graphite.server_close()

    names = {name for name, _ in received}
    assert {"tgrelay.messages.confirmed", "tgrelay.store.txn", "tgrelay.queue.pending",
            "tgrelay.messages.end_to_end", "tgrelay.tokens.healthy"} <= names
