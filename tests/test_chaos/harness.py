"""The chaos harness: a real `tgrelay run` process, the Bot API simulator in this test process, and
an audit that settles, message by message, what callers were told against what the database
holds and what the simulator delivered.

The audit's rules (CONTRACT.md, "Database"; DESIGN.md 3):

* every accepted id still has its row (unless the test names it as destroyed) and the row is
  final: ``confirmed`` or ``failed``; every row of the database is final too;
* a confirmed message was delivered: the simulator saw its exact text in its chat, and the row's
  ``telegram_message_id`` is one the simulator answered for that text;
* a failed message failed for a reason the scenario allows (by default none may fail);
* a message delivered ``n`` times had at least ``n - 1`` sends in doubt (``in_doubt_count``):
  every duplicate is explained by a send whose outcome the relay could not know.
"""

from __future__ import annotations

import re
import signal
import time
from collections import defaultdict
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import apsw
import requests

from simulator import BotApiSimulator
from tests.helpers_http import API_TOKEN, RelayProcess, cli_command, free_port, relay_process

AUDITS: list[Audit] = []  # every audited run, summed up in the terminal summary
FINAL = ("confirmed", "failed")
FILLER = "·" * 60  # longer rows: more database pages, so damage and a size cap bite sooner


class RelayGone(Exception):
    """The relay did not answer: killed, or not listening (yet)."""


@dataclass(frozen=True)
class Posted:
    """The answer to one batch: HTTP status, and per message the id it was accepted under."""

    status: int
    ids: list[int | None]
    body: Any
    headers: Mapping[str, str]


@dataclass
class Audit:
    name: str
    accepted: int = 0
    confirmed: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    destroyed: int = 0
    lost: list[int] = field(default_factory=list)
    not_final: list[int] = field(default_factory=list)
    confirmed_not_delivered: list[int] = field(default_factory=list)
    wrong_message_id: list[int] = field(default_factory=list)
    unexpected_failures: list[int] = field(default_factory=list)
    unexplained_duplicates: list[int] = field(default_factory=list)
    duplicates: int = 0  # extra deliveries of accepted messages
    in_doubt: int = 0  # sends in doubt over all rows (in_doubt_count)
    rows: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def problems(self) -> dict[str, list[int]]:
        found = {"lost": self.lost, "not final": self.not_final,
                 "confirmed but never delivered": self.confirmed_not_delivered,
                 "confirmed with a message id the simulator never gave": self.wrong_message_id,
                 "failed for a reason the scenario does not allow": self.unexpected_failures,
                 "delivered more often than its sends in doubt explain": self.unexplained_duplicates}
        return {name: ids[:20] for name, ids in found.items() if ids}

    def summary(self) -> str:
        failed = sum(self.failed.values())
        line = (f"{self.name}: accepted {self.accepted}, confirmed {self.confirmed}, failed {failed}, "
                f"lost {len(self.lost)}, duplicates {self.duplicates} (sends in doubt {self.in_doubt})")
        if self.destroyed:
            line += f", destroyed with their database pages {self.destroyed}"
        return "; ".join([line, *self.notes])


