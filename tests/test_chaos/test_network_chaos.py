"""Chaos on the wire: Telegram misbehaves while a real relay process sends.

Each test drives `tgrelay run` through its HTTP API against the Bot API simulator, injects one
kind of fault while messages flow, and ends with the audit of ``harness``: nothing accepted is
lost, every confirmed message was delivered, and every duplicate is explained by a send in doubt.
"""

from __future__ import annotations

import threading
import time

import pytest

from simulator import Call
from tests.test_chaos.conftest import Scale
from tests.test_chaos.harness import ChaosRun, assert_nothing_lost

pytestmark = pytest.mark.chaos


def test_tokens_revoked_while_sending_lose_nothing_and_are_reported_revoked(
        chaos: ChaosRun, scale: Scale) -> None:
    sim = chaos.simulator
    sim.set_latency(15, jitter_ms=10)
    revoked = sim.bots[:2]
    with chaos.relay() as relay:
        timers = [threading.Timer(delay, sim.revoke, (bot,)) for delay, bot in zip((0.3, 0.8), revoked,
                                                                                    strict=True)]
        for timer in timers:
            timer.start()
        chaos.post_all(chaos.messages(scale.count(600, 4000)), size=50)
        for timer in timers:
            timer.join()
        chaos.wait_until_final(timeout=scale.pick(60, 300))
        deadline = time.monotonic() + 15
        while True:  # getMe must fail twice before a token is called revoked (they have flapped)
            states = {token["name"]: token["state"] for token in chaos.get("/v1/tokens")["tokens"]}
            if all(states[bot.username.removesuffix("_bot")] == "revoked" for bot in revoked):
                break
            assert time.monotonic() < deadline, states
            time.sleep(0.2)
        chaos.stop(relay)

    audit = chaos.audit()
    assert_nothing_lost(audit)
    assert audit.confirmed == audit.accepted
    assert "ALERT token_revoked" in chaos.logs()
    refused = {bot.id: sum(1 for call in sim.record.calls(bot_id=bot.id, method="sendMessage")
                           if call.status == 401) for bot in revoked}
    audit.notes.append(f"sends refused with 401 by the revoked tokens {sum(refused.values())}")
    assert all(refused.values()), f"each token was revoked while it was sending: {refused}"


def sends_into_a_cooldown(calls: list[Call], on_the_wire: float = 0.25, tolerance: float = 0.1
                          ) -> list[Call]:
    """Calls a bot made after a 429 told it to wait, and before the wait was over.

    Calls arriving within ``on_the_wire`` of the 429 had left before the relay could know (a
    token has several workers); ``tolerance`` absorbs the two clocks' rounding at the end.
    """
    told: dict[int | None, list[tuple[float, float]]] = {}
    early = []
    for call in calls:  # in arrival order
        for answered, until in told.get(call.bot_id, []):
            if answered + on_the_wire < call.monotonic < until - tolerance:
                early.append(call)
                break
        if call.status == 429 and call.retry_after is not None:
            told.setdefault(call.bot_id, []).append((call.monotonic, call.monotonic + call.retry_after))
    return early


def test_a_429_storm_is_waited_out_without_sending_into_the_cooldown(chaos: ChaosRun, scale: Scale) -> None:
    sim = chaos.simulator
    storm = scale.pick(3, 15)
    with chaos.relay() as relay:
        for bot in sim.bots:
            sim.flood(bot, storm)
        sim.flood(sim.bots[0], storm * 2)  # one token stays cold for longer than the others
        started = time.monotonic()
        chaos.post_all(chaos.messages(scale.count(400, 3000)))
        chaos.wait_until_final(timeout=storm * 2 + scale.pick(40, 240))
        elapsed = time.monotonic() - started
        chaos.stop(relay)

    audit = chaos.audit()
    assert_nothing_lost(audit)
    assert audit.confirmed == audit.accepted
    rate_limited = sum(sim.record.rate_limited_counts().values())
    early = sends_into_a_cooldown(sim.record.calls())
    audit.notes.append(f"429 answers {rate_limited}, requests inside a cooldown {len(early)}, "
                       f"all final after {elapsed:.1f} s")
    assert rate_limited > 0, "the storm was felt"
    assert early == [], "no request may go out before retry_after has passed"


def test_html_502s_and_connection_resets_are_retried_until_everything_is_delivered_once(
        chaos: ChaosRun, scale: Scale) -> None:
    sim = chaos.simulator
    sim.set_bad_gateway_rate(0.25)
    sim.set_reset_rate(0.10)
    with chaos.relay() as relay:
        chaos.post_all(chaos.messages(scale.count(500, 4000)))
        chaos.wait_until_final(timeout=scale.pick(60, 300))
        chaos.stop(relay)

    audit = chaos.audit()
    assert_nothing_lost(audit)
    assert audit.confirmed == audit.accepted
    faults = sum(1 for call in sim.record.calls() if call.status in (502, None))  # None: reset
    audit.notes.append(f"502s and resets injected {faults}")
    assert faults > 50
    # Neither fault delivers anything, so even the sends in doubt (resets) must not duplicate.
    assert audit.duplicates == 0


def test_messages_accepted_during_a_network_partition_wait_and_then_all_go(
        chaos: ChaosRun, scale: Scale) -> None:
    sim = chaos.simulator
    partition = 20  # seconds, as the issue asks: it fits the bounded suite's budget
    with chaos.relay() as relay:
        chaos.post_all(chaos.messages(scale.count(100, 1000)))
        sim.partition(partition)
        cut = time.monotonic()
        chaos.post_all(chaos.messages(scale.count(300, 3000)))  # accepted while Telegram is unreachable
        while time.monotonic() - cut < partition:
            time.sleep(0.2)
        healed = time.monotonic()
        chaos.wait_until_final(timeout=scale.pick(60, 300))
        recovery = time.monotonic() - healed
        chaos.stop(relay)

    audit = chaos.audit()
    assert_nothing_lost(audit)
    assert audit.confirmed == audit.accepted
    during = [d for d in sim.record.deliveries() if cut + 0.05 < d.monotonic < cut + partition - 0.05]
    audit.notes.append(f"partition {partition:g} s, everything delivered {recovery:.1f} s after it healed")
    assert during == [], "nothing gets through a partition"
    # The backoff is capped at 30 s: once the network is back, the backlog goes within that.
    assert recovery < 45


def test_sends_whose_answer_never_comes_are_resent_and_every_duplicate_was_in_doubt(
        chaos: ChaosRun, scale: Scale) -> None:
    sim = chaos.simulator
    chaos.request_timeout = 1.0
    chaos.write_config()
    sim.set_accept_then_timeout(0.15, delay_seconds=1.5)  # delivered, answered after the timeout
    with chaos.relay() as relay:
        chaos.post_all(chaos.messages(scale.count(300, 2500)))
        chaos.wait_until_final(timeout=scale.pick(60, 300))
        chaos.stop(relay)

    audit = chaos.audit()
    assert_nothing_lost(audit)
    assert audit.confirmed == audit.accepted
    delayed = sum(1 for d in sim.record.deliveries() if d.answer_delayed)
    audit.notes.append(f"answers held back past the timeout {delayed}")
    assert delayed > 0 and audit.in_doubt >= delayed
    assert audit.duplicates > 0, "at-least-once: a send in doubt is resent, so some arrive twice"
