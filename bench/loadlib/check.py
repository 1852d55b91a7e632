"""The checker: what the client had accepted, what the store holds, what the simulator delivered.

A message belongs to the run when its text starts with the run id (``"<run id> #<seq>"``). The
population checked is every message the client heard accepted plus every row of the run the
store holds (a request cut by a SIGKILL may have committed without the client hearing so).
Each message is keyed by ``(chat_id, text)``, the simulator's notion of "the same message".

- **lost**: in the population, never received by the simulator, and not held as ``failed`` by
  the store (no row at all, a row still pending, or a row that claims ``confirmed``).
- **duplicates**: deliveries beyond the first per ``(chat_id, text)``. Each is *explained* when
  the store counted at least that many in-doubt sends for the message (a send whose outcome
  was unknown, resent by the at-least-once policy); anything else is a relay bug.
- **accepted twice**: two rows for one ``(chat_id, text)``. The client repeats a request only
  within ``--give-up-seconds`` (120 s), inside the relay's dedup window (300 s by default), so
  a second row means the deduplicator let a repeat through.
- failures are split into the recipient's fault (blocked, chat not found: no relay can deliver
  those) and everything else (which the relay should have delivered).

Pure functions over plain records; nothing here talks to a process.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from typing import Any

DELIVERY_TARGET = 0.995
RECIPIENT_MARKERS = ("blocked", "kicked", "chat not found", "deactivated", "not a member",
                     "user not found", "have no rights")
FINAL = frozenset({"confirmed", "failed"})

Key = tuple[int, str]


@dataclass(frozen=True, slots=True)
class Submission:
    """One message as the load client saw it.

    ``outcome``: ``accepted`` (202), ``duplicate`` (200: an earlier attempt of this request had
    committed it), ``rejected`` (4xx, with ``detail``) or ``unanswered`` (gave up retrying).
    Times are wall-clock (``time.time()``), comparable with the simulator's and the store's.
    """

    seq: int
    chat_id: int
    text: str
    submitted_at: float
    answered_at: float | None
    message_id: int | None
    outcome: str
    detail: str = ""
    attempts: int = 1

    @property
    def accepted(self) -> bool:
        return self.outcome in ("accepted", "duplicate")


@dataclass(frozen=True, slots=True)
class StoredRow:
    """One ``message_store`` row (``created_at`` is the ``timestamp`` column)."""

    id: int
    chat_id: int
    text: str
    status: str
    last_error: str | None
    in_doubt_count: int
    retry_count: int
    token: str | None
    telegram_message_id: int | None
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class Delivered:
    """One message the simulator showed in a chat."""

    bot_id: int
    chat_id: int
    text: str
    message_id: int
    timestamp: float
    answer_delayed: bool = False


@dataclass(frozen=True)
class Finding:
    """One message the checker has something to say about."""

    chat_id: int
    text: str
    why: str
    message_id: int | None = None


@dataclass(frozen=True)
class DuplicateFinding:
    chat_id: int
    text: str
    copies: int
    in_doubt_count: int
    explained: bool
    message_id: int | None = None


@dataclass
class CheckResult:
    """The checker's findings; :meth:`problems` is the verdict."""

    population: int = 0
    accepted_by_client: int = 0
    accepted_unacknowledged: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    unanswered: int = 0
    confirmed: int = 0
    failed_recipient: int = 0
    failed_other: int = 0
    failed_by_reason: dict[str, int] = field(default_factory=dict)
    lost: list[Finding] = field(default_factory=list)
    unfinished: list[Finding] = field(default_factory=list)
    failed_but_delivered: list[Finding] = field(default_factory=list)
    wrong_message_id: list[Finding] = field(default_factory=list)
    vanished_rows: list[Finding] = field(default_factory=list)
    unexpected_deliveries: list[Finding] = field(default_factory=list)
    accepted_twice: list[Finding] = field(default_factory=list)
    duplicates: list[DuplicateFinding] = field(default_factory=list)
    in_doubt_total: int = 0
    chats_out_of_order: int = 0
    order_inversions: int = 0

    @property
    def deliverable(self) -> int:
        return self.population - self.failed_recipient

    @property
    def duplicate_deliveries(self) -> int:
        return sum(duplicate.copies - 1 for duplicate in self.duplicates)

    @property
    def unexplained_duplicates(self) -> list[DuplicateFinding]:
        return [duplicate for duplicate in self.duplicates if not duplicate.explained]

    @property
    def delivery_rate(self) -> float | None:
        return self.confirmed / self.population if self.population else None

    @property
    def deliverable_rate(self) -> float | None:
        return self.confirmed / self.deliverable if self.deliverable else None

    def problems(self) -> list[str]:
        """Why the run fails the reliability bar; empty when it passes."""
        found = []
        for name, items in (("lost", self.lost), ("unfinished", self.unfinished),
                            ("failed although delivered", self.failed_but_delivered),
                            ("confirmed with a message id the simulator never gave",
                             self.wrong_message_id),
                            ("rows vanished from the store", self.vanished_rows),
                            ("delivered without being accepted", self.unexpected_deliveries),
                            ("accepted twice (a retry got past dedup)", self.accepted_twice),
                            ("unexplained duplicates", self.unexplained_duplicates)):
            if items:
                found.append(f"{len(items)} {name}")
        if self.duplicate_deliveries > self.in_doubt_total:
            found.append(f"{self.duplicate_deliveries} duplicate deliveries but only "
                         f"{self.in_doubt_total} in-doubt sends")
        if self.failed_other:
            found.append(f"{self.failed_other} deliverable messages failed")
        if self.population == 0:
            found.append("no message was accepted")
        return found

    def as_json(self, sample: int = 20) -> dict[str, Any]:
        def listed(items: Sequence[Finding | DuplicateFinding]) -> dict[str, Any]:
            return {"count": len(items), "sample": [asdict(item) for item in items[:sample]]}

        return {
            "population": self.population,
            "accepted_by_client": self.accepted_by_client,
            "accepted_unacknowledged": self.accepted_unacknowledged,
            "rejected": self.rejected,
            "unanswered": self.unanswered,
            "confirmed": self.confirmed,
            "failed": {"total": self.failed_recipient + self.failed_other,
                       "recipient": self.failed_recipient, "other": self.failed_other,
                       "by_reason": self.failed_by_reason},
            "deliverable": self.deliverable,
            "delivery_rate": self.delivery_rate,
            "deliverable_rate": self.deliverable_rate,
            "target": DELIVERY_TARGET,
            "lost": listed(self.lost),
            "unfinished": listed(self.unfinished),
            "failed_but_delivered": listed(self.failed_but_delivered),
            "wrong_message_id": listed(self.wrong_message_id),
            "vanished_rows": listed(self.vanished_rows),
            "unexpected_deliveries": listed(self.unexpected_deliveries),
            "accepted_twice": listed(self.accepted_twice),
            "duplicates": {"deliveries": self.duplicate_deliveries,
                           "messages": len(self.duplicates),
                           "unexplained": listed(self.unexplained_duplicates),
                           "sample": [asdict(item) for item in self.duplicates[:sample]]},
            "in_doubt_total": self.in_doubt_total,
            "ordering": {"chats_out_of_order": self.chats_out_of_order,
                         "inversions": self.order_inversions},
            "problems": self.problems(),
            "passed": not self.problems(),
        }


