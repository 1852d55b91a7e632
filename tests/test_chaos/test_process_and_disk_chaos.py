"""Chaos in the relay's own process and disk: SIGKILL, a damaged database file, a full database.

Same harness and audit as the network scenarios; here the relay process itself is the victim.
"""

from __future__ import annotations

import random
import re
import threading
import time
from pathlib import Path

import apsw
import pytest

from tests.helpers_http import RelayProcess
from tests.test_chaos.conftest import Scale
from tests.test_chaos.harness import ChaosRun, Posted, RelayGone, assert_nothing_lost

pytestmark = pytest.mark.chaos

SEED = 20261204
PAGE = 4096
RECOVERED = re.compile(r"RECOVERED database_corruption: .* recovered ([0-9]+) message rows")


def send_until_killed(chaos: ChaosRun, relay: RelayProcess, rng: random.Random,
                      unacknowledged: list[list[dict]]) -> None:
    """POST batches of random sizes until the relay dies; a batch cut off stays unacknowledged."""
    while relay.process.poll() is None:
        batch = chaos.messages(rng.randint(5, 30))
        try:
            posted = chaos.post(batch, timeout=30)
        except RelayGone:
            unacknowledged.append(batch)
            return
        assert posted.status == 200, posted.body
        time.sleep(rng.uniform(0.01, 0.1))


def test_a_relay_sigkilled_at_random_moments_loses_nothing_it_accepted(chaos: ChaosRun, scale: Scale) -> None:
    rng = random.Random(SEED)
    sim = chaos.simulator
    sim.set_latency(30, jitter_ms=30)
    unacknowledged: list[list[dict]] = []
    kills = scale.count(5, 15)
    delivered_at_kill = []
    for _ in range(kills):
        with chaos.relay() as relay:
            killer = threading.Timer(rng.uniform(0.3, 2.5), chaos.kill, (relay,))
            killer.start()
            send_until_killed(chaos, relay, rng, unacknowledged)
            killer.join()
            delivered_at_kill.append(sim.record.delivery_count())
    with chaos.relay() as relay:
        for batch in unacknowledged:  # the caller's retry: what did commit comes back a duplicate
            posted = chaos.post(batch)
            assert posted.status == 200 and None not in posted.ids, posted.body
        chaos.post_all(chaos.messages(100))
        chaos.wait_until_final(timeout=scale.pick(60, 300))
        chaos.stop(relay)

    audit = chaos.audit()
    assert_nothing_lost(audit)
    assert audit.confirmed == audit.accepted
    audit.notes.append(f"seed {SEED}, {kills} SIGKILLs with {delivered_at_kill} delivered at each, "
                       f"{len(unacknowledged)} batches cut off and resent")
    assert audit.in_doubt > 0, "some kills came while sends were in flight"


