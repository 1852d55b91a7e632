"""Alerts: the router's de-duplication, rate limit and recoveries, its config keys, and every
alert kind triggered for real through a relay sending to the Bot API simulator: each is seen
once in the log, once as ``alerts.<kind>`` in real StatsD packets and once in the alert chat."""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import apsw
import pytest

from actors.errors import ConfigError, StoreUnavailable
from actors.messages import Housekeep, Receipt
from simulator import BotApiSimulator, make_bots
from supervision.alerts import AlertRouter, MonitorSettings, Watch
from supervision.config import Config, StatsdConfig, parse_config
from supervision.metrics import StatsdMetrics, Window
from supervision.relay import RelaySystem
from supervision.supervisor import SendingSystem, SupervisionSettings
from tests.helpers_monitoring import (
    ALERT_CHAT,
    StatsdCapture,
    alert_texts,
    relay_config,
    wait_until,
)

FAST = MonitorSettings(check_seconds=0.1, repeat_seconds=600)
FAKE_TOKEN = "123456789:" + "A" * 35


@pytest.fixture
def capture() -> Iterator[StatsdCapture]:
    received = StatsdCapture()
    yield received
    received.close()


@pytest.fixture
def sim() -> Iterator[BotApiSimulator]:
    with BotApiSimulator(bots=make_bots(3), enforce_limits=False) as simulator:
        yield simulator


@pytest.fixture
def config_for(tmp_path: Path, sim: BotApiSimulator, capture: StatsdCapture) -> Callable[..., Config]:
    """Pool ``default`` = alpha and bravo; pool ``ops`` = charlie, which carries the alerts."""
    alpha, bravo, charlie = sim.bots

    def make(store_extra: str = "", alerts_extra: str = "") -> Config:
        return relay_config(tmp_path, sim, {"default": [alpha, bravo], "ops": [charlie]},
                            statsd_port=capture.port, store_extra=store_extra,
                            alerts_extra=alerts_extra)

    return make


def announced(caplog: pytest.LogCaptureFixture, kind: str) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.levelno == logging.ERROR and record.getMessage().startswith(f"ALERT {kind}")]


def assert_alerted_once(caplog: pytest.LogCaptureFixture, capture: StatsdCapture,
                        sim: BotApiSimulator, kind: str, *, recovered: bool = False) -> list[str]:
    """The alert reached the log, StatsD and the alert chat, once; so did its recovery."""
    def in_chat(mark: str) -> list[str]:
        return [text for text in alert_texts(sim) if text.startswith(mark) and f" {kind}" in text]

    wait_until(lambda: in_chat("🚨"), timeout=15, what=f"the {kind} alert in the alert chat")
    if recovered:
        wait_until(lambda: in_chat("✅"), timeout=15, what=f"the {kind} recovery in the alert chat")
    wait_until(lambda: capture.counter(f"tgrelay.alerts.{kind}") >= 1, timeout=2)
    time.sleep(0.5)  # a flood would show by now
    assert len(announced(caplog, kind)) == 1, announced(caplog, kind)
    assert capture.counter(f"tgrelay.alerts.{kind}") == 1
    assert len(in_chat("🚨")) == 1, alert_texts(sim)
    assert len(in_chat("✅")) == (1 if recovered else 0), alert_texts(sim)
    return in_chat("🚨") + in_chat("✅")


# --- the router -----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def router_config(api_base_url: str = "http://127.0.0.1:9", alerts: bool = True) -> Config:
    alert_table = f'[alerts]\nchat_id = {ALERT_CHAT}\npool = "ops"\n' if alerts else ""
    return parse_config(
        f'[telegram]\napi_base_url = "{api_base_url}"\nrequest_timeout_seconds = 2\n{alert_table}'
        f'[pools.ops]\n[[pools.ops.tokens]]\nname = "ops"\ntoken = "{FAKE_TOKEN}"\n', environ={})


@pytest.fixture
def metrics(capture: StatsdCapture) -> Iterator[StatsdMetrics]:
    statsd = StatsdMetrics(StatsdConfig("127.0.0.1", capture.port, "tgrelay"))
    yield statsd
    statsd.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def router(metrics: StatsdMetrics, clock: Clock) -> Iterator[AlertRouter]:
    alerts = AlertRouter(router_config(alerts=False), metrics, repeat_seconds=60, clock=clock)
    yield alerts
    alerts.close()