def message_text(run_id: str, seq: int) -> str:
    return f"{run_id} #{seq}"


def seq_of(run_id: str, text: str) -> int | None:
    """The sequence number in a text of this run, else ``None``."""
    prefix = f"{run_id} #"
    if not text.startswith(prefix):
        return None
    tail = text[len(prefix):]
    return int(tail) if tail.isdigit() else None


def is_recipient_fault(last_error: str | None) -> bool:
    error = (last_error or "").lower()
    return any(marker in error for marker in RECIPIENT_MARKERS)


def failure_reason(last_error: str | None) -> str:
    """A failure's reason without what varies between messages (numbers, token lists)."""
    reason = (last_error or "no reason given").split(" (refused by", 1)[0]
    reason = re.sub(r"^token \S+: ", "", reason)
    return re.sub(r"\d+(\.\d+)?", "N", reason)[:160]


def first_deliveries(deliveries: Iterable[Delivered]) -> dict[Key, Delivered]:
    """The earliest delivery of each ``(chat_id, text)``."""
    first: dict[Key, Delivered] = {}
    for delivery in deliveries:
        key = (delivery.chat_id, delivery.text)
        seen = first.get(key)
        if seen is None or delivery.timestamp < seen.timestamp:
            first[key] = delivery
    return first


def check(run_id: str, submissions: Sequence[Submission], rows: Sequence[StoredRow],
          deliveries: Sequence[Delivered]) -> CheckResult:
    """Compare message by message. ``rows`` is every row of the store and ``deliveries``
    everything the simulator delivered; either may hold other runs' messages."""
    result = CheckResult()
    ours = [row for row in rows if seq_of(run_id, row.text) is not None]
    rows_by_key: dict[Key, list[StoredRow]] = defaultdict(list)
    for row in ours:
        rows_by_key[(row.chat_id, row.text)].append(row)
    copies: dict[Key, list[Delivered]] = defaultdict(list)
    for delivery in deliveries:
        if seq_of(run_id, delivery.text) is not None:
            copies[(delivery.chat_id, delivery.text)].append(delivery)

    accepted_keys: dict[Key, Submission] = {}
    rejected: Counter[str] = Counter()
    for submission in submissions:
        key = (submission.chat_id, submission.text)
        if submission.accepted:
            accepted_keys[key] = submission
        elif submission.outcome == "rejected":
            rejected[submission.detail or "rejected"] += 1
        else:
            result.unanswered += 1
    result.rejected = dict(rejected)
    result.accepted_by_client = len(accepted_keys)
    unacknowledged = set(rows_by_key) - set(accepted_keys)
    result.accepted_unacknowledged = len(unacknowledged)
    population = set(accepted_keys) | unacknowledged
    result.population = len(population)

    failed_reasons: Counter[str] = Counter()
    for key in sorted(population, key=lambda k: (seq_of(run_id, k[1]) or 0, k[0])):
        _judge(key, rows_by_key.get(key, []), copies.get(key, []), accepted_keys.get(key),
               result, failed_reasons)
    result.failed_by_reason = dict(failed_reasons.most_common())
    for key in sorted(set(copies) - population):
        result.unexpected_deliveries.append(Finding(key[0], key[1], "the simulator received a "
                                                    "message of this run that was never accepted"))
    result.in_doubt_total = sum(row.in_doubt_count for key in population
                                for row in rows_by_key.get(key, []))
    _check_order(run_id, copies, result)
    return result


