"""A damaged database file is detected, alerted, moved aside and recovered; accepting goes on."""

from __future__ import annotations

import os
from pathlib import Path

import apsw

from actors.messages import AcceptMessages, CheckIntegrity, DedupProbe, OutgoingMessage

PAGE = 4096


def fill(store, count: int) -> None:  # type: ignore[no-untyped-def]
    items = tuple((OutgoingMessage(index + 1, f"message {index} " + "x" * 80, "default"),
                   DedupProbe(f"hash-{index}", "p", 300)) for index in range(count))
    store.call(AcceptMessages(items))


def damage_pages(path: Path, first_page_index: int, pages: int) -> None:
    with path.open("r+b") as file:
        file.seek(first_page_index * PAGE)
        file.write(os.urandom(pages * PAGE))


def test_damaged_file_is_detected_at_start_moved_aside_and_recovered(store_factory, alerts, tmp_path: Path) -> None:
    store = store_factory()
    fill(store, 3000)
    store.actor.stop()
    database = tmp_path / "store.db"
    assert not Path(f"{database}-wal").exists(), "closing checkpointed everything into the file"
    inspect = apsw.Connection(str(database))
    leaves = [row[0] for row in inspect.execute(
        "SELECT pageno FROM dbstat WHERE name = 'message_store' AND pagetype = 'leaf' ORDER BY pageno")]
    inspect.close()
    damage_pages(database, leaves[len(leaves) // 2] - 1, 1)  # pages are numbered from 1

    recovered = store_factory()

    assert "database_corruption" in alerts.kinds()
    aside = [path for path in tmp_path.iterdir() if ".corrupt-" in path.name]
    assert aside, "the damaged file is kept for inspection"
    counts = recovered.statistics()["counts"]
    assert 2000 <= counts["pending"] < 3000, "rows on the damaged pages are gone, the rest are back"
    assert recovered.call(CheckIntegrity()) is True
    (receipt,) = recovered.call(AcceptMessages(((OutgoingMessage(5, "after recovery", "default"),
                                                 DedupProbe("fresh", "p", 300)),)))
    assert recovered.get(receipt.id).text == "after recovery"


def test_a_file_that_is_not_a_database_is_replaced_by_a_fresh_one(store_factory, alerts, tmp_path: Path) -> None:
    (tmp_path / "store.db").write_bytes(b"this is not an SQLite database" * 200)
    store = store_factory()
    assert "database_corruption" in alerts.kinds()
    assert store.statistics()["counts"]["pending"] == 0
    fill(store, 3)
    assert store.statistics()["counts"]["pending"] == 3


def test_scheduled_integrity_check_passes_on_a_healthy_database(store, tmp_path: Path) -> None:
    fill(store, 10)
    assert store.call(CheckIntegrity()) is True
    assert store.statistics()["last_integrity_check"]["ok"] is True
    assert apsw.Connection(str(tmp_path / "store.db")).execute("PRAGMA quick_check").fetchall() == [("ok",)]
