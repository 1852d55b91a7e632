"""Messages between the token actors, the balancer and the supervisor.

Small frozen records named for what happened. None of them carries a token secret: tokens
are named by their configured name, token actor generations by their lease owner
(``alpha#3``), which is also what the store records as the lease holder.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from actors.messages import ClaimedMessage

# --- balancer -> token actor ----------------------------------------------------------------


@dataclass(frozen=True)
class AssignMessages:
    """These rows are leased to you in the store: send them."""

    rows: tuple[ClaimedMessage, ...]


# --- worker thread -> its token actor -------------------------------------------------------


class FailureKind(Enum):
    """How a send went wrong, classified as DESIGN.md 6 says."""

    RATE_LIMITED = "rate_limited"        # 429: cool down the token, reroute the message
    TOKEN_REJECTED = "token_rejected"    # noqa: S105 -- 401 (or 404): quarantine, confirm with getMe
    UNREACHABLE = "unreachable"          # 403: this (token, chat) pair cannot work
    MIGRATED = "migrated"                # 400 with migrate_to_chat_id: rewrite and resend
    BAD_REQUEST = "bad_request"          # any other 4xx: the message itself is refused
    SERVER_ERROR = "server_error"        # 5xx, HTML pages, answers that are not the Bot API's
    CONNECT_FAILED = "connect_failed"    # the request never left: safe to retry
    CONNECTION_LOST = "connection_lost"  # reset after the request left: in doubt
    TIMED_OUT = "timed_out"              # no answer in time after the request left: in doubt
    LEASE_LOST = "lease_lost"            # MarkSent refused: the row was rerouted, not sent
    STORE_UNAVAILABLE = "store_unavailable"  # MarkSent could not commit: not sent


IN_DOUBT_KINDS = frozenset({FailureKind.CONNECTION_LOST, FailureKind.TIMED_OUT})
TRANSIENT_KINDS = frozenset({FailureKind.SERVER_ERROR, FailureKind.CONNECT_FAILED,
                             FailureKind.CONNECTION_LOST, FailureKind.TIMED_OUT})


@dataclass(frozen=True)
class Failure:
    """A classified failure; ``description`` is safe to store and show (no secret)."""

    kind: FailureKind
    description: str
    retry_after: int | None = None
    migrate_to_chat_id: int | None = None

    @property
    def in_doubt(self) -> bool:
        """The request left and its outcome is unknown: it may have been delivered."""
        return self.kind in IN_DOUBT_KINDS


@dataclass(frozen=True)
class SendSucceeded:
    row: ClaimedMessage
    telegram_message_id: int
    started_at: float  # monotonic time the request left
    latency: float


@dataclass(frozen=True)
class SendFailed:
    row: ClaimedMessage
    failure: Failure
    started_at: float | None  # None when no request left
    latency: float


@dataclass(frozen=True)
class WorkerCrashed:
    """A worker thread hit a bug (not a network outcome): the token actor must fail."""

    row: ClaimedMessage | None
    description: str


@dataclass(frozen=True)
class ResultsReady:
    """Worker results wait in the token actor's result channel (one wake-up for many)."""


@dataclass(frozen=True)
class TokenChecked:
    """The answer to a ``getMe`` probe: ``valid`` is None when the network did not tell."""

    valid: bool | None
    bot_username: str | None
    error: str | None


# --- to a token actor from anywhere ----------------------------------------------------------


@dataclass(frozen=True)
class Wake:
    """An alarm went off: budgets may have opened."""


@dataclass(frozen=True)
class CheckToken:
    """Probe the token with ``getMe`` (after a 401, and periodically while revoked)."""


@dataclass(frozen=True)
class Drain:
    """Graceful stop: send nothing new; in-flight requests may finish."""


@dataclass(frozen=True)
class CrashForTest:
    """Fault injection for tests: the receiving actor raises as if it had a bug."""


@dataclass(frozen=True)
class StoreWriteFailed:
    """A store command the token actor submitted could not commit; it will be retried."""

    command: object
    description: str
    attempt: int


# --- to the balancer -------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkAccepted:
    """New pending rows exist in these pools."""

    pools: frozenset[str]


@dataclass(frozen=True)
class TokenHasCapacity:
    """A token finished work and can take more."""

    name: str


@dataclass(frozen=True)
class Tick:
    """The balancer's periodic wake-up: due retries, cooled-down tokens, gauges."""


@dataclass(frozen=True)
class StopClaiming:
    """Graceful stop: claim nothing more."""


# --- to the supervisor -----------------------------------------------------------------------


@dataclass(frozen=True)
class TokenFailed:
    """A token actor generation died (or its handler raised); ``owner`` names the generation."""

    name: str
    owner: str
    description: str


@dataclass(frozen=True)
class BalancerFailed:
    generation: int
    description: str


@dataclass(frozen=True)
class RestartToken:
    name: str
    owner: str  # the generation that failed; a restart for an older one is stale


@dataclass(frozen=True)
class CheckStore:
    """The supervisor's periodic look at the store actor."""