def _judge(key: Key, rows: list[StoredRow], copies: list[Delivered], submission: Submission | None,
           result: CheckResult, failed_reasons: Counter[str]) -> None:
    chat_id, text = key
    message_id = rows[0].id if rows else (submission.message_id if submission else None)
    statuses = {row.status for row in rows}
    if len(rows) > 1:
        # The client repeats a request only within its give-up time, well inside the dedup
        # window: a second row means a repeat was not recognised.
        result.accepted_twice.append(Finding(chat_id, text, f"{len(rows)} rows: ids "
                                             f"{sorted(row.id for row in rows)}", message_id))
    if len(copies) > 1:
        in_doubt = sum(row.in_doubt_count for row in rows)
        result.duplicates.append(DuplicateFinding(chat_id, text, len(copies), in_doubt,
                                                  len(copies) - 1 <= in_doubt, message_id))
    if copies:
        if not rows:
            result.vanished_rows.append(Finding(chat_id, text, "no row in the store, though the "
                                                "simulator received it", message_id))
        elif "confirmed" in statuses:
            given = {copy.message_id for copy in copies}
            confirmed = [row for row in rows if row.status == "confirmed"]
            if all(row.telegram_message_id in given for row in confirmed):
                result.confirmed += 1
            else:
                result.wrong_message_id.append(Finding(
                    chat_id, text, f"confirmed as Telegram message "
                    f"{confirmed[0].telegram_message_id}, delivered as {sorted(given)}", message_id))
        elif statuses == {"failed"}:
            result.failed_but_delivered.append(Finding(
                chat_id, text, f"failed ({rows[0].last_error}) but delivered", message_id))
        else:
            result.unfinished.append(Finding(chat_id, text, f"delivered, still {'/'.join(sorted(statuses))}",
                                             message_id))
        return
    if statuses == {"failed"}:
        error = rows[0].last_error
        if is_recipient_fault(error):
            result.failed_recipient += 1
        else:
            result.failed_other += 1
        failed_reasons[failure_reason(error)] += 1
        return
    if not rows:
        why = "no row in the store"
    elif "confirmed" in statuses:
        why = "the store says confirmed; the simulator never received it"
    else:
        why = f"never delivered; still {'/'.join(sorted(statuses))} in the store"
    result.lost.append(Finding(chat_id, text, why, message_id))
    if rows and not statuses & FINAL:
        result.unfinished.append(Finding(chat_id, text, why, message_id))


def _check_order(run_id: str, copies: dict[Key, list[Delivered]], result: CheckResult) -> None:
    """Per chat, do first deliveries follow the sequence numbers? (Retries may reorder.)"""
    by_chat: dict[int, list[tuple[float, int]]] = defaultdict(list)
    for (chat_id, text), delivered in copies.items():
        seq = seq_of(run_id, text)
        if seq is not None:
            by_chat[chat_id].append((min(copy.timestamp for copy in delivered), seq))
    for firsts in by_chat.values():
        firsts.sort()
        inversions = sum(1 for before, after in pairwise(firsts)
                         if after[1] < before[1])
        if inversions:
            result.chats_out_of_order += 1
            result.order_inversions += inversions