class ChaosRun:
    """One scenario: its directory, config, simulator, relay processes and the accepted ids."""

    def __init__(self, name: str, directory: Path, simulator: BotApiSimulator, *,
                 request_timeout: float = 2.0, max_per_second: int = 100) -> None:
        self.name = name
        self.directory = directory
        self.simulator = simulator
        self.request_timeout = request_timeout
        self.max_per_second = max_per_second
        self.port = free_port()
        self.accepted: dict[int, str] = {}  # id -> text, for every id a caller was given
        self.bodies: dict[str, dict[str, Any]] = {}  # text -> the message posted
        self.database = directory / "relay.db"
        self.config = directory / "tgrelay.toml"
        self._numbered = 0
        self._starts = 0
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {API_TOKEN}"
        self.write_config()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_config(self, store_extra: str = "") -> None:
        tokens = "".join(
            f'[[pools.default.tokens]]\nname = "{bot.username.removesuffix("_bot")}"\n'
            f'token = "{bot.token}"\nmax_per_second = {self.max_per_second}\n'
            for bot in self.simulator.bots)
        self.config.write_text(f'''
[store]
path = "{self.database}"
archive_path = ""
synchronous = "normal"
{store_extra}

[telegram]
api_base_url = "{self.simulator.url}"
request_timeout_seconds = {self.request_timeout}

[http]
listen = "127.0.0.1:{self.port}"
auth_token = "{API_TOKEN}"

[pools.default]
{tokens}''', encoding="utf-8")

    @contextmanager
    def relay(self) -> Iterator[RelayProcess]:
        """A `tgrelay run` process; SIGKILLed if the block leaves it running."""
        self._starts += 1
        command = cli_command("run", "-c", str(self.config), "--drain-seconds", "2")
        with relay_process(command, self.directory / f"relay-{self._starts}.log", timeout=60) as process:
            yield process

    def logs(self) -> str:
        return "".join(path.read_text(encoding="utf-8", errors="replace")
                       for path in sorted(self.directory.glob("relay-*.log")))

    def stop(self, process: RelayProcess) -> None:
        """SIGTERM: the relay drains, releases its leases and exits 0."""
        assert process.terminate(timeout=30) == 0, process.log()[-3000:]

    @staticmethod
    def kill(process: RelayProcess) -> None:
        process.process.send_signal(signal.SIGKILL)
        process.process.wait(10)

    # --- callers ------------------------------------------------------------------------------

    def messages(self, count: int) -> list[dict[str, Any]]:
        """New messages, each to a chat of its own (Telegram allows one message a second per chat)."""
        batch: list[dict[str, Any]] = []
        for number in range(self._numbered, self._numbered + count):
            text = f"{self.name} {number} {FILLER}"
            batch.append({"chat_id": 100_000 + number, "text": text})
            self.bodies[text] = batch[-1]
        self._numbered += count
        return batch

    def post(self, messages: list[dict[str, Any]], timeout: float = 60) -> Posted:
        """POST a batch; what was accepted (202) or recognised (200 duplicate) is remembered."""
        try:
            answer = self.session.post(f"{self.url}/v1/messages/batch", json={"messages": messages},
                                       timeout=timeout)
        except requests.ConnectionError as error:
            raise RelayGone(str(error)) from None
        body = answer.json()
        ids: list[int | None] = []
        if answer.status_code == 200:
            for message, result in zip(messages, body["results"], strict=True):
                if result["http_status"] in (200, 202):
                    self.accepted[result["id"]] = message["text"]
                    ids.append(result["id"])
                else:
                    ids.append(None)
        return Posted(answer.status_code, ids, body, answer.headers)

    def post_all(self, messages: list[dict[str, Any]], size: int = 100) -> None:
        for start in range(0, len(messages), size):
            posted = self.post(messages[start:start + size])
            assert posted.status == 200 and None not in posted.ids, posted.body

    def get(self, path: str) -> Any:
        answer = self.session.get(f"{self.url}{path}", timeout=30)
        answer.raise_for_status()
        return answer.json()

    def wait_until_final(self, timeout: float) -> dict[str, Any]:
        """Until nothing is pending or sent; the last statistics."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.get("/v1/stats")
            counts = stats["counts"]
            if counts["pending"] + counts["sent"] == 0:
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: not final after {timeout:g} s: {counts}")
            time.sleep(0.2)

    # --- the audit ------------------------------------------------------------------------------

    def rows(self) -> dict[int, tuple[Any, ...]]:
        """id -> (text, status, telegram_message_id, last_error, in_doubt_count), read from the file."""
        db = apsw.Connection(str(self.database), flags=apsw.SQLITE_OPEN_READONLY)
        try:
            return {row[0]: row[1:] for row in db.execute(
                "SELECT id, message_text, status, telegram_message_id, last_error, in_doubt_count "
                "FROM message_store")}
        finally:
            db.close()

    def audit(self, *, destroyed: Collection[int] = (), allowed_failure: str | None = None) -> Audit:
        """Settle every accepted id; call it once the relay has stopped."""
        rows = self.rows()
        deliveries: dict[str, list[int]] = defaultdict(list)
        for delivery in self.simulator.record.deliveries():
            deliveries[delivery.text].append(delivery.message_id)
        audit = Audit(self.name, accepted=len(self.accepted), rows=len(rows), destroyed=len(destroyed))
        audit.not_final = sorted(i for i, row in rows.items() if row[1] not in FINAL)
        audit.in_doubt = sum(row[4] for row in rows.values())
        for message_id, text in sorted(self.accepted.items()):
            delivered = deliveries.get(text, [])
            row = rows.get(message_id)
            if row is None:
                if message_id not in destroyed:
                    audit.lost.append(message_id)
                continue
            stored_text, status, telegram_id, last_error, in_doubt = row
            assert stored_text == text, f"row {message_id} holds another message: {stored_text!r}"
            audit.duplicates += max(0, len(delivered) - 1)
            if len(delivered) - 1 > in_doubt:
                audit.unexplained_duplicates.append(message_id)
            if status == "confirmed":
                audit.confirmed += 1
                if not delivered:
                    audit.confirmed_not_delivered.append(message_id)
                elif telegram_id not in delivered:
                    audit.wrong_message_id.append(message_id)
            elif status == "failed":
                reason = str(last_error)
                kind = re.sub(r"[0-9]+", "N", reason)[:80]
                audit.failed[kind] = audit.failed.get(kind, 0) + 1
                if not last_error or allowed_failure is None or not re.search(allowed_failure, reason):
                    audit.unexpected_failures.append(message_id)
        AUDITS.append(audit)
        return audit


def assert_nothing_lost(audit: Audit) -> None:
    assert audit.accepted > 0, "the scenario accepted nothing"
    assert not audit.problems, f"{audit.summary()}\n{audit.problems}"
