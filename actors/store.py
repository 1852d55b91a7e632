"""The store actor: SQLite (apsw, WAL) is the mailbox of record.

Threading: every method below except :meth:`StoreClient` helpers runs in the actor's own
thread; the apsw connection is created and used only there.

Group commit: pykka hands the actor one command at a time. A write command is applied inside
an open transaction (each under its own SAVEPOINT, so one failing command leaves no partial
state and does not spoil the others) and its reply is held back. When the mailbox is empty,
or the batch is large, the transaction commits and every held reply is released. So a caller
is answered only after its change is durable, and one fsync serves everybody who was waiting.
A read command first commits whatever is open, so it never sees uncommitted state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apsw
import pykka

from actors.errors import DedupConflict, MessageNotFound, StoreUnavailable, TgrelayError
from actors.messages import (
    PENDING,
    STATUSES,
    AcceptMessages,
    CheckIntegrity,
    ClaimDue,
    ClaimedMessage,
    ConfirmMany,
    ConfirmSent,
    DedupProbe,
    FailMessage,
    FailRefused,
    GetMessage,
    GetStatistics,
    Housekeep,
    MarkSent,
    MarkUnreachable,
    OutgoingMessage,
    Ping,
    Receipt,
    RecoveryReport,
    ReleaseLeases,
    ReleaseMessage,
    StoreCommand,
    StoredMessage,
)
from actors.observe import AlertSink, Metrics, NullMetrics, log_alert
from actors.reply import Reply

log = logging.getLogger("tgrelay.store")

SCHEMA_VERSION = 3
MAX_GROUP = 2000  # commands per transaction: bounds how long the first caller waits
HOUSEKEEPING_PAGE = 5000
ACCEPT_SHARE_OF_CAP = 0.9  # new messages may fill this much of max_db_bytes

_COLUMNS = """
    id INTEGER PRIMARY KEY,
    chat_id NOT NULL,
    message_text TEXT NOT NULL,
    timestamp REAL NOT NULL,
    status TEXT NOT NULL,
    retry_count INTEGER NOT NULL DEFAULT 0,
    telegram_message_id INTEGER,
    pool TEXT NOT NULL,
    token TEXT,
    lease_owner TEXT,
    dedup_hash TEXT,
    parse_mode TEXT,
    disable_notification INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    next_attempt_at REAL NOT NULL,
    in_doubt_count INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL"""

# Forward migrations: MIGRATIONS[n] takes a database from user_version n to n + 1.
MIGRATIONS: list[str] = [
    f"""
    CREATE TABLE message_store ({_COLUMNS},
        CHECK (status IN ('pending', 'sent', 'confirmed', 'failed')),
        CHECK (status != 'confirmed' OR telegram_message_id IS NOT NULL),
        CHECK (status != 'failed' OR last_error IS NOT NULL));
    CREATE INDEX message_store_due ON message_store(pool, next_attempt_at, id)
        WHERE status = 'pending' AND lease_owner IS NULL;
    CREATE INDEX message_store_leased ON message_store(lease_owner, chat_id)
        WHERE lease_owner IS NOT NULL;
    CREATE INDEX message_store_leased_chat ON message_store(chat_id)
        WHERE lease_owner IS NOT NULL;
    CREATE INDEX message_store_final ON message_store(updated_at)
        WHERE status IN ('confirmed', 'failed');
    CREATE INDEX message_store_status ON message_store(status);
    CREATE TABLE deduplication_cache (
        hash TEXT NOT NULL,
        message_id INTEGER NOT NULL,
        payload_hash TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL);
    CREATE INDEX deduplication_cache_hash ON deduplication_cache(hash, created_at);
    CREATE INDEX deduplication_cache_expiry ON deduplication_cache(expires_at);
    """,
    # (message, token) pairs refused with 403: the message goes to another token of the pool,
    # and fails once every token was refused. Rows vanish with their message.
    """
    CREATE TABLE message_unreachable (
        message_id INTEGER NOT NULL REFERENCES message_store(id) ON DELETE CASCADE,
        token TEXT NOT NULL,
        reason TEXT NOT NULL,
        PRIMARY KEY (message_id, token)) WITHOUT ROWID;
    """,
    # Statistics run every few seconds: keep "how many in doubt" off a full-table scan.
    """
    CREATE INDEX message_store_in_doubt ON message_store(in_doubt_count) WHERE in_doubt_count > 0;
    """,
]

# A confirmation is the truth about Telegram: it wins over a lease taken away or a later error.
_CONFIRM = ("UPDATE message_store SET status = 'confirmed', telegram_message_id = ?, token = ?, "
            "lease_owner = NULL, updated_at = ? WHERE id = ? AND status != 'confirmed'")
_MESSAGE_FIELDS = (
    "id, chat_id, pool, status, retry_count, telegram_message_id, token, last_error, "
    "timestamp, updated_at, message_text, in_doubt_count"
)
# apsw error classes that mean "this transaction cannot be made durable now".
_UNAVAILABLE = (apsw.FullError, apsw.BusyError, apsw.LockedError, apsw.IOError,
                apsw.ReadOnlyError, apsw.CantOpenError)
_DAMAGED = (apsw.CorruptError, apsw.NotADBError)


@dataclass(frozen=True)
class StoreSettings:
    path: str
    synchronous: str = "full"
    busy_timeout_ms: int = 5000
    retention_days: float = 30.0
    archive_path: str = ""
    dedup_ttl_seconds: float = 86400.0
    max_db_bytes: int = 0  # 0: no cap; otherwise PRAGMA max_page_count, to protect the disk


class StoreActor(pykka.ThreadingActor):
    """Owns the SQLite database; see the module docstring for the commit protocol."""

    use_daemon_thread = True  # a process that forgets stop() still exits: SQLite has every row

    def __init__(self, settings: StoreSettings, metrics: Metrics | None = None,
                 alert: AlertSink = log_alert, clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self.settings = settings
        self._metrics = metrics or NullMetrics()
        self._alert = alert
        self._clock = clock
        self._db: apsw.Connection | None = None
        self._held: list[tuple[Reply[Any], Any]] = []
        self._txn_started = 0.0
        self.recovery = RecoveryReport(0, 0, 0)
        self.last_integrity_check: tuple[float, bool] | None = None
        self.startup_error: Exception | None = None

    # --- lifecycle (actor thread) -----------------------------------------------------------

    def on_start(self) -> None:
        try:
            self._open(check=True)
            self.recovery = self._recover_unfinished()
        except Exception as error:  # noqa: BLE001 -- start_store reports it to the caller
            self.startup_error = error
            log.error("the store could not start: %s", error)
            return
        if self.recovery.in_doubt:
            self._metrics.incr("messages.in_doubt", self.recovery.in_doubt)
        log.info("store ready: %d pending, %d in doubt after restart, %d leases released",
                 self.recovery.pending, self.recovery.in_doubt, self.recovery.released_leases)

    def on_stop(self) -> None:
        self._commit()
        self._fail_queued(StoreUnavailable("the store is stopping"))
        if self._db is not None:
            self._db.close()
            self._db = None

    def on_failure(self, *exc_info: Any) -> None:
        self._rollback(StoreUnavailable("the store failed; nothing in this batch was committed"))
        self._fail_queued(StoreUnavailable("the store failed"))

    def on_receive(self, message: Any) -> None:
        if not isinstance(message, StoreCommand):
            raise TypeError(f"the store does not understand {type(message).__name__}")
        if self.startup_error is not None:
            message.reply.set_exception(StoreUnavailable(f"the store could not start: "
                                                         f"{self.startup_error}"))
            return
        if message.writes:
            self._apply_write(message)
        else:
            self._commit()
            self._answer_read(message)

    # --- the commit protocol ----------------------------------------------------------------

    def _apply_write(self, command: StoreCommand) -> None:
        db = self._connection(command.reply)
        if db is None:
            return
        try:
            if not self._held:
                db.execute("BEGIN IMMEDIATE")
                self._txn_started = time.perf_counter()
            db.execute("SAVEPOINT command")
        except apsw.Error as error:
            self._handle_database_error(error, command.reply)
            return
        try:
            result = self._handle_write(db, command)
        except _UNAVAILABLE + _DAMAGED as error:
            self._handle_database_error(error, command.reply)
            return
        except Exception as error:  # noqa: BLE001 -- the caller receives it; only this command is undone
            db.execute("ROLLBACK TO command")
            db.execute("RELEASE command")
            self._held.append((command.reply, error))
        else:
            db.execute("RELEASE command")
            self._held.append((command.reply, result))
        if len(self._held) >= MAX_GROUP or self.actor_inbox.empty():
            self._commit()

    def _commit(self) -> None:
        if not self._held or self._db is None:
            return
        try:
            self._db.execute("COMMIT")
        except apsw.Error as error:
            self._handle_database_error(error, None)
            return
        self._metrics.timing("store.txn", (time.perf_counter() - self._txn_started) * 1000)
        held, self._held = self._held, []
        for reply, outcome in held:
            if isinstance(outcome, BaseException):
                reply.set_exception(outcome)
            else:
                reply.set_result(outcome)

    def _rollback(self, error: TgrelayError) -> None:
        held, self._held = self._held, []
        if self._db is not None and self._db.in_transaction:
            with contextlib.suppress(apsw.Error):  # a failed COMMIT may have ended it already
                self._db.execute("ROLLBACK")
        for reply, _ in held:
            reply.set_exception(error)

    def _handle_database_error(self, error: apsw.Error, reply: Reply[Any] | None) -> None:
        """A durable commit is impossible: fail every held caller with a clear reason."""
        reason = _describe(error)
        self._metrics.incr("store.errors")
        unavailable = StoreUnavailable(reason)
        self._rollback(unavailable)
        if reply is not None:
            reply.set_exception(unavailable)
        if isinstance(error, _DAMAGED):
            self._alert("database_corruption", f"{reason}; recovering into a fresh file")
            self._recover_damaged_file()
        else:
            self._alert("persistence", f"a write could not be committed: {reason}")

    def _fail_queued(self, error: TgrelayError) -> None:
        """pykka drops queued messages of a stopped actor; answer their callers instead."""
        while not self.actor_inbox.empty():
            envelope = self.actor_inbox.get()
            command = getattr(envelope, "message", None)
            if isinstance(command, StoreCommand) and not command.reply.done():
                command.reply.set_exception(error)

    def _connection(self, reply: Reply[Any]) -> apsw.Connection | None:
        if self._db is None:
            try:
                self._open(check=False)
            except apsw.Error as error:
                reply.set_exception(StoreUnavailable(_describe(error)))
                return None
        return self._db

    # --- opening, schema, recovery ----------------------------------------------------------

    def _open(self, *, check: bool) -> None:
        path = Path(self.settings.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = self._connect(path)
            healthy = not check or self._quick_check()
        except _DAMAGED:
            healthy = False
        if not healthy:
            self._alert("database_corruption", f"{path.name} failed its integrity check; "
                        "moving it aside and recovering what can be read")
            self._recover_damaged_file()

    def _connect(self, path: Path) -> apsw.Connection:
        db = apsw.Connection(str(path))
        db.setbusytimeout(self.settings.busy_timeout_ms)
        db.execute("PRAGMA journal_mode=WAL").fetchall()
        db.execute(f"PRAGMA synchronous={self.settings.synchronous.upper()}")
        if self.settings.max_db_bytes:
            page_size = _scalar(db, "PRAGMA page_size")
            db.execute(f"PRAGMA max_page_count = {max(1, self.settings.max_db_bytes // page_size)}")
        _migrate(db)
        if self.settings.archive_path:
            archive = Path(self.settings.archive_path)
            archive.parent.mkdir(parents=True, exist_ok=True)
            db.execute("ATTACH DATABASE ? AS archive", (str(archive),))
            db.execute(f"CREATE TABLE IF NOT EXISTS archive.message_store ({_COLUMNS})")
        return db

    def _quick_check(self) -> bool:
        assert self._db is not None
        try:
            rows = self._db.execute("PRAGMA main.quick_check").fetchall()
            healthy = rows == [("ok",)]
        except _DAMAGED:
            healthy = False
        self.last_integrity_check = (self._clock(), healthy)
        return healthy

    def _recover_damaged_file(self) -> None:
        """Move the damaged file aside and copy every readable row into a fresh database."""
        if self._db is not None:
            with contextlib.suppress(apsw.Error):
                self._db.close()
            self._db = None
        path = Path(self.settings.path)
        aside = path.with_name(f"{path.name}.corrupt-{int(self._clock())}")
        for suffix in ("", "-wal", "-shm"):
            source = Path(f"{path}{suffix}")
            if source.exists():
                os.replace(source, f"{aside}{suffix}")
        self._db = self._connect(path)
        salvaged = _salvage(aside, self._db)
        self.last_integrity_check = (self._clock(), True)
        self._alert("database_corruption",
                    f"recovered {salvaged} message rows into a fresh {path.name}; "
                    f"the damaged file is kept as {aside.name}")

    def _recover_unfinished(self) -> RecoveryReport:
        """Rows a crash left ``sent`` may have reached Telegram: count them in doubt."""
        assert self._db is not None
        db, now = self._db, self._clock()
        with db:
            db.execute("UPDATE message_store SET status = 'pending', lease_owner = NULL, "
                       "in_doubt_count = in_doubt_count + 1, updated_at = ? "
                       "WHERE status = 'sent'", (now,))
            in_doubt = db.changes()
            db.execute("UPDATE message_store SET lease_owner = NULL WHERE lease_owner IS NOT NULL")
            released = db.changes()
        pending = _scalar(db, "SELECT count(*) FROM message_store WHERE status = 'pending'")
        return RecoveryReport(in_doubt, released, pending)

    # --- write handlers (inside the open transaction) ---------------------------------------

    def _handle_write(self, db: apsw.Connection, command: StoreCommand) -> Any:
        now = self._clock()
        match command:
            case AcceptMessages(messages=messages):
                self._refuse_new_messages_near_the_cap(db)
                return self._accept(db, messages, now)
            case ClaimDue(pool=pool, owners=owners, tokens=tokens):
                return self._claim(db, pool, owners, tokens or owners, now)
            case MarkSent(ids=ids, token=token, owner=owner):
                return self._mark_sent(db, ids, token, owner or token, now)
            case MarkUnreachable():
                return self._mark_unreachable(db, command, now)
            case FailRefused(pool=pool, candidates=candidates):
                return self._fail_refused(db, pool, candidates, now)
            case ConfirmSent(id=message_id, telegram_message_id=telegram_id, token=token):
                db.execute(_CONFIRM, (telegram_id, token, now, message_id))
                return db.changes() == 1
            case ConfirmMany(confirmations=confirmations, token=token):
                before = db.total_changes()
                db.executemany(_CONFIRM, [(telegram_id, token, now, message_id)
                                          for message_id, telegram_id in confirmations])
                return db.total_changes() - before
            case FailMessage(id=message_id, reason=reason, token=token):
                db.execute("UPDATE message_store SET status = 'failed', last_error = ?, "
                           "token = coalesce(?, token), lease_owner = NULL, updated_at = ? "
                           "WHERE id = ? AND status NOT IN ('confirmed', 'failed')",
                           (reason, token, now, message_id))
                return db.changes() == 1
            case ReleaseMessage():
                return self._release(db, command, now)
            case ReleaseLeases(owner=owner, in_doubt_if_sent=in_doubt_if_sent):
                db.execute("UPDATE message_store SET in_doubt_count = in_doubt_count + "
                           "(status = 'sent' AND ?), status = 'pending', lease_owner = NULL, "
                           "updated_at = ? WHERE lease_owner = ? AND status IN ('pending', 'sent')",
                           (in_doubt_if_sent, now, owner))
                return db.changes()
            case Housekeep(now=given_now):
                return self._housekeep(db, given_now or now)
        raise TypeError(f"unknown write command {type(command).__name__}")

    def _refuse_new_messages_near_the_cap(self, db: apsw.Connection) -> None:
        """New messages stop at 90% of ``max_db_bytes``: the rest stays for the status updates
        of messages already accepted, so a full database still delivers what it holds."""
        if not self.settings.max_db_bytes:
            return
        used = _scalar(db, "PRAGMA page_count") - _scalar(db, "PRAGMA freelist_count")
        if used * _scalar(db, "PRAGMA page_size") >= ACCEPT_SHARE_OF_CAP * self.settings.max_db_bytes:
            self._alert("persistence", "the database is full: at its size cap (store.max_db_megabytes); "
                        "new messages are refused until retention frees space")
            raise StoreUnavailable("the database is full (store.max_db_megabytes reached); "
                                   "nothing was accepted")

    def _accept(self, db: apsw.Connection, messages: Sequence[tuple[OutgoingMessage, DedupProbe]],
                now: float) -> list[Receipt | TgrelayError]:
        """Insert the messages no earlier row matches, in a handful of statements for the batch.

        Few statements matter: apsw releases the GIL around every SQLite call, and with many
        caller threads each re-acquisition is a wait. So the batch is looked up with one query,
        inserted with one ``executemany``, and its duplicates among themselves found in Python.
        """
        earlier = self._earlier_rows(db, {probe.hash for _, probe in messages}, now)
        results: list[Receipt | TgrelayError | None] = []
        fresh: list[tuple[int, OutgoingMessage, DedupProbe]] = []
        in_batch: dict[str, tuple[int, str]] = {}  # hash -> (index in fresh, payload hash)
        for message, probe in messages:
            match = _latest_match(earlier.get(probe.hash, ()), now - probe.match_seconds)
            if match is None and probe.hash in in_batch:
                index, payload_hash = in_batch[probe.hash]
                match = (-1 - index, payload_hash, PENDING)  # resolved to an id after insert
            if match is None:
                in_batch[probe.hash] = (len(fresh), probe.payload_hash)
                fresh.append((len(results), message, probe))
                results.append(None)
            elif probe.dedup_key is not None and match[1] != probe.payload_hash:
                results.append(DedupConflict(probe.dedup_key, match[0]))
            else:
                results.append(Receipt(match[0], match[2], duplicate=True))
        ids = [row[0] for row in db.executemany(
            "INSERT INTO message_store (chat_id, message_text, timestamp, status, pool, "
            "dedup_hash, parse_mode, disable_notification, next_attempt_at, updated_at) "
            "VALUES (?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?) RETURNING id",
            [(m.chat_id, m.text, now, m.pool, p.hash, m.parse_mode, int(m.disable_notification),
              now, now) for _, m, p in fresh])] if fresh else []
        if fresh:
            expires = now + self.settings.dedup_ttl_seconds
            db.executemany(
                "INSERT INTO deduplication_cache (hash, message_id, payload_hash, created_at, "
                "expires_at) VALUES (?, ?, ?, ?, ?)",
                [(p.hash, message_id, p.payload_hash, now, expires)
                 for (_, _, p), message_id in zip(fresh, ids, strict=True)])
        for (position, _, _), message_id in zip(fresh, ids, strict=True):
            results[position] = Receipt(message_id, PENDING, duplicate=False)
        return [_resolve_in_batch(result, ids) for result in results]

    @staticmethod
    def _earlier_rows(db: apsw.Connection, hashes: set[str], now: float
                      ) -> dict[str, list[tuple[int, str, str, float]]]:
        found: dict[str, list[tuple[int, str, str, float]]] = {}
        ordered = sorted(hashes)
        for start in range(0, len(ordered), 500):
            chunk = ordered[start:start + 500]
            rows = db.execute(
                "SELECT c.hash, c.message_id, c.payload_hash, coalesce(m.status, 'archived'), "
                "c.created_at FROM deduplication_cache c "
                "LEFT JOIN message_store m ON m.id = c.message_id "
                f"WHERE c.hash IN ({','.join('?' * len(chunk))}) AND c.expires_at > ?",
                (*chunk, now))
            for hash_, message_id, payload_hash, status, created_at in rows:
                found.setdefault(hash_, []).append((message_id, payload_hash, status, created_at))
        return found

    def _claim(self, db: apsw.Connection, pool: str, owners: Sequence[str],
               tokens: Sequence[str], now: float) -> list[ClaimedMessage]:
        if not owners:
            return []
        # Over-read: rows of a chat that is already busy (or already taken in this page) are
        # skipped so that each chat has at most one message in flight, in accepted order.
        rows: list[Any] = db.execute(
            "SELECT id, chat_id, message_text, parse_mode, disable_notification, retry_count, "
            "timestamp FROM message_store m WHERE status = 'pending' AND lease_owner IS NULL "
            "AND pool = ? AND next_attempt_at <= ? AND NOT EXISTS (SELECT 1 FROM message_store b "
            "WHERE b.chat_id = m.chat_id AND b.lease_owner IS NOT NULL) "
            "ORDER BY next_attempt_at, id LIMIT ?", (pool, now, len(owners) * 4)).fetchall()
        refused = self._refused_tokens(db, [row[0] for row in rows])
        free_slots = list(range(len(owners)))
        claimed: list[ClaimedMessage] = []
        chats: set[Any] = set()
        for message_id, chat_id, text, parse_mode, silent, retries, accepted_at in rows:
            if chat_id in chats:
                continue
            chats.add(chat_id)
            excluded = refused.get(message_id, ())
            slot = next((s for s in free_slots if tokens[s] not in excluded), None)
            if slot is None:
                continue
            free_slots.remove(slot)
            claimed.append(ClaimedMessage(message_id, chat_id, text, pool, parse_mode,
                                          bool(silent), retries, owners[slot], tokens[slot],
                                          accepted_at))
            if not free_slots:
                break
        db.executemany("UPDATE message_store SET lease_owner = ?, token = ?, updated_at = ? "
                       "WHERE id = ?", [(c.owner, c.token, now, c.id) for c in claimed])
        return claimed

    @staticmethod
    def _refused_tokens(db: apsw.Connection, ids: Sequence[int]) -> dict[int, set[str]]:
        if not ids or not db.execute("SELECT EXISTS (SELECT 1 FROM message_unreachable)").get:
            return {}
        refused: dict[int, set[str]] = {}
        marks = ",".join("?" * len(ids))
        for message_id, token in db.execute(
                f"SELECT message_id, token FROM message_unreachable WHERE message_id IN ({marks})",
                ids):
            refused.setdefault(message_id, set()).add(token)
        return refused

    @staticmethod
    def _fail_refused(db: apsw.Connection, pool: str, candidates: Sequence[str], now: float
                      ) -> list[int]:
        if not candidates or not db.execute(
                "SELECT EXISTS (SELECT 1 FROM message_unreachable)").get:
            return []
        marks = ",".join("?" * len(candidates))
        rows: list[Any] = db.execute(
            f"SELECT u.message_id, max(u.reason), group_concat(u.token, ', ') "
            f"FROM message_unreachable u JOIN message_store m ON m.id = u.message_id "
            f"WHERE m.pool = ? AND m.status = 'pending' AND m.lease_owner IS NULL "
            f"AND u.token IN ({marks}) GROUP BY u.message_id "
            f"HAVING count(DISTINCT u.token) = ?", (pool, *candidates, len(set(candidates)))
        ).fetchall()
        db.executemany(
            "UPDATE message_store SET status = 'failed', last_error = ?, lease_owner = NULL, "
            "updated_at = ? WHERE id = ?",
            [(f"{reason} (refused by every usable token of the pool: {tokens})", now, message_id)
             for message_id, reason, tokens in rows])
        return [message_id for message_id, _, _ in rows]

    def _mark_sent(self, db: apsw.Connection, ids: Iterable[int], token: str, owner: str,
                   now: float) -> list[int]:
        """Only rows still leased to ``owner`` may go out: a rerouted row is not sent twice."""
        marked = []
        for message_id in ids:
            db.execute("UPDATE message_store SET status = 'sent', token = ?, updated_at = ? "
                       "WHERE id = ? AND lease_owner = ? AND status = 'pending'",
                       (token, now, message_id, owner))
            if db.changes() == 1:
                marked.append(message_id)
        return marked

    def _mark_unreachable(self, db: apsw.Connection, command: MarkUnreachable, now: float
                          ) -> str:
        leased = db.execute("SELECT 1 FROM message_store WHERE id = ? AND lease_owner = ? "
                            "AND status IN ('pending', 'sent')",
                            (command.id, command.owner)).fetchone()
        if leased is None:
            return "lost"
        db.execute("INSERT OR REPLACE INTO message_unreachable (message_id, token, reason) "
                   "VALUES (?, ?, ?)", (command.id, command.token, command.reason))
        refused = {token for (token,) in db.execute(
            "SELECT token FROM message_unreachable WHERE message_id = ?", (command.id,))}
        if refused.issuperset(command.candidates):
            reason = (f"{command.reason} (refused by every token of the pool: "
                      f"{', '.join(sorted(refused))})")
            db.execute("UPDATE message_store SET status = 'failed', last_error = ?, token = ?, "
                       "lease_owner = NULL, updated_at = ? WHERE id = ?",
                       (reason, command.token, now, command.id))
            return "failed"
        db.execute("UPDATE message_store SET status = 'pending', lease_owner = NULL, "
                   "last_error = ?, updated_at = ? WHERE id = ?",  # it keeps its turn
                   (command.reason, now, command.id))
        return "released"

    def _release(self, db: apsw.Connection, command: ReleaseMessage, now: float) -> bool:
        db.execute(
            "UPDATE message_store SET status = 'pending', lease_owner = NULL, "
            "retry_count = retry_count + ?, in_doubt_count = in_doubt_count + ?, "
            "next_attempt_at = CASE WHEN ? THEN next_attempt_at ELSE ? END, "
            "last_error = coalesce(?, last_error), chat_id = coalesce(?, chat_id), updated_at = ? "
            "WHERE id = ? AND status NOT IN ('confirmed', 'failed')",
            (int(command.count_retry), int(command.in_doubt), int(command.keep_place),
             now + command.delay_seconds, command.error, command.new_chat_id, now, command.id))
        return db.changes() == 1

    def _housekeep(self, db: apsw.Connection, now: float) -> dict[str, int]:
        cutoff = now - self.settings.retention_days * 86400
        ids = [row[0] for row in db.execute(
            "SELECT id FROM message_store WHERE status IN ('confirmed', 'failed') "
            "AND updated_at < ? LIMIT ?", (cutoff, HOUSEKEEPING_PAGE))]
        if ids:
            marks = ",".join("?" * len(ids))
            if self.settings.archive_path:
                db.execute(f"INSERT OR REPLACE INTO archive.message_store "
                           f"SELECT * FROM main.message_store WHERE id IN ({marks})", ids)
            db.execute(f"DELETE FROM main.message_store WHERE id IN ({marks})", ids)
        db.execute("DELETE FROM deduplication_cache WHERE rowid IN (SELECT rowid FROM "
                   "deduplication_cache WHERE expires_at <= ? LIMIT ?)", (now, HOUSEKEEPING_PAGE))
        return {"archived": len(ids), "expired": db.changes()}

    # --- reads (after a commit) -------------------------------------------------------------

    def _answer_read(self, command: StoreCommand) -> None:
        db = self._connection(command.reply)
        if db is None:
            return
        try:
            match command:
                case GetMessage(id=message_id):
                    row = db.execute(f"SELECT {_MESSAGE_FIELDS} FROM message_store WHERE id = ?",
                                     (message_id,)).fetchone()
                    if row is None:
                        raise MessageNotFound(f"no message with id {message_id}")
                    command.reply.set_result(StoredMessage(*row))
                case Ping():
                    command.reply.set_result(True)
                case GetStatistics():
                    command.reply.set_result(self._statistics(db))
                case CheckIntegrity():
                    healthy = self._quick_check()
                    if not healthy:
                        self._alert("database_corruption", "scheduled integrity check failed; "
                                    "moving the file aside and recovering what can be read")
                        self._recover_damaged_file()
                    command.reply.set_result(healthy)
                case _:
                    raise TypeError(f"unknown read command {type(command).__name__}")
        except _UNAVAILABLE + _DAMAGED as error:
            self._handle_database_error(error, command.reply)
        except Exception as error:  # noqa: BLE001 -- the caller receives it
            command.reply.set_exception(error)

    def _statistics(self, db: apsw.Connection) -> dict[str, Any]:
        counts = dict.fromkeys(STATUSES, 0)
        counts.update(db.execute("SELECT status, count(*) FROM message_store GROUP BY status"))
        leased = _scalar(db, "SELECT count(*) FROM message_store WHERE lease_owner IS NOT NULL")
        in_doubt = _scalar(db, "SELECT coalesce(sum(in_doubt_count), 0) FROM message_store "
                               "WHERE in_doubt_count > 0")
        oldest = _scalar(db, "SELECT min(timestamp) FROM message_store WHERE status = 'pending'")
        page_size = _scalar(db, "PRAGMA page_size")
        pages = _scalar(db, "PRAGMA page_count")
        wal = Path(f"{self.settings.path}-wal")
        db_bytes = page_size * pages + (wal.stat().st_size if wal.exists() else 0)
        self._metrics.gauge("store.db_bytes", db_bytes)
        check = self.last_integrity_check
        return {
            "counts": counts,
            "in_flight": leased,
            "in_doubt": in_doubt,
            "oldest_pending_age_seconds": None if oldest is None else self._clock() - oldest,
            "db_bytes": db_bytes,
            "last_integrity_check": None if check is None else {"at": check[0], "ok": check[1]},
            "recovered_at_start": dataclasses.asdict(self.recovery),
        }


def _latest_match(rows: Iterable[tuple[int, str, str, float]], after: float
                  ) -> tuple[int, str, str] | None:
    """The most recent earlier row created after ``after``: (message id, payload hash, status)."""
    best = max((row for row in rows if row[3] > after), key=lambda row: row[3], default=None)
    return None if best is None else best[:3]


def _resolve_in_batch(result: Receipt | TgrelayError | None, ids: list[int]) -> Receipt | TgrelayError:
    """Duplicates of a message in the same batch point at it by a negative index until now."""
    if isinstance(result, DedupConflict) and result.original_id < 0:
        return DedupConflict(result.dedup_key, ids[-1 - result.original_id])
    if isinstance(result, Receipt) and result.id < 0:
        return Receipt(ids[-1 - result.id], result.status, duplicate=True)
    assert result is not None
    return result


def _scalar(db: apsw.Connection, sql: str, bindings: tuple[Any, ...] = ()) -> Any:
    """The single value of a query that always returns one row (a count, a pragma)."""
    row = db.execute(sql, bindings).fetchone()
    assert row is not None, sql
    return row[0]


def _migrate(db: apsw.Connection) -> None:
    version = _scalar(db, "PRAGMA user_version")
    if version > SCHEMA_VERSION:
        raise StoreUnavailable(f"the database has schema version {version}, newer than this "
                               f"tgrelay understands ({SCHEMA_VERSION}); upgrade tgrelay")
    for step in range(version, SCHEMA_VERSION):
        with db:
            db.execute(MIGRATIONS[step])
            db.execute(f"PRAGMA user_version = {step + 1}")


def _salvage(damaged: Path, fresh: apsw.Connection) -> int:
    """Copy what can still be read from ``damaged``, page by page, skipping unreadable spans."""
    try:
        source = apsw.Connection(str(damaged), flags=apsw.SQLITE_OPEN_READONLY)
    except apsw.Error:
        return 0
    try:
        copied = _salvage_table(source, fresh, "message_store", "id")
        _salvage_table(source, fresh, "deduplication_cache", "rowid")
    finally:
        source.close()
    # A destroyed message must be accepted again when it is resent, not answered "duplicate".
    with fresh:
        fresh.execute("DELETE FROM deduplication_cache WHERE message_id NOT IN "
                      "(SELECT id FROM message_store)")
    return copied


_MAX_KEY = 2**63 - 1  # SQLite's largest integer key: stepping over damage must stop below it


def _salvage_table(source: apsw.Connection, fresh: apsw.Connection, table: str, key: str) -> int:
    try:
        names = [row[1] for row in source.execute(f"PRAGMA table_info({table})")]
    except apsw.Error:
        return 0
    if not names:
        return 0
    wanted = [row[1] for row in fresh.execute(f"PRAGMA table_info({table})")]
    names = [name for name in names if name in wanted]
    select = f"SELECT {key}, {', '.join(names)} FROM {table} WHERE {key} > ? ORDER BY {key} LIMIT ?"
    insert = (f"INSERT OR IGNORE INTO {table} ({', '.join(names)}) "
              f"VALUES ({', '.join('?' * len(names))})")
    # Read in pages; when a read fails, go row by row up to the damage, then step over the
    # unreadable span one key at a time (doubling only after long gaps) so little is lost.
    last, page, step, failures, copied = 0, 500, 1, 0, 0
    while failures < 5000 and last < _MAX_KEY - step:
        try:
            rows = source.execute(select, (last, page)).fetchall()
        except apsw.Error:
            if page > 1:
                page = 1
                continue
            failures += 1
            last, step = last + step, step if failures < 1000 else min(step * 2, 2**32)
            continue
        if not rows:
            break
        with fresh:
            for row in rows:
                try:
                    fresh.execute(insert, row[1:])
                    copied += 1
                except apsw.ConstraintError:
                    log.warning("salvage skipped an inconsistent %s row", table)
        last, page, step = rows[-1][0], 500, 1  # type: ignore[assignment]
    return copied


def _describe(error: apsw.Error) -> str:
    if isinstance(error, apsw.FullError):
        return "the database or the disk is full"
    if isinstance(error, apsw.BusyError | apsw.LockedError):
        return "the database is locked by another process"
    if isinstance(error, _DAMAGED):
        return "the database file is damaged"
    if isinstance(error, apsw.ReadOnlyError):
        return "the database is read-only"
    return f"the database failed: {type(error).__name__}"


class StoreClient:
    """Typed, blocking access to the store actor, for any thread but the store's own."""

    def __init__(self, actor: pykka.ActorRef[StoreActor], timeout: float = 30.0) -> None:
        self.actor = actor
        self.timeout = timeout

    def submit(self, command: StoreCommand) -> Reply[Any]:
        try:
            self.actor.tell(command)
        except pykka.ActorDeadError:
            command.reply.set_exception(StoreUnavailable("the store is not running"))
        return command.reply

    def call(self, command: StoreCommand) -> Any:
        future = self.submit(command)
        try:
            return future.result(timeout=self.timeout)
        except TimeoutError:
            raise StoreUnavailable(f"the store did not answer within {self.timeout:g} s") from None

    def get(self, message_id: int) -> StoredMessage:
        result: StoredMessage = self.call(GetMessage(message_id))
        return result

    def statistics(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call(GetStatistics())
        return result


def start_store(settings: StoreSettings, metrics: Metrics | None = None,
                alert: AlertSink = log_alert, clock: Callable[[], float] = time.time) -> StoreClient:
    """Start the store actor and wait until its database is open and recovered."""
    ref = StoreActor.start(settings, metrics, alert, clock)
    client = StoreClient(ref)
    try:
        client.statistics()  # blocks until on_start (open, check, recover) has finished
    except StoreUnavailable:
        ref.stop()
        raise
    return client


__all__ = ["StoreActor", "StoreClient", "StoreSettings", "start_store"]