def damage_a_table_page(database: Path, which: str) -> None:
    """Overwrite one leaf page of message_store (in key order: "middle" or "last") with noise."""
    assert not Path(f"{database}-wal").exists(), "the clean stop checkpointed the WAL"
    db = apsw.Connection(str(database), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        leaves = [row[0] for row in db.execute(
            "SELECT pageno FROM dbstat WHERE name = 'message_store' AND pagetype = 'leaf' "
            "ORDER BY path")]  # a page's path in the b-tree: its place in id order
    finally:
        db.close()
    page = leaves[len(leaves) // 2] if which == "middle" else leaves[-1]
    with database.open("r+b") as file:
        file.seek((page - 1) * PAGE)  # pages are numbered from 1
        file.write(random.Random(SEED).randbytes(PAGE))


def test_a_database_damaged_while_stopped_is_recovered_and_every_readable_message_ends_final(
        chaos: ChaosRun, scale: Scale) -> None:
    sim = chaos.simulator
    sim.set_latency(20)
    chaos.max_per_second = 25
    chaos.write_config()
    with chaos.relay() as relay:
        chaos.post_all(chaos.messages(scale.count(800, 6000)))
        while sim.record.delivery_count() < 200:
            time.sleep(0.05)
        chaos.stop(relay)  # mid-way: part delivered, the rest pending
    damage_a_table_page(chaos.database, "middle")
    delivered_before = {d.text for d in sim.record.deliveries()}

    with chaos.relay() as relay:
        assert "ALERT database_corruption" in relay.log()
        assert list(chaos.directory.glob("relay.db.corrupt-*")), "the damaged file is kept aside"
        chaos.post_all(chaos.messages(100))  # it keeps accepting
        chaos.wait_until_final(timeout=scale.pick(90, 400))
        # The store's report (rows recovered, file kept) comes with the all-clear, once the
        # monitor (every 10 s) sees the fresh file pass its integrity check.
        deadline = time.monotonic() + 15
        while not (recovered := RECOVERED.search(relay.log())):
            assert time.monotonic() < deadline, relay.log()[-3000:]
            time.sleep(0.2)
        chaos.stop(relay)

    present = set(chaos.rows())
    destroyed = {i for i in chaos.accepted if i not in present}
    audit = chaos.audit(destroyed=destroyed)
    assert_nothing_lost(audit)
    assert audit.confirmed == audit.accepted - len(destroyed)
    assert 0 < len(destroyed) < 100, "one damaged page holds a few dozen rows, not everything"
    already_delivered = sum(1 for i in destroyed if chaos.accepted[i] in delivered_before)
    audit.notes.append(f"rows recovered {recovered.group(1)}, destroyed {len(destroyed)} "
                       f"({already_delivered} of them delivered before the damage)")


def accept_undelivered_then_damage(chaos: ChaosRun, which: str) -> None:
    """300 messages accepted while Telegram is unreachable, a clean stop, one page destroyed."""
    chaos.simulator.partition(3600)
    with chaos.relay() as relay:
        chaos.post_all(chaos.messages(300))
        chaos.stop(relay)
    chaos.simulator.partition(0)
    damage_a_table_page(chaos.database, which)


def test_a_database_whose_last_table_page_is_damaged_is_recovered_too(chaos: ChaosRun) -> None:
    accept_undelivered_then_damage(chaos, "last")

    with chaos.relay() as relay:
        chaos.wait_until_final(timeout=60)
        chaos.stop(relay)

    present = set(chaos.rows())
    assert_nothing_lost(chaos.audit(destroyed={i for i in chaos.accepted if i not in present}))


def test_a_message_destroyed_with_its_page_can_be_sent_again(chaos: ChaosRun) -> None:
    accept_undelivered_then_damage(chaos, "middle")

    with chaos.relay() as relay:
        present = set(chaos.rows())
        destroyed = [i for i in chaos.accepted if i not in present]
        assert destroyed
        again = chaos.post([chaos.bodies[chaos.accepted[i]] for i in destroyed])
        chaos.stop(relay)

    assert again.status == 200
    assert [result["http_status"] for result in again.body["results"]] == [202] * len(destroyed)


def test_a_full_database_answers_503_loses_nothing_and_sending_resumes_once_it_has_room(
        chaos: ChaosRun, scale: Scale) -> None:
    chaos.write_config(store_extra="max_db_megabytes = 1")
    refused: list[Posted] = []
    with chaos.relay() as relay:
        while True:  # fill it, in small batches, then one by one
            posted = chaos.post(chaos.messages(10))
            if posted.status != 200:
                break
        while len(refused) < 5:
            posted = chaos.post(chaos.messages(1))
            if posted.status == 503:
                refused.append(posted)
        full_at = len(chaos.accepted)
        healthy_while_full = chaos.session.get(f"{chaos.url}/healthz", timeout=10).status_code
        time.sleep(scale.pick(5, 30))
        confirmed_while_full = chaos.get("/v1/stats")["counts"]["confirmed"]
        assert chaos.post(chaos.messages(1)).status == 503, "still full"
        chaos.stop(relay)

    for answer in refused:
        assert "full" in answer.body["error"], answer.body
        assert answer.headers["Retry-After"].isdigit()
    chaos.write_config(store_extra="max_db_megabytes = 64")  # the disk has room again
    with chaos.relay() as relay:
        chaos.post_all(chaos.messages(scale.count(200, 2000)))
        chaos.wait_until_final(timeout=scale.pick(60, 300))
        chaos.stop(relay)

    audit = chaos.audit()
    assert_nothing_lost(audit)
    assert audit.confirmed == audit.accepted
    assert full_at > 50
    audit.notes.append(f"full after {full_at} messages; while full: /healthz {healthy_while_full}, "
                       f"{confirmed_while_full} confirmed")
