"""The Grafana dashboard queries only series that tgrelay really produces.

A short real run through the simulator exercises every path that emits a metric (429s, resets,
failed chats, duplicates, a crashed token, a locked database, an alert); the StatsD lines it
sends, named as etsy statsd names them in Graphite, must cover every series pattern of
``conf/grafana/tgrelay-dashboard.json``. ``test_statsd_daemon`` checks that naming against the
real daemon's Graphite output."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import apsw
import pytest

from actors.errors import StoreUnavailable
from simulator import BotApiSimulator, make_bots
from supervision.alerts import MonitorSettings
from supervision.relay import RelaySystem
from supervision.supervisor import SendingSystem
from tests.helpers_monitoring import (
    DASHBOARD,
    StatsdCapture,
    dashboard_series,
    etsy_series,
    expand_braces,
    graphite_regex,
    relay_config,
    wait_until,
)


@pytest.fixture(scope="module")
def emitted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[set[str]]:
    """The Graphite series of everything a short, eventful relay run sends to StatsD."""
    directory = tmp_path_factory.mktemp("dashboard")
    capture = StatsdCapture()
    missing = range(5000, 5006)
    with BotApiSimulator(bots=make_bots(3), enforce_limits=False, missing_chats=missing) as sim:
        alpha, bravo, charlie = sim.bots
        config = relay_config(directory, sim, {"default": [alpha, bravo], "ops": [charlie]},
                              statsd_port=capture.port, store_extra="busy_timeout_ms = 100")
        sim.set_reset_rate(0.2, bot=alpha)
        sim.set_latency(200, bot=alpha)
        sim.flood(bravo, 0.5)
        monitor = MonitorSettings(check_seconds=0.1, delivery_rate_threshold=0.99)
        with RelaySystem.start(config, monitor=monitor) as relay:
            messages = [{"chat_id": 1 + n, "text": f"dashboard {n}"} for n in range(60)]
            relay.send_many(messages + [{"chat_id": chat, "text": "nobody"} for chat in missing])
            relay.send_many(messages[:5])
            sending = cast(SendingSystem, relay.sending)
            wait_until(lambda: sending.token_view("alpha").in_flight > 0, timeout=5)
            sending.crash_token_for_test("alpha")
            lock = apsw.Connection(str(directory / "relay.db"))
            lock.setbusytimeout(5000)
            lock.execute("BEGIN EXCLUSIVE")
            with pytest.raises(StoreUnavailable):
                relay.send(chat_id=999, text="while locked", pool="default")
            lock.execute("ROLLBACK")
            lock.close()
            wait_until(lambda: sum(relay.stats()["counts"][s] for s in ("confirmed", "failed")) >= 67,
                       timeout=30, what="every message finished")
            wait_until(lambda: capture.counter("tgrelay.alerts.delivery_rate_low"), timeout=5)
    capture.close()
    yield {series for name, kind in capture.names() for series in etsy_series(name, kind)}


def test_every_series_the_dashboard_queries_is_one_tgrelay_emits(emitted: set[str]) -> None:
    patterns = dashboard_series()

    missing = [pattern for pattern in patterns
               if not any(graphite_regex(pattern).fullmatch(series) for series in emitted)]

    assert len(patterns) >= 30
    assert missing == [], f"the dashboard queries series nothing emits: {missing}"


CONTRACT_METRICS = [
    *[(f"messages.{name}", "c") for name in ("accepted", "duplicate", "confirmed", "failed",
                                             "retried", "rerouted")],
    *[(f"tokens.alpha.{name}", "c") for name in ("sent", "rate_limited", "errors")],
    ("tokens.failover", "c"), ("supervisor.restarts", "c"), ("store.errors", "c"),
    ("alerts.token_revoked", "c"),
    ("store.txn", "ms"), ("tokens.alpha.latency", "ms"), ("messages.end_to_end", "ms"),
    ("queue.pending", "g"), ("queue.in_flight", "g"), ("store.db_bytes", "g"),
    ("tokens.alpha.health", "g"), ("tokens.healthy", "g"),
]


@pytest.mark.parametrize(("name", "kind"), CONTRACT_METRICS)
def test_the_dashboard_shows_every_contract_metric(name: str, kind: str) -> None:
    patterns = [graphite_regex(pattern) for pattern in dashboard_series()]

    assert any(pattern.fullmatch(series) for pattern in patterns
               for series in etsy_series(f"tgrelay.{name}", kind)), name


def test_the_token_variable_lists_token_names_only(emitted: set[str]) -> None:
    variables = {v["name"]: v for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    query = variables["token"]["query"].replace("$prefix", "tgrelay")

    nodes = {series.split(".")[4] for series in emitted if graphite_regex(query + ".*").match(series)}

    assert nodes == {"alpha", "bravo", "charlie"}
    assert variables["token"]["allValue"] == "*"


def test_graphite_patterns_keep_a_star_inside_one_node() -> None:
    assert graphite_regex("stats.tgrelay.tokens.*.sent").fullmatch("stats.tgrelay.tokens.alpha.sent")
    assert not graphite_regex("stats.tgrelay.tokens.*.sent").fullmatch("stats.tgrelay.tokens.a.b.sent")
    assert expand_braces("a.{b,c}.{d,e}") == ["a.b.d", "a.b.e", "a.c.d", "a.c.e"]


def test_the_dashboard_is_valid_json_with_a_datasource_variable() -> None:
    dashboard = json.loads(Path(DASHBOARD).read_text(encoding="utf-8"))
    assert dashboard["uid"] == "tgrelay"
    assert {"datasource", "prefix", "token"} <= {v["name"] for v in dashboard["templating"]["list"]}
    panel_ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(panel_ids) == len(set(panel_ids))