def test_an_alert_is_one_error_line_and_one_alerts_counter(
        router: AlertRouter, metrics: StatsdMetrics, capture: StatsdCapture,
        caplog: pytest.LogCaptureFixture) -> None:
    router("persistence", "a write could not be committed: the database or the disk is full")
    metrics.flush()

    assert announced(caplog, "persistence") == [
        "ALERT persistence: a write could not be committed: the database or the disk is full"]
    wait_until(lambda: capture.counter("tgrelay.alerts.persistence") == 1, timeout=2)
    assert [c.kind for c in router.active()] == ["persistence"]


def test_repeats_inside_the_window_are_counted_and_ride_with_the_next_announcement(
        router: AlertRouter, clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    for _ in range(50):
        router("persistence", "a write could not be committed: the database is locked")
        clock.now += 1

    assert len(announced(caplog, "persistence")) == 1
    clock.now += 11
    router("persistence", "a write could not be committed: the database is locked")

    assert len(announced(caplog, "persistence")) == 2
    assert "(49 more like this since" in announced(caplog, "persistence")[-1]


def test_token_alerts_are_limited_per_token_not_per_kind(
        router: AlertRouter, caplog: pytest.LogCaptureFixture) -> None:
    for _ in range(3):
        router("token_revoked", "token alpha (pool default) is revoked: getMe answered 401")
        router("token_revoked", "token bravo (pool default) is revoked: getMe answered 401")

    messages = announced(caplog, "token_revoked")
    assert len(messages) == 2
    assert messages[0].startswith("ALERT token_revoked [alpha]: token alpha")
    assert messages[1].startswith("ALERT token_revoked [bravo]: token bravo")


def test_a_recovery_is_announced_once_and_only_for_an_announced_condition(
        router: AlertRouter, caplog: pytest.LogCaptureFixture) -> None:
    assert router.resolve("backlog_old", "", "drained") is False, "nothing was announced"
    router.holds("backlog_old", "", "the oldest of 5 pending messages has waited 11 min")
    router.holds("backlog_old", "", "the oldest of 5 pending messages has waited 12 min")

    assert router.resolve("backlog_old", "", "the backlog is drained") is True
    assert router.resolve("backlog_old", "", "the backlog is drained") is False
    recoveries = [r.getMessage() for r in caplog.records if r.getMessage().startswith("RECOVERED")]
    assert recoveries == ["RECOVERED backlog_old: the backlog is drained"]
    assert len(announced(caplog, "backlog_old")) == 1, "a condition that still holds is not news"


def test_a_condition_that_returns_inside_the_window_is_announced_by_a_reminder_after_it(
        router: AlertRouter, clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    router.holds("delivery_rate_low", "", "only 50.0% confirmed")
    clock.now += 5
    router.resolve("delivery_rate_low", "", "back to 100.0%")
    clock.now += 5
    router.holds("delivery_rate_low", "", "only 40.0% confirmed")
    router.remind_due()
    assert len(announced(caplog, "delivery_rate_low")) == 1, "a flap inside the window is quiet"

    clock.now += 60
    router.remind_due()

    messages = announced(caplog, "delivery_rate_low")
    assert len(messages) == 2
    assert messages[1] == "ALERT delivery_rate_low: only 40.0% confirmed (1 more like this since " \
        + messages[1].rsplit("since ", 1)[1]
    router.remind_due()
    assert len(announced(caplog, "delivery_rate_low")) == 2


def test_an_alert_the_chat_cannot_receive_is_logged_and_never_raised(
        metrics: StatsdMetrics, caplog: pytest.LogCaptureFixture) -> None:
    router = AlertRouter(router_config("http://127.0.0.1:9"), metrics, repeat_seconds=60)
    router.attach(None)

    router("supervisor_gave_up", "the store actor stopped; sending stops")
    wait_until(lambda: router.undelivered == 1, timeout=10)
    router.close()

    assert any("could not be sent to the alert chat" in r.getMessage() for r in caplog.records)
    assert FAKE_TOKEN not in caplog.text
    assert FAKE_TOKEN.split(":")[1] not in caplog.text


class RefusingRelay:
    """Answers ``send`` like a relay whose store is failing: the store raises its own
    persistence alert about the refused write, then the caller hears StoreUnavailable."""

    def __init__(self) -> None:
        self.sending = object()
        self.router: AlertRouter | None = None
        self.refused = 0

    def send(self, chat_id: int | str, text: str, pool: str | None = None, *,
             dedup_key: str | None = None) -> Receipt:
        self.refused += 1
        assert self.router is not None
        self.router("persistence", "a write could not be committed: the database or the disk is full")
        raise StoreUnavailable("the database or the disk is full")


def test_an_alert_about_a_failing_store_does_not_loop_and_still_reaches_the_chat(
        metrics: StatsdMetrics, sim: BotApiSimulator, caplog: pytest.LogCaptureFixture) -> None:
    ops_bot = sim.bots[2]
    config = parse_config(
        f'[telegram]\napi_base_url = "{sim.url}"\n[alerts]\nchat_id = {ALERT_CHAT}\npool = "ops"\n'
        f'[pools.ops]\n[[pools.ops.tokens]]\nname = "ops"\ntoken = "{ops_bot.token}"\n', environ={})
    router = AlertRouter(config, metrics, repeat_seconds=60)
    relay = RefusingRelay()
    relay.router = router
    router.attach(relay)

    router("persistence", "a write could not be committed: the database or the disk is full")
    wait_until(lambda: alert_texts(sim), timeout=10)
    time.sleep(0.3)
    router.close()

    assert relay.refused == 1
    assert len(alert_texts(sim)) == 1
    assert len(announced(caplog, "persistence")) == 1
    assert router.active()[0].suppressed == 1


def test_the_watch_announces_a_token_back_in_service_once(
        router: AlertRouter, caplog: pytest.LogCaptureFixture) -> None:
    watch = Watch(router, MonitorSettings())
    quiet = Window(60, 0, 0, {})
    router("token_revoked", "token alpha (pool default) is revoked: getMe answered 'Unauthorized' 2 times")
    router("token_quarantined", "token bravo (pool default) failed 6 times in 60 s and is quarantined")

    watch.check(None, [{"name": "alpha", "state": "revoked"}, {"name": "bravo", "quarantined": True}],
                quiet, -math.inf)
    assert len(router.active()) == 2
    for _ in range(2):
        watch.check(None, [{"name": "alpha", "state": "healthy"}, {"name": "bravo", "quarantined": False}],
                    quiet, -math.inf)

    recoveries = sorted(r.getMessage() for r in caplog.records if r.getMessage().startswith("RECOVERED"))
    assert recoveries == ["RECOVERED token_quarantined [bravo]: token bravo is back in service",
                          "RECOVERED token_revoked [alpha]: token alpha answers getMe again (state healthy)"]
    assert router.active() == []


def test_too_few_finished_messages_say_nothing_about_the_delivery_rate(
        router: AlertRouter, caplog: pytest.LogCaptureFixture) -> None:
    watch = Watch(router, MonitorSettings(delivery_rate_threshold=0.9))

    watch.check(None, [], Window(300, 1, 5, {}), -math.inf)
    assert announced(caplog, "delivery_rate_low") == []
    watch.check(None, [], Window(300, 10, 15, {}), -math.inf)
    assert announced(caplog, "delivery_rate_low") == [
        "ALERT delivery_rate_low: only 40.0% of the 25 messages finished in the last 5 min were "
        "confirmed (15 failed); the target is 90.0%"]


# --- config ----------------------------------------------------------------------------------


def test_alert_thresholds_are_read_from_the_alerts_table(make_config: Callable[[str], Config]) -> None:
    config = make_config('[alerts]\nchat_id = -100123\npool = "default"\n'
                         "delivery_rate_threshold = 0.99\ndelivery_rate_window_seconds = 120\n"
                         "backlog_age_seconds = 60\nrepeat_minutes = 5\n")

    settings = MonitorSettings.from_config(config.alerts)

    assert (settings.delivery_rate_threshold, settings.delivery_rate_window_seconds,
            settings.backlog_age_seconds, settings.repeat_seconds) == (0.99, 120.0, 60.0, 300.0)


def test_without_threshold_keys_the_defaults_are_the_same_with_or_without_an_alerts_table(
        make_config: Callable[[str], Config]) -> None:
    config = make_config('[alerts]\nchat_id = -100123\npool = "default"\n')

    assert MonitorSettings.from_config(config.alerts) == MonitorSettings.from_config(None)


@pytest.mark.parametrize(("line", "message"), [
    ("delivery_rate_threshold = 1.5", "between 0 and 1"),
    ("delivery_rate_threshold = 0", "greater than 0"),
    ("backlog_age_seconds = -1", "greater than 0"),
    ('repeat_minutes = "often"', "must be a number"),
    ("delivery_rate_window = 60", "unknown key"),
])
def test_a_bad_alert_threshold_is_a_config_error_naming_the_key(
        make_config: Callable[[str], Config], line: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        make_config(f'[alerts]\nchat_id = -100123\npool = "default"\n{line}\n')
    assert str(raised.value).startswith(f"alerts.{line.split(' =', maxsplit=1)[0]}")


# --- every kind, for real --------------------------------------------------------------------


def test_a_damaged_database_is_alerted_once_and_its_recovery_announced_once(
        tmp_path: Path, config_for, sim: BotApiSimulator, capture: StatsdCapture,
        caplog: pytest.LogCaptureFixture) -> None:
    config = config_for()
    with RelaySystem.start(config, send=False) as relay:
        for first in range(0, 3000, 1000):
            relay.send_many([{"chat_id": 10_000 + n, "text": f"message {n} " + "x" * 80}
                             for n in range(first, first + 1000)])
    database = tmp_path / "relay.db"
    inspect = apsw.Connection(str(database))
    leaves = [row[0] for row in inspect.execute(
        "SELECT pageno FROM dbstat WHERE name = 'message_store' AND pagetype = 'leaf' ORDER BY pageno")]
    inspect.close()
    with database.open("r+b") as file:
        file.seek((leaves[len(leaves) // 2] - 1) * 4096)
        file.write(os.urandom(4096))

    with RelaySystem.start(config, monitor=FAST):
        texts = assert_alerted_once(caplog, capture, sim, "database_corruption", recovered=True)

    assert "integrity check" in texts[0]
    assert "recovered" in texts[1] and "message rows into a fresh relay.db" in texts[1]


def test_a_full_database_is_alerted_once_and_writable_again_is_announced_once(
        config_for, sim: BotApiSimulator, capture: StatsdCapture,
        caplog: pytest.LogCaptureFixture) -> None:
    with RelaySystem.start(config_for(store_extra="max_db_megabytes = 1"), monitor=FAST) as relay:
        accepted = 0
        with pytest.raises(StoreUnavailable, match="full"):
            for n in range(5000):
                relay.send(chat_id=1 + n, text=f"{n} " + "x" * 3000, pool="default")
                accepted += 1
        wait_until(lambda: [t for t in alert_texts(sim) if " persistence" in t], timeout=15)
        wait_until(lambda: relay.stats()["counts"]["confirmed"] >= accepted, timeout=30,
                   what="the accepted messages delivered")
        relay.store.call(Housekeep(now=10**10))  # archives every finished row: space again
        relay.send(chat_id=99_999, text="accepted again", pool="default")

        texts = assert_alerted_once(caplog, capture, sim, "persistence", recovered=True)

    assert "full" in texts[0]
    assert "commits writes again" in texts[1]
    assert accepted > 10


def test_a_revoked_token_is_alerted_once_while_the_other_token_delivers_everything(
        config_for, sim: BotApiSimulator, capture: StatsdCapture,
        caplog: pytest.LogCaptureFixture) -> None:
    alpha = sim.bots[0]
    sim.revoke(alpha)
    with RelaySystem.start(config_for(), monitor=FAST) as relay:
        relay.send_many([{"chat_id": 1 + n, "text": f"revoked {n}"} for n in range(30)])
        wait_until(lambda: relay.stats()["counts"]["confirmed"] == 30, timeout=15)

        (text,) = assert_alerted_once(caplog, capture, sim, "token_revoked")

    assert "token_revoked [alpha]" in text
    assert alpha.token not in text and alpha.token.split(":")[1] not in caplog.text


def test_a_token_crashing_past_its_restart_intensity_is_alerted_once_as_quarantined(
        config_for, sim: BotApiSimulator, capture: StatsdCapture,
        caplog: pytest.LogCaptureFixture) -> None:
    intensity = SupervisionSettings().restart_intensity
    with RelaySystem.start(config_for(), monitor=FAST) as relay:
        sending = cast(SendingSystem, relay.sending)
        for crash in range(intensity + 1):
            wait_until(lambda crash=crash: sending.token_view("alpha").restarts == crash  # type: ignore[misc]
                       and sending.token_view("alpha").ref is not None, timeout=10,
                       what=f"generation {crash + 1} of alpha")
            sending.crash_token_for_test("alpha")

        (text,) = assert_alerted_once(caplog, capture, sim, "token_quarantined")
        relay.send_many([{"chat_id": 1 + n, "text": f"after quarantine {n}"} for n in range(10)])
        wait_until(lambda: relay.stats()["counts"]["confirmed"] >= 10, timeout=10)

    assert "token_quarantined [alpha]" in text
    assert capture.counter("tgrelay.supervisor.restarts") == intensity


def test_the_supervisor_giving_up_is_alerted_once_straight_to_the_chat(
        config_for, sim: BotApiSimulator, capture: StatsdCapture,
        caplog: pytest.LogCaptureFixture) -> None:
    with RelaySystem.start(config_for(), monitor=FAST) as relay:
        relay.store.actor.stop()

        (text,) = assert_alerted_once(caplog, capture, sim, "supervisor_gave_up")

    assert "the store actor stopped" in text


def test_a_low_delivery_rate_is_alerted_once_and_its_recovery_announced_once(
        config_for, sim: BotApiSimulator, capture: StatsdCapture,
        caplog: pytest.LogCaptureFixture) -> None:
    for chat in range(1000, 1030):
        sim.add_missing_chat(chat)
    monitor = MonitorSettings(check_seconds=0.1, repeat_seconds=600, delivery_rate_threshold=0.9,
                              delivery_rate_window_seconds=2.0)
    with RelaySystem.start(config_for(), monitor=monitor) as relay:
        relay.send_many([{"chat_id": chat, "text": "to nobody"} for chat in range(1000, 1030)])
        wait_until(lambda: [t for t in alert_texts(sim) if " delivery_rate_low" in t], timeout=10)
        relay.send_many([{"chat_id": 1 + n, "text": f"to somebody {n}"} for n in range(40)])

        texts = assert_alerted_once(caplog, capture, sim, "delivery_rate_low", recovered=True)

    assert re.search(r"only 0\.0% of the (2\d|30) messages finished in the last 2\.0 s", texts[0])


def test_an_old_backlog_is_alerted_once_and_its_draining_announced_once(
        config_for, sim: BotApiSimulator, capture: StatsdCapture,
        caplog: pytest.LogCaptureFixture) -> None:
    alpha, bravo, _ = sim.bots
    sim.flood(alpha, 3.0)
    sim.flood(bravo, 3.0)
    monitor = MonitorSettings(check_seconds=0.1, repeat_seconds=600, backlog_age_seconds=1.0)
    with RelaySystem.start(config_for(), monitor=monitor) as relay:
        relay.send_many([{"chat_id": 1 + n, "text": f"stuck {n}"} for n in range(10)])

        texts = assert_alerted_once(caplog, capture, sim, "backlog_old", recovered=True)

    assert {d.chat_id for d in sim.record.deliveries() if d.text.startswith("stuck")} == set(range(1, 11))

    assert "the oldest of 10 pending messages has waited" in texts[0]
    assert "the backlog is drained" in texts[1]
    assert ALERT_CHAT not in {d.chat_id for d in sim.record.deliveries(bot_id=alpha.id)}
