"""Records and commands exchanged between tgrelay's actors.

Every command to the store carries its own :class:`~actors.reply.Reply`: the store
answers only after the transaction holding the change has committed (group commit), which a
plain pykka ``ask`` cannot express because pykka replies as soon as the handler returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from actors.reply import Reply

PENDING = "pending"
SENT = "sent"
CONFIRMED = "confirmed"
FAILED = "failed"
STATUSES = (PENDING, SENT, CONFIRMED, FAILED)
FINAL_STATUSES = (CONFIRMED, FAILED)

ChatId = int | str


@dataclass(frozen=True)
class OutgoingMessage:
    """A validated message, ready to be accepted."""

    chat_id: ChatId
    text: str
    pool: str
    dedup_key: str | None = None
    parse_mode: str | None = None
    disable_notification: bool = False


@dataclass(frozen=True)
class DedupProbe:
    """What the store checks, inside the accepting transaction, to recognise a duplicate.

    ``match_seconds`` is how far back an earlier row with the same ``hash`` counts: the
    dedup window for content hashes, the cache TTL for caller-supplied keys.
    """

    hash: str
    payload_hash: str
    match_seconds: float
    dedup_key: str | None = None


@dataclass(frozen=True)
class Receipt:
    """The answer to an accepted (or recognised duplicate) message."""

    id: int
    status: str
    duplicate: bool


@dataclass(frozen=True)
class StoredMessage:
    """One row of ``message_store`` as users see it (``token`` is the token's name)."""

    id: int
    chat_id: ChatId
    pool: str
    status: str
    retry_count: int
    telegram_message_id: int | None
    token: str | None
    last_error: str | None
    created_at: float
    updated_at: float
    text: str
    in_doubt_count: int

    def as_api(self) -> dict[str, Any]:
        return {
            "id": self.id, "chat_id": self.chat_id, "pool": self.pool, "status": self.status,
            "retry_count": self.retry_count, "telegram_message_id": self.telegram_message_id,
            "token": self.token, "last_error": self.last_error,
            "created_at": self.created_at, "updated_at": self.updated_at,
        }


@dataclass(frozen=True)
class ClaimedMessage:
    """A pending row leased to one token for sending."""

    id: int
    chat_id: ChatId
    text: str
    pool: str
    parse_mode: str | None
    disable_notification: bool
    retry_count: int
    owner: str
    token: str = ""  # the token's name when ``owner`` is a generation-qualified lease owner
    accepted_at: float = 0.0


@dataclass(frozen=True)
class RecoveryReport:
    """What start-up recovery found: rows left ``sent`` by a crash are in doubt."""

    in_doubt: int
    released_leases: int
    pending: int


# --- store commands -------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreCommand:
    reply: Reply[Any] = field(default_factory=Reply, compare=False, repr=False, kw_only=True)
    writes = True


@dataclass(frozen=True)
class AcceptMessages(StoreCommand):
    """Insert each message unless its probe finds an earlier one. Answers ``list[Receipt]``."""

    messages: tuple[tuple[OutgoingMessage, DedupProbe], ...]


@dataclass(frozen=True)
class ClaimDue(StoreCommand):
    """Lease due pending rows of ``pool``, one per entry of ``owners``, oldest first.

    Rows whose chat already has a leased row are skipped, so one chat's messages go out in
    the order they were accepted. Answers ``list[ClaimedMessage]``.

    ``tokens`` (optional) names the token behind each owner, when owners are lease owners such
    as ``alpha#3`` (one per token actor generation): the row's ``token`` column gets the name,
    and a row is never leased to a token that :class:`MarkUnreachable` recorded for it (it
    goes to the next owner of the page that is allowed, or waits for a later page).
    """

    pool: str
    owners: tuple[str, ...]
    tokens: tuple[str, ...] | None = None


@dataclass(frozen=True)
class MarkSent(StoreCommand):
    """The request for these leased rows is about to leave: from now on they are in doubt."""

    ids: tuple[int, ...]
    token: str
    owner: str | None = None  # the lease owner to check, when it is not ``token`` itself


@dataclass(frozen=True)
class MarkUnreachable(StoreCommand):
    """``token`` cannot write to this row's chat (403 blocked or kicked).

    The pair is recorded for the message; if every one of ``candidates`` (the pool's usable
    tokens) has now been refused, the row fails with ``reason``, else it goes back to pending
    for another token. Only a row still leased to ``owner`` changes. Answers ``"failed"``,
    ``"released"`` or ``"lost"`` (the lease had moved on).
    """

    id: int
    owner: str
    token: str
    reason: str
    candidates: tuple[str, ...]


@dataclass(frozen=True)
class FailRefused(StoreCommand):
    """Fail every pending row of ``pool`` that every one of ``candidates`` has refused (403).

    For rows whose last untried token became unusable (revoked, quarantined) after they were
    released: nobody could ever claim them. Answers the ids failed.
    """

    pool: str
    candidates: tuple[str, ...]


@dataclass(frozen=True)
class ConfirmSent(StoreCommand):
    id: int
    telegram_message_id: int
    token: str


@dataclass(frozen=True)
class ConfirmMany(StoreCommand):
    """:class:`ConfirmSent` for several rows of one token: ``(id, telegram_message_id)`` pairs.

    Answers how many rows were confirmed now (a row confirmed earlier is left as it is).
    """

    confirmations: tuple[tuple[int, int], ...]
    token: str


@dataclass(frozen=True)
class FailMessage(StoreCommand):
    id: int
    reason: str
    token: str | None = None


@dataclass(frozen=True)
class ReleaseMessage(StoreCommand):
    """Back to ``pending``, due after ``delay_seconds``; ``count_retry`` bumps ``retry_count``.

    ``keep_place`` (a reroute that was not the message's fault, such as a 429 on one token)
    leaves ``next_attempt_at`` as it was, so the row keeps its turn, and its chat's order.
    """

    id: int
    delay_seconds: float
    error: str | None
    count_retry: bool = True
    in_doubt: bool = False
    new_chat_id: ChatId | None = None
    keep_place: bool = False


@dataclass(frozen=True)
class ReleaseLeases(StoreCommand):
    """Every row leased to ``owner`` goes back to pending (reroute). Answers the count."""

    owner: str
    in_doubt_if_sent: bool = True


@dataclass(frozen=True)
class Housekeep(StoreCommand):
    """Archive old final rows and expire dedup cache rows, one page. Answers counts."""

    now: float | None = None


@dataclass(frozen=True)
class GetMessage(StoreCommand):
    id: int
    writes = False


@dataclass(frozen=True)
class GetStatistics(StoreCommand):
    writes = False


@dataclass(frozen=True)
class CheckIntegrity(StoreCommand):
    """Run ``PRAGMA quick_check``; on damage, recover into a fresh file. Answers ``bool``."""

    writes = False


@dataclass(frozen=True)
class Ping(StoreCommand):
    """Answers ``True`` once the store can serve (a cheap health check)."""

    writes = False
