"""Deduplication: sliding windows, keys, TTL, restarts, concurrency and volume."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from actors.dedup import AdmitMessages, DeduplicatorActor, fingerprint
from actors.errors import DedupConflict
from actors.messages import AcceptMessages, Housekeep, OutgoingMessage
from supervision import RelaySystem


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def accept_at(store, clock: FakeClock, at: float, message: OutgoingMessage, window: float = 300.0):  # type: ignore[no-untyped-def]
    clock.now = at
    (receipt,) = store.call(AcceptMessages(((message, fingerprint(message, window, 86400.0)),)))
    return receipt


def test_a_pair_straddling_a_fixed_bucket_edge_is_still_a_duplicate(store_factory) -> None:
    clock = FakeClock()
    store = store_factory(clock=clock)
    edge = 300.0 * 10_000  # a multiple of the window: where a fixed bucket would end
    message = OutgoingMessage(42, "straddle", "default")
    first = accept_at(store, clock, edge - 0.1, message)
    second = accept_at(store, clock, edge + 0.1, message)
    assert second.duplicate and second.id == first.id


def test_the_window_slides_from_the_first_message(store_factory) -> None:
    clock = FakeClock()
    store = store_factory(clock=clock)
    message = OutgoingMessage(42, "again", "default")
    first = accept_at(store, clock, 1000.0, message)
    assert accept_at(store, clock, 1299.9, message).duplicate
    later = accept_at(store, clock, 1300.1, message)
    assert not later.duplicate and later.id != first.id


def test_a_dedup_key_holds_for_the_ttl_and_then_expires(store_factory) -> None:
    clock = FakeClock()
    store = store_factory(clock=clock, dedup_ttl_seconds=3600.0)
    message = OutgoingMessage(42, "keyed", "default", dedup_key="invoice-1")
    first = accept_at(store, clock, 1000.0, message)
    assert accept_at(store, clock, 1000.0 + 3599, message).duplicate
    store.call(Housekeep(now=1000.0 + 3601))
    assert not accept_at(store, clock, 1000.0 + 3601, message).duplicate
    assert first.id


def test_chat_usernames_are_compared_case_insensitively() -> None:
    upper = fingerprint(OutgoingMessage("@News_Room", "t", "default"), 300, 86400)
    lower = fingerprint(OutgoingMessage("@news_room", "t", "default"), 300, 86400)
    assert upper.hash == lower.hash


def test_different_texts_or_chats_are_not_duplicates() -> None:
    base = fingerprint(OutgoingMessage(1, "t", "default"), 300, 86400).hash
    assert fingerprint(OutgoingMessage(2, "t", "default"), 300, 86400).hash != base
    assert fingerprint(OutgoingMessage(1, "t ", "default"), 300, 86400).hash != base


def test_the_memory_front_refuses_a_key_conflict_before_any_database_work(store) -> None:  # type: ignore[no-untyped-def]
    clock = FakeClock()
    dedup = DeduplicatorActor.start(300.0, 86400.0, store.submit, clock)

    def admit(*messages: OutgoingMessage) -> list:
        command = AdmitMessages(messages)
        dedup.tell(command)
        return command.reply.result(timeout=10)

    keyed = OutgoingMessage(1, "a", "default", dedup_key="k")
    (original,) = admit(keyed)
    (again,) = admit(keyed)
    assert again.duplicate and again.id == original.id
    (conflict,) = admit(OutgoingMessage(1, "b", "default", dedup_key="k"))
    assert isinstance(conflict, DedupConflict) and conflict.original_id == original.id
    assert dedup.proxy().statistics().get()["conflicts_at_front"] == 1
    clock.now += 86401
    (conflict_in_store,) = admit(OutgoingMessage(1, "b", "default", dedup_key="k"))
    assert isinstance(conflict_in_store, DedupConflict), "the store still knows the key"


@pytest.fixture
def relay(make_config):  # type: ignore[no-untyped-def]
    with RelaySystem.start(make_config(), send=False) as running:
        yield running


def test_a_restart_keeps_the_dedup_cache(make_config) -> None:
    config = make_config()
    with RelaySystem.start(config, send=False) as relay:
        keyed = relay.send(chat_id=5, text="once", dedup_key="k-5")
        content = relay.send(chat_id=6, text="by content")
    with RelaySystem.start(config, send=False) as relay:
        keyed_again = relay.send(chat_id=5, text="once", dedup_key="k-5")
        content_again = relay.send(chat_id=6, text="by content")
    assert keyed_again.duplicate and keyed_again.id == keyed.id
    assert content_again.duplicate and content_again.id == content.id


def test_a_dedup_key_replaces_content_identity(relay: RelaySystem) -> None:
    keyed = relay.send(chat_id=5, text="same text", dedup_key="first")
    other_key = relay.send(chat_id=5, text="same text", dedup_key="second")
    assert not other_key.duplicate and other_key.id != keyed.id


def test_identical_messages_from_many_threads_are_accepted_exactly_once(relay: RelaySystem) -> None:
    receipts = []
    barrier = threading.Barrier(32)

    def submit() -> None:
        barrier.wait()
        receipts.append(relay.send(chat_id=77, text="the same message"))

    threads = [threading.Thread(target=submit) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(not receipt.duplicate for receipt in receipts) == 1
    assert len({receipt.id for receipt in receipts}) == 1
    assert relay.stats()["counts"]["pending"] == 1


def test_ten_thousand_messages_sent_twice_are_each_stored_once(relay: RelaySystem) -> None:
    batch = [{"chat_id": index + 1, "text": f"bulk {index}"} for index in range(1000)]
    first_ids = []
    for start in range(0, 10_000, 1000):
        batch = [{"chat_id": index + 1, "text": f"bulk {index}"} for index in range(start, start + 1000)]
        first_ids += [receipt.id for receipt in relay.send_many(batch)]
    second = []
    for start in range(0, 10_000, 1000):
        batch = [{"chat_id": index + 1, "text": f"bulk {index}"} for index in range(start, start + 1000)]
        second += relay.send_many(batch)
    assert len(set(first_ids)) == 10_000
    assert all(receipt.duplicate for receipt in second)
    assert [receipt.id for receipt in second] == first_ids
    assert relay.stats()["counts"]["pending"] == 10_000


def test_reusing_a_dedup_key_for_another_payload_is_rejected(relay: RelaySystem) -> None:
    original = relay.send(chat_id=1, text="first", dedup_key="order-42")
    with pytest.raises(DedupConflict, match="order-42") as raised:
        relay.send(chat_id=1, text="second", dedup_key="order-42")
    assert raised.value.original_id == original.id
    assert relay.stats()["counts"]["pending"] == 1


def test_a_duplicate_reports_the_originals_current_status(relay: RelaySystem, tmp_path: Path) -> None:
    from actors.messages import ClaimDue, ConfirmSent

    original = relay.send(chat_id=9, text="status please")
    relay.store.call(ClaimDue("default", ("alpha",)))
    relay.store.call(ConfirmSent(original.id, 1234, "alpha"))
    again = relay.send(chat_id=9, text="status please")
    assert (again.id, again.status, again.duplicate) == (original.id, "confirmed", True)


def test_a_text_that_is_not_valid_unicode_is_refused_and_the_relay_goes_on(relay: RelaySystem) -> None:
    from actors.errors import InvalidMessage

    with pytest.raises(InvalidMessage, match="surrogate"):
        relay.send(chat_id=1, text="broken \ud800 text")
    assert relay.send(chat_id=1, text="fine").duplicate is False
    assert relay.healthy()


def test_an_embedded_batch_over_a_thousand_is_refused_whole_with_a_reason(relay: RelaySystem) -> None:
    from actors.errors import InvalidMessage

    with pytest.raises(InvalidMessage, match="at most 1000"):
        relay.send_many({"chat_id": index + 1, "text": "x"} for index in range(1001))
    assert relay.stats()["counts"]["pending"] == 0
