"""Supervision: failing token actors, balancer and store, and the graceful stop, end to end
against the real simulator and a real SQLite file."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from tests.helpers_sending import FAST, Harness, running_relay

pytestmark = pytest.mark.slow


def assert_nothing_lost(relay: Harness, total: int) -> None:
    """Every message confirmed, no lease left, and no duplicate that was not in doubt."""
    rows = relay.rows()
    assert len(rows) == total
    assert {row["status"] for row in rows} == {"confirmed"}
    assert all(row["lease_owner"] is None for row in rows)
    assert relay.duplicate_copies() <= relay.in_doubt()


def test_a_crashed_token_actor_is_restarted_and_goes_on_sending(tmp_path: Path) -> None:
    with running_relay(tmp_path, (1, 1)) as relay:
        relay.sim.set_latency(20)
        relay.send_to(300, chat=lambda i: 1000 + i)
        relay.wait_until(lambda: relay.counts()["confirmed"] >= 50, 10, "some deliveries")
        relay.sending.crash_token_for_test("alpha")
        relay.wait_until(lambda: relay.sending.token_view("alpha").owner == "alpha#2", 5,
                         "a new generation of alpha")
        sent_before = relay.sending.token_view("alpha").sent
        relay.wait_settled()
        alpha = relay.sending.token_view("alpha")
        assert_nothing_lost(relay, 300)

    assert relay.metrics.count("supervisor.restarts") == 1
    assert alpha.restarts == 1
    assert alpha.state == "healthy"
    assert alpha.sent > sent_before, "the restarted generation sends, and keeps the counters"


def test_a_token_actor_that_keeps_crashing_is_quarantined_and_its_messages_rerouted(
        tmp_path: Path) -> None:
    settings = dataclasses.replace(FAST, restart_intensity=2)
    with running_relay(tmp_path, (1, 1), settings=settings) as relay:
        relay.sim.set_latency(50)
        relay.send_to(300, chat=lambda i: 2000 + i)
        for generation in (1, 2, 3):
            relay.wait_until(lambda g=generation: relay.sending.token_view("alpha").owner
                             == f"alpha#{g}" and relay.sending.token_view("alpha").in_flight > 0,
                             5, f"alpha#{generation} to have sends in flight")
            relay.sending.crash_token_for_test("alpha")
        relay.wait_until(lambda: relay.sending.token_view("alpha").quarantined, 5,
                         "alpha to be quarantined")
        quarantined_at = time.monotonic()
        relay.wait_settled()
        alpha = relay.sending.token_view("alpha")
        late_calls = [c for c in relay.sim.record.calls(bot_id=relay.bots["alpha"].id)
                      if c.monotonic > quarantined_at + 0.1]
        assert_nothing_lost(relay, 300)

    assert alpha.state == "failing" and not alpha.usable
    assert "token_quarantined" in [kind for kind, _ in relay.alerts]
    assert relay.metrics.count("supervisor.restarts") == 2
    assert relay.metrics.count("messages.rerouted") > 0, "its in-flight rows went to bravo"
    assert late_calls == []


def test_a_failed_balancer_is_restarted_and_claiming_resumes(tmp_path: Path) -> None:
    with running_relay(tmp_path, (1, 1)) as relay:
        relay.send_to(100, chat=lambda i: 3000 + i)
        relay.wait_settled()
        relay.sending.crash_balancer_for_test()
        relay.wait_until(lambda: relay.metrics.count("supervisor.restarts") == 1, 5,
                         "the balancer to be restarted")
        relay.send_to(100, chat=lambda i: 3000 + i, prefix="after the restart")
        relay.wait_settled()
        assert_nothing_lost(relay, 200)


def test_when_the_store_dies_sending_stops_in_order_and_the_next_start_delivers_the_rest(
        tmp_path: Path) -> None:
    with running_relay(tmp_path, (1, 1)) as relay:
        relay.sim.set_latency(20)
        relay.send_to(400, chat=lambda i: 4000 + i)
        relay.wait_until(lambda: relay.counts()["confirmed"] >= 50, 10, "some deliveries")
        relay.relay.store.actor.stop()
        relay.wait_until(lambda: "supervisor_gave_up" in [k for k, _ in relay.alerts], 5,
                         "the supervisor to give up on sending")
        relay.restart()
        relay.wait_settled()
        assert_nothing_lost(relay, 400)


def test_a_graceful_stop_lets_in_flight_sends_finish_and_releases_every_lease(
        tmp_path: Path) -> None:
    with running_relay(tmp_path, (1, 1)) as relay:
        relay.sim.set_latency(150)
        relay.send_to(200, chat=lambda i: 5000 + i)
        relay.wait_until(lambda: relay.counts()["confirmed"] >= 10, 10, "some deliveries")
        relay.relay.stop(drain_seconds=2.0)
        rows = relay.rows()
        assert all(row["lease_owner"] is None for row in rows)
        assert {row["status"] for row in rows} == {"pending", "confirmed"}
        confirmed = sum(row["status"] == "confirmed" for row in rows)
        assert confirmed == relay.sim.record.delivery_count(), "every send that left finished"
        assert sum(row["in_doubt_count"] for row in rows) == 0
        relay.restart()
        relay.wait_settled()
        assert_nothing_lost(relay, 200)
        assert relay.duplicate_copies() == 0


def test_a_stop_without_drain_time_leaves_unfinished_sends_pending_and_in_doubt(
        tmp_path: Path) -> None:
    with running_relay(tmp_path, (1,)) as relay:
        relay.sim.set_latency(500)
        relay.send_to(20, chat=lambda i: 6000 + i)
        relay.wait_until(lambda: relay.sending.token_view("alpha").in_flight > 0, 5,
                         "sends in flight")
        relay.relay.stop(drain_seconds=0.0)
        rows = relay.rows()
        assert all(row["lease_owner"] is None for row in rows)
        assert "sent" not in {row["status"] for row in rows}
        assert sum(row["in_doubt_count"] for row in rows) > 0
        relay.restart()
        relay.wait_settled()
        assert_nothing_lost(relay, 20)
