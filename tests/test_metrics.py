"""StatsD metrics: real packets on a real UDP socket, from the metrics object and from a short
real run of the relay through the Bot API simulator."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from simulator import BotApiSimulator, make_bots
from supervision.alerts import MonitorSettings
from supervision.config import StatsdConfig
from supervision.metrics import (
    FLUSH_INTERVAL_SECONDS,
    MAX_DATAGRAM_BYTES,
    RecentTotals,
    StatsdMetrics,
    metric_name,
)
from supervision.relay import RelaySystem
from supervision.service_commands import render_status
from tests.helpers_monitoring import StatsdCapture, name_of, relay_config, wait_until

FAST = MonitorSettings(check_seconds=0.1)


@pytest.fixture
def capture() -> Iterator[StatsdCapture]:
    received = StatsdCapture()
    yield received
    received.close()


@pytest.fixture
def metrics(capture: StatsdCapture) -> Iterator[StatsdMetrics]:
    statsd = StatsdMetrics(StatsdConfig("127.0.0.1", capture.port, "tgrelay"))
    yield statsd
    statsd.close()


# --- the metrics object ---------------------------------------------------------------------


def test_counters_are_summed_per_name_and_leave_within_a_flush_interval(
        metrics: StatsdMetrics, capture: StatsdCapture) -> None:
    started = time.monotonic()
    for _ in range(500):
        metrics.incr("messages.accepted")
    metrics.incr("messages.failed", 3)

    wait_until(lambda: capture.counter("tgrelay.messages.accepted") == 500, timeout=2)

    assert time.monotonic() - started < FLUSH_INTERVAL_SECONDS + 0.4
    assert capture.counter("tgrelay.messages.failed") == 3
    accepted_lines = [line for line in capture.lines() if line.startswith("tgrelay.messages.accepted:")]
    assert len(accepted_lines) <= 2, "500 increments are one line (two if a flush fell in between)"


def test_timers_keep_every_sample_and_gauges_keep_their_last_value(
        metrics: StatsdMetrics, capture: StatsdCapture) -> None:
    for milliseconds in (5.0, 7.5, 120.0):
        metrics.timing("tokens.alpha.latency", milliseconds)
    metrics.gauge("queue.pending", 10)
    metrics.gauge("queue.pending", 4)
    metrics.close()
    wait_until(lambda: len(capture.lines()) == 4, timeout=2)

    assert sorted(capture.timings("tgrelay.tokens.alpha.latency")) == [5.0, 7.5, 120.0]
    assert [line for line in capture.lines() if "queue.pending" in line] == ["tgrelay.queue.pending:4|g"]
    assert ("tgrelay.tokens.alpha.latency", "ms") in capture.names()


def test_a_burst_leaves_in_datagrams_that_fit_one_ethernet_frame(
        metrics: StatsdMetrics, capture: StatsdCapture) -> None:
    for index in range(3000):
        metrics.timing("messages.end_to_end", index)
    metrics.close()
    wait_until(lambda: len(capture.timings("tgrelay.messages.end_to_end")) >= 3000, timeout=2)

    assert len(capture.timings("tgrelay.messages.end_to_end")) == 3000
    assert all(len(data) < MAX_DATAGRAM_BYTES for data in capture.datagrams)
    assert len(capture.datagrams) < 150, "many samples share a datagram"


def test_names_are_made_safe_for_the_statsd_line_format(
        metrics: StatsdMetrics, capture: StatsdCapture) -> None:
    metrics.incr("tokens.we:ird|na@me x\ty.sent")
    metrics.close()
    wait_until(capture.lines, timeout=2)

    assert capture.lines() == ["tgrelay.tokens.we_ird_na_me_x_y.sent:1|c"]
    assert metric_name("tokens.naïve.sent") == "tokens.na_ve.sent"


def test_closing_flushes_what_is_buffered_and_later_calls_do_not_fail(
        metrics: StatsdMetrics, capture: StatsdCapture) -> None:
    metrics.incr("supervisor.restarts")
    metrics.close()
    wait_until(lambda: capture.counter("tgrelay.supervisor.restarts") == 1, timeout=2)
    metrics.incr("supervisor.restarts")
    metrics.close()


def test_recent_totals_give_the_delivery_rate_and_throughput_of_a_window() -> None:
    now = [1000.0]
    recent = RecentTotals(keep_seconds=3600, clock=lambda: now[0])
    recent.sample([{"name": "alpha", "sent": 0, "failed": 0}])
    now[0] += 60
    recent.sample([{"name": "alpha", "sent": 100, "failed": 0}])
    now[0] += 60
    latest = recent.sample([{"name": "alpha", "sent": 190, "failed": 10}])

    last_minute = recent.window(60, latest)
    since_start = recent.window(3600, latest)

    assert (last_minute.confirmed, last_minute.failed, last_minute.seconds) == (90, 10, 60)
    assert last_minute.delivery_rate == 0.9
    assert last_minute.per_second(last_minute.sent_by_token["alpha"]) == 1.5
    assert (since_start.confirmed, since_start.seconds) == (190, 120)


# --- a real run ------------------------------------------------------------------------------


@pytest.fixture
def simulator() -> Iterator[BotApiSimulator]:
    with BotApiSimulator(bots=make_bots(3), enforce_limits=False) as sim:
        yield sim


def run_messages(relay: RelaySystem, count: int, first_chat: int = 1) -> None:
    relay.send_many([{"chat_id": first_chat + index, "text": f"metrics {index}"}
                     for index in range(count)])
    wait_until(lambda: relay.stats()["counts"]["confirmed"] >= count, timeout=20,
               what=f"{count} messages confirmed")


def test_a_relay_run_emits_the_contract_metrics_with_their_types_and_values(
        tmp_path: Path, simulator: BotApiSimulator, capture: StatsdCapture) -> None:
    alpha, bravo, ops = simulator.bots
    config = relay_config(tmp_path, simulator, {"default": [alpha, bravo], "ops": [ops]},
                          statsd_port=capture.port)
    with RelaySystem.start(config, monitor=FAST) as relay:
        run_messages(relay, 100)
        relay.send_many([{"chat_id": index + 1, "text": f"metrics {index}"} for index in range(10)])
        wait_until(lambda: capture.gauge("tgrelay.queue.pending") == 0
                   and capture.gauge("tgrelay.messages.delivery_rate") == 1.0, timeout=5)

    names = capture.names()
    assert capture.counter("tgrelay.messages.accepted") == 100
    assert capture.counter("tgrelay.messages.duplicate") == 10
    assert capture.counter("tgrelay.messages.confirmed") == 100
    sent = {name: capture.counter(f"tgrelay.tokens.{name}.sent") for name in ("alpha", "bravo")}
    assert sum(sent.values()) == 100 and all(sent.values()), "both tokens sent"
    latencies = [capture.timings(f"tgrelay.tokens.{name}.latency") for name in ("alpha", "bravo")]
    assert sum(map(len, latencies)) == 100
    assert all(0 < value < 5000 for samples in latencies for value in samples)
    assert len(capture.timings("tgrelay.messages.end_to_end")) == 100
    assert capture.timings("tgrelay.store.txn"), "every commit is timed"
    assert (capture.gauge("tgrelay.store.db_bytes") or 0) > 0
    assert capture.gauge("tgrelay.tokens.healthy") == 3
    assert capture.gauge("tgrelay.tokens.alpha.health") == 1.0
    assert capture.gauge("tgrelay.queue.in_flight") == 0
    assert capture.gauge("tgrelay.queue.oldest_pending_seconds") == 0
    assert capture.gauge("tgrelay.alerts.active") == 0
    for name, kind in names:
        assert name.startswith("tgrelay."), name
        expected = {"c"} if name.endswith((".sent", ".accepted", ".confirmed", ".duplicate")) else None
        assert expected is None or kind in expected, (name, kind)


def test_no_token_secret_ever_reaches_a_metric(
        tmp_path: Path, simulator: BotApiSimulator, capture: StatsdCapture) -> None:
    alpha, bravo, ops = simulator.bots
    simulator.revoke(bravo)
    config = relay_config(tmp_path, simulator, {"default": [alpha, bravo], "ops": [ops]},
                          statsd_port=capture.port)
    with RelaySystem.start(config, monitor=FAST) as relay:
        run_messages(relay, 30)
        time.sleep(0.3)

    everything = b"\n".join(capture.datagrams)
    assert everything
    for bot in simulator.bots:
        secret = bot.token.split(":", 1)[1]
        assert secret.encode() not in everything
        assert bot.token.encode() not in everything
    assert {name_of(bot) for bot in (alpha, bravo)} <= {
        name.split(".")[2] for name, _ in capture.names() if name.startswith("tgrelay.tokens.")}


def test_stats_report_recent_delivery_and_each_tokens_throughput_and_the_table_shows_them(
        tmp_path: Path, simulator: BotApiSimulator) -> None:
    alpha, bravo, ops = simulator.bots
    config = relay_config(tmp_path, simulator, {"default": [alpha, bravo], "ops": [ops]})
    with RelaySystem.start(config, monitor=FAST) as relay:
        run_messages(relay, 60)
        stats = relay.stats()
        tokens = relay.sending.tokens() if relay.sending else []

    last_minute, last_hour = stats["delivery"]["last_minute"], stats["delivery"]["last_hour"]
    assert (last_minute["confirmed"], last_minute["failed"], last_minute["delivery_rate"]) == (60, 0, 1.0)
    assert last_hour["confirmed"] == 60
    assert last_minute["confirmed_per_second"] > 0
    by_name = {token["name"]: token for token in stats["tokens"]}
    assert set(by_name) == {"alpha", "bravo", "charlie"}
    assert by_name["alpha"]["sent_per_second"] > 0
    assert {"state", "weight", "health", "last_error"} <= set(by_name["alpha"])
    assert stats["alerts"]["active"] == []
    assert stats["last_integrity_check"]["ok"] is True

    table = render_status("http://127.0.0.1:8780", stats, tokens)
    assert "last minute     100.00% of 60 finished confirmed" in table
    assert "alerts          none active" in table
    rows = table.splitlines()
    health_header = next(row for row in rows if row.split()[:2] == ["TOKEN", "HEALTH"])
    assert health_header.split() == ["TOKEN", "HEALTH", "MSG/S", "LATENCY", "429S", "ERRORS",
                                     "RESTARTS", "LAST", "ERROR"]
    alpha_health = next(row for row in rows[rows.index(health_header):] if row.startswith("alpha"))
    assert alpha_health.split()[1] == "1.00"
    assert float(alpha_health.split()[2]) > 0
    assert "ms" in alpha_health
