"""The store contract: every lifecycle operation, as any backend must honour it.

Each test runs against every backend the ``store_factory`` fixture lists (today SQLite), so a
second backend is proven by the same suite.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from pathlib import Path

import apsw
import pytest

from actors.errors import DedupConflict, MessageNotFound, StoreUnavailable
from actors.messages import (
    AcceptMessages,
    ClaimDue,
    ConfirmSent,
    DedupProbe,
    FailMessage,
    GetMessage,
    Housekeep,
    MarkSent,
    OutgoingMessage,
    Receipt,
    ReleaseLeases,
    ReleaseMessage,
)
from actors.store import SCHEMA_VERSION, StoreClient


def message(chat_id: int | str = 42, text: str = "hello", pool: str = "default") -> OutgoingMessage:
    return OutgoingMessage(chat_id, text, pool)


def probe(key: str, payload: str = "p", window: float = 300.0, dedup_key: str | None = None) -> DedupProbe:
    return DedupProbe(key, payload, window, dedup_key)


def accept(store: StoreClient, *items: tuple[OutgoingMessage, DedupProbe]) -> list:
    return store.call(AcceptMessages(tuple(items)))


def accept_one(store: StoreClient, chat_id: int | str = 42, text: str = "hello", pool: str = "default") -> int:
    (receipt,) = accept(store, (message(chat_id, text, pool), probe(f"{chat_id}/{text}/{pool}")))
    return receipt.id


class RecordingMetrics:
    def __init__(self) -> None:
        self.timings: list[tuple[str, float]] = []
        self.counters: list[tuple[str, int]] = []

    def incr(self, name: str, count: int = 1) -> None:
        self.counters.append((name, count))

    def timing(self, name: str, milliseconds: float) -> None:
        self.timings.append((name, milliseconds))

    def gauge(self, name: str, value: float) -> None:
        pass


def test_accepted_message_is_stored_pending_with_its_fields(store: StoreClient) -> None:
    message_id = accept_one(store, chat_id="@news_channel", text="héllo ✓")
    stored = store.get(message_id)
    assert (stored.status, stored.chat_id, stored.text, stored.pool) == (
        "pending", "@news_channel", "héllo ✓", "default")
    assert stored.retry_count == 0 and stored.telegram_message_id is None


def test_second_message_with_same_hash_inside_window_gets_the_original_id(store: StoreClient) -> None:
    first, second = accept(store, (message(), probe("h")), (message(), probe("h")))
    assert first == Receipt(first.id, "pending", duplicate=False)
    assert second == Receipt(first.id, "pending", duplicate=True)
    assert store.statistics()["counts"]["pending"] == 1


def test_reused_dedup_key_with_other_payload_is_a_conflict_and_spares_the_batch(store: StoreClient) -> None:
    (original,) = accept(store, (message(1, "a"), probe("k", "payload-a", dedup_key="order-7")))
    conflict, other = accept(store, (message(1, "b"), probe("k", "payload-b", dedup_key="order-7")),
                             (message(2, "c"), probe("other")))
    assert isinstance(conflict, DedupConflict) and conflict.original_id == original.id
    assert isinstance(other, Receipt) and not other.duplicate


def test_group_commit_answers_every_waiting_caller_in_few_transactions(store_factory) -> None:
    metrics = RecordingMetrics()
    store = store_factory(metrics=metrics)
    futures: list[Future] = []
    lock = threading.Lock()

    def submit(worker: int) -> None:
        for index in range(100):
            command = AcceptMessages(((message(worker * 1000 + index), probe(f"{worker}-{index}")),))
            with lock:
                futures.append(store.submit(command))

    threads = [threading.Thread(target=submit, args=(worker,)) for worker in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ids = {future.result(timeout=30)[0].id for future in futures}
    assert len(ids) == 800
    commits = [ms for name, ms in metrics.timings if name == "store.txn"]
    assert len(commits) < 800, "every caller was answered, with fewer commits than callers"


def test_a_failing_command_is_rolled_back_whole_and_spares_the_others(store: StoreClient) -> None:
    good = store.submit(AcceptMessages(((message(1, "kept"), probe("kept")),)))
    bad = store.submit(AcceptMessages(((message(2, "half"), probe("half")),
                                       (OutgoingMessage(None, "x", "default"), probe("broken")))))  # type: ignore[arg-type]
    assert good.result(timeout=10)[0].duplicate is False
    with pytest.raises(apsw.ConstraintError):
        bad.result(timeout=10)
    assert store.statistics()["counts"]["pending"] == 1
    (again,) = accept(store, (message(2, "half"), probe("half")))
    assert not again.duplicate, "the rolled-back command left no dedup row behind"


def test_claim_leases_due_rows_oldest_first_one_per_owner(store: StoreClient) -> None:
    ids = [accept_one(store, chat_id=chat) for chat in (10, 11, 12, 13)]
    claimed = store.call(ClaimDue("default", ("alpha", "beta", "alpha")))
    assert [c.id for c in claimed] == ids[:3]
    assert [c.owner for c in claimed] == ["alpha", "beta", "alpha"]
    assert store.get(ids[1]).token == "beta"
    assert [c.id for c in store.call(ClaimDue("default", ("alpha", "beta")))] == [ids[3]]


def test_claim_keeps_one_message_per_chat_in_flight_in_accepted_order(store: StoreClient) -> None:
    first = accept_one(store, chat_id=7, text="one")
    second = accept_one(store, chat_id=7, text="two")
    other = accept_one(store, chat_id=8, text="three")
    assert [c.id for c in store.call(ClaimDue("default", ("a", "a", "a")))] == [first, other]
    store.call(MarkSent((first,), "a"))
    store.call(ConfirmSent(first, 501, "a"))
    assert [c.id for c in store.call(ClaimDue("default", ("a",)))] == [second]


def test_claim_only_takes_rows_of_its_pool_that_are_due(store: StoreClient) -> None:
    delayed = accept_one(store, chat_id=1)
    accept_one(store, chat_id=2, pool="ops")
    (row,) = store.call(ClaimDue("default", ("a",)))
    store.call(ReleaseMessage(row.id, delay_seconds=60, error="502 Bad Gateway"))
    assert store.call(ClaimDue("default", ("a", "a"))) == []
    assert store.get(delayed).retry_count == 1


def test_mark_sent_only_marks_rows_still_leased_to_that_token(store: StoreClient) -> None:
    message_id = accept_one(store)
    store.call(ClaimDue("default", ("alpha",)))
    assert store.call(MarkSent((message_id,), "beta")) == []
    assert store.call(ReleaseLeases("alpha")) == 1
    store.call(ClaimDue("default", ("beta",)))
    assert store.call(MarkSent((message_id,), "alpha")) == [], "a rerouted row is fenced off"
    assert store.call(MarkSent((message_id,), "beta")) == [message_id]
    assert store.get(message_id).status == "sent"


def test_confirm_records_the_telegram_message_id_once(store: StoreClient) -> None:
    message_id = accept_one(store)
    store.call(ClaimDue("default", ("alpha",)))
    store.call(MarkSent((message_id,), "alpha"))
    assert store.call(ConfirmSent(message_id, 9001, "alpha")) is True
    assert store.call(ConfirmSent(message_id, 9002, "beta")) is False
    stored = store.get(message_id)
    assert (stored.status, stored.telegram_message_id, stored.token) == ("confirmed", 9001, "alpha")
    assert store.statistics()["in_flight"] == 0


def test_fail_records_the_reason_and_never_overrides_a_confirmation(store: StoreClient) -> None:
    failed, confirmed = accept_one(store, chat_id=1), accept_one(store, chat_id=2)
    assert store.call(FailMessage(failed, "Bad Request: chat not found", "alpha")) is True
    store.call(ConfirmSent(confirmed, 5, "alpha"))
    assert store.call(FailMessage(confirmed, "late error")) is False
    assert store.get(failed).last_error == "Bad Request: chat not found"
    assert store.get(confirmed).status == "confirmed"


def test_release_counts_the_retry_and_can_rewrite_the_chat(store: StoreClient) -> None:
    message_id = accept_one(store, chat_id=-123)
    store.call(ClaimDue("default", ("alpha",)))
    store.call(ReleaseMessage(message_id, 0, "group upgraded", count_retry=False, new_chat_id=-100123))
    store.call(ReleaseMessage(message_id, 0, "read timeout", in_doubt=True))
    stored = store.get(message_id)
    assert (stored.chat_id, stored.retry_count, stored.in_doubt_count, stored.status) == (
        -100123, 1, 1, "pending")
    assert stored.last_error == "read timeout"


def test_release_leases_returns_a_tokens_rows_and_counts_sent_ones_in_doubt(store: StoreClient) -> None:
    sent, leased = accept_one(store, chat_id=1), accept_one(store, chat_id=2)
    store.call(ClaimDue("default", ("alpha", "alpha")))
    store.call(MarkSent((sent,), "alpha"))
    assert store.call(ReleaseLeases("alpha")) == 2
    assert store.get(sent).in_doubt_count == 1 and store.get(leased).in_doubt_count == 0
    assert store.statistics()["counts"]["pending"] == 2


def test_restart_resumes_unfinished_rows_and_counts_sent_ones_in_doubt(store_factory) -> None:
    store = store_factory()
    sent, leased, done = (accept_one(store, chat_id=chat) for chat in (1, 2, 3))
    store.call(ClaimDue("default", ("alpha", "alpha", "alpha")))
    store.call(MarkSent((sent, done), "alpha"))
    store.call(ConfirmSent(done, 77, "alpha"))
    store.actor.stop()
    restarted = store_factory()
    report = restarted.statistics()["recovered_at_start"]
    assert report == {"in_doubt": 1, "released_leases": 1, "pending": 2}
    assert restarted.get(sent).status == "pending" and restarted.get(sent).in_doubt_count == 1
    assert restarted.get(leased).status == "pending" and restarted.get(leased).in_doubt_count == 0
    assert restarted.get(done).status == "confirmed"
    assert len(restarted.call(ClaimDue("default", ("beta", "beta")))) == 2


def test_housekeeping_archives_old_final_rows_and_expires_the_dedup_cache(store: StoreClient, tmp_path: Path) -> None:
    old = accept_one(store, chat_id=1)
    store.call(ConfirmSent(old, 1, "alpha"))
    still_pending = accept_one(store, chat_id=2)
    far_future = 10**10
    assert store.call(Housekeep(now=far_future)) == {"archived": 1, "expired": 2}
    with pytest.raises(MessageNotFound):
        store.get(old)
    assert store.get(still_pending).status == "pending"
    archive = apsw.Connection(str(tmp_path / "archive.db"))
    assert archive.execute("SELECT id, status FROM message_store").fetchall() == [(old, "confirmed")]


def test_housekeeping_deletes_old_rows_when_no_archive_is_configured(store_factory) -> None:
    store = store_factory(archive_path="")
    old = accept_one(store)
    store.call(FailMessage(old, "chat not found"))
    assert store.call(Housekeep(now=10**10))["archived"] == 1
    with pytest.raises(MessageNotFound):
        store.call(GetMessage(old))


def test_schema_has_a_version_and_a_newer_one_is_refused(store_factory, tmp_path: Path) -> None:
    store = store_factory()
    store.actor.stop()
    db = apsw.Connection(str(tmp_path / "store.db"))
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StoreUnavailable, match="newer than this tgrelay"):
        store_factory()


def test_a_full_database_refuses_with_a_clear_error_and_keeps_what_it_accepted(store_factory, alerts) -> None:
    store = store_factory(max_db_bytes=320 * 1024)
    acknowledged: dict[int, str] = {}
    with pytest.raises(StoreUnavailable, match="full"):
        for index in range(100_000):
            text = f"{index} " + "x" * 1000
            acknowledged[accept_one(store, chat_id=index + 1, text=text)] = text
    assert len(acknowledged) > 10
    assert "persistence" in alerts.kinds()
    for message_id, text in acknowledged.items():
        assert store.get(message_id).text == text
    assert store.statistics()["counts"]["pending"] == len(acknowledged)
    first = next(iter(acknowledged))
    (claimed,) = store.call(ClaimDue("default", ("alpha",)))
    assert store.call(MarkSent((claimed.id,), "alpha")) == [claimed.id]
    assert store.call(ConfirmSent(claimed.id, 1, "alpha")), "status updates still fit at the cap"
    assert first in acknowledged
    for message_id in list(acknowledged)[:50]:
        store.call(FailMessage(message_id, "test cleanup"))
    store.call(Housekeep(now=10**10))
    accept_one(store, chat_id=999_999, text="accepted again once space was freed")


def test_a_locked_database_gives_a_clear_error_not_a_hang(store_factory, tmp_path: Path) -> None:
    store = store_factory(busy_timeout_ms=200)
    accept_one(store, chat_id=1)
    other = apsw.Connection(str(tmp_path / "store.db"))
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreUnavailable, match="locked"):
            accept_one(store, chat_id=2)
    finally:
        other.execute("ROLLBACK")
    assert accept_one(store, chat_id=3) > 0
