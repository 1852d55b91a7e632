"""The balancer: smooth weighted round-robin, pull-based claiming, per-chat order."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import pytest

from actors.balancer import SmoothWeightedRoundRobin
from tests.helpers_sending import running_relay


def test_smooth_weighted_round_robin_interleaves_picks_in_proportion_to_weights() -> None:
    rr = SmoothWeightedRoundRobin()
    weights = {"a": 5.0, "b": 1.0, "c": 1.0}

    picks = [rr.pick(weights) for _ in range(14)]

    assert picks[:7] == ["a", "a", "b", "a", "c", "a", "a"]  # nginx's sequence: never bunched
    assert Counter(picks) == {"a": 10, "b": 2, "c": 2}


def test_smooth_weighted_round_robin_follows_changing_weights() -> None:
    rr = SmoothWeightedRoundRobin()
    first = Counter(rr.pick({"a": 1.0, "b": 1.0}) for _ in range(10))
    later = Counter(rr.pick({"a": 1.0, "b": 0.25}) for _ in range(50))

    assert first == {"a": 5, "b": 5}
    assert later["a"] == 40 and later["b"] == 10


@pytest.mark.slow
def test_the_share_of_each_token_roughly_follows_its_weight(tmp_path: Path) -> None:
    with running_relay(tmp_path, (3, 1)) as relay:
        relay.sim.set_latency(10)
        relay.send_to(800, chat=lambda i: 1000 + i)
        relay.wait_settled()
        sent = {name: relay.sending.token_view(name).sent for name in ("alpha", "bravo")}

    assert sent["alpha"] + sent["bravo"] == 800
    assert 2.0 <= sent["alpha"] / sent["bravo"] <= 4.5


@pytest.mark.slow
def test_the_balancer_leases_only_what_the_tokens_have_room_for(tmp_path: Path) -> None:
    with running_relay(tmp_path, (1, 1)) as relay:
        relay.sim.set_latency(30)
        relay.send_to(1500, chat=lambda i: 10_000 + i)
        room = sum(relay.sending.token_view(name).window for name in ("alpha", "bravo"))
        most_leased = 0
        stop = threading.Event()

        def sample() -> None:
            nonlocal most_leased
            while not stop.is_set():
                most_leased = max(most_leased, relay.relay.store.statistics()["in_flight"])
                stop.wait(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            relay.wait_settled(30)
        finally:
            stop.set()
            sampler.join()

    assert 0 < most_leased <= room, "a million pending rows never sit in memory"


@pytest.mark.slow
def test_messages_to_one_chat_go_out_in_the_order_they_were_accepted(tmp_path: Path) -> None:
    with running_relay(tmp_path, (1, 1, 1)) as relay:
        relay.sim.set_latency(2)
        relay.send([{"chat_id": 500 + i % 10, "text": f"chat {500 + i % 10} #{i // 10}"}
                    for i in range(300)])
        relay.wait_settled()
        by_chat = {chat: relay.sim.record.delivered_texts(chat_id=chat) for chat in range(500, 510)}
        tokens_per_chat = {chat: {d.bot_id for d in relay.sim.record.deliveries(chat_id=chat)}
                           for chat in range(500, 510)}

    for chat, texts in by_chat.items():
        assert texts == [f"chat {chat} #{n}" for n in range(30)]
    assert any(len(bots) > 1 for bots in tokens_per_chat.values()), "order holds across tokens"
