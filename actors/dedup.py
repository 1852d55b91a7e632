"""The deduplicator actor: recognises a message handed over twice, and batches intake.

Two kinds of identity (DESIGN.md 9):

* content: SHA-256 over the canonical ``(chat_id, text)``; a second one within a *sliding*
  ``window_seconds`` of the first is a duplicate. Sliding, because fixed time buckets miss a
  pair that straddles a bucket edge;
* a caller's ``dedup_key`` (like an SQS deduplication id or a Stripe idempotency key): the
  same key within ``ttl_seconds`` is a duplicate, and the same key with a different payload is
  a client bug answered with :class:`~actors.errors.DedupConflict`.

Every message on its way into the store passes through this actor. Like the store's group
commit, it drains its mailbox: everything it found becomes one ``AcceptMessages`` command, so
sixteen concurrent callers cost one store command, not sixteen. It never waits for the store:
the store's answer is delivered to each caller by a callback when the commit is done.

The store is the arbiter: it checks ``deduplication_cache`` inside the accepting transaction,
which is what makes "N threads submit the same message, exactly one is accepted" true, also
after a restart. This actor's in-memory front remembers recent keys and their payloads, so a
reused key with another payload is refused at once, before any database work.

Threading: :meth:`on_receive` runs in the actor's thread; the delivery callback runs in the
store's thread after its commit; :func:`fingerprint` is pure and runs anywhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pykka

from actors.errors import DedupConflict, TgrelayError
from actors.messages import AcceptMessages, ChatId, DedupProbe, OutgoingMessage, Receipt
from actors.reply import Reply

MEMORY_LIMIT = 200_000
MAX_FORWARD = 5000  # messages in one AcceptMessages: bounds one transaction's size


@dataclass(frozen=True)
class AdmitMessages:
    """Deduplicate and store these messages; ``reply`` gets one result per message."""

    messages: tuple[OutgoingMessage, ...]
    reply: Reply[list[Receipt | TgrelayError]] = field(default_factory=Reply, compare=False)


@dataclass(frozen=True)
class RememberAccepted:
    """The store accepted these probes as new messages (from the delivery callback)."""

    accepted: tuple[tuple[DedupProbe, int], ...]


@dataclass(frozen=True)
class _Remembered:
    message_id: int
    created_at: float
    payload_hash: str
    match_seconds: float


def canonical_chat(chat_id: ChatId) -> str:
    """Telegram usernames are case-insensitive; numeric ids are compared as numbers."""
    return chat_id.lower() if isinstance(chat_id, str) else str(int(chat_id))


def _sha256(*parts: object) -> str:
    # Length-prefixed, so no choice of texts can make two different tuples encode alike.
    encoded = "".join(f"{len(text)}:{text}" for text in map(str, parts))
    return hashlib.sha256(encoded.encode("utf-8", "surrogatepass")).hexdigest()


def fingerprint(message: OutgoingMessage, window_seconds: float, ttl_seconds: float) -> DedupProbe:
    """The probe the store checks for ``message``."""
    chat = canonical_chat(message.chat_id)
    payload_hash = _sha256(chat, message.text, message.pool, message.parse_mode,
                           message.disable_notification)
    if message.dedup_key is not None:
        return DedupProbe(_sha256("key", message.dedup_key), payload_hash, ttl_seconds,
                          message.dedup_key)
    return DedupProbe(_sha256("content", chat, message.text), payload_hash, window_seconds)


class DeduplicatorActor(pykka.ThreadingActor):
    use_daemon_thread = True  # a process that forgets stop() still exits; nothing is lost
    def __init__(self, window_seconds: float, ttl_seconds: float,
                 submit_to_store: Callable[[AcceptMessages], Reply[Any]],
                 clock: Callable[[], float] = time.time, memory_limit: int = MEMORY_LIMIT) -> None:
        super().__init__()
        self.window_seconds = window_seconds
        self.ttl_seconds = ttl_seconds
        self._submit = submit_to_store
        self._clock = clock
        self._memory_limit = memory_limit
        self._front: OrderedDict[str, _Remembered] = OrderedDict()
        self._waiting: list[tuple[AdmitMessages, list[DedupProbe | DedupConflict]]] = []
        self._waiting_count = 0
        self.conflicts_at_front = 0

    def on_receive(self, message: Any) -> Any:
        match message:
            case AdmitMessages():
                self._admit(message)
            case RememberAccepted(accepted=accepted):
                self._remember(accepted)
            case _:
                raise TypeError(f"the deduplicator does not understand {type(message).__name__}")
        self._forward_if_idle()
        return None

    def statistics(self) -> dict[str, int]:
        self._forward_if_idle()  # proxy calls bypass on_receive; admissions must not wait on them
        return {"remembered": len(self._front), "conflicts_at_front": self.conflicts_at_front}

    def _forward_if_idle(self) -> None:
        if self._waiting and (self._waiting_count >= MAX_FORWARD or self.actor_inbox.empty()):
            self._forward()

    def on_stop(self) -> None:
        self._forward()

    # --- admission --------------------------------------------------------------------------

    def _admit(self, command: AdmitMessages) -> None:
        now = self._clock()
        self._forget_expired(now)
        admissions: list[DedupProbe | DedupConflict] = []
        try:
            probes = [fingerprint(message, self.window_seconds, self.ttl_seconds)
                      for message in command.messages]
        except Exception as error:  # noqa: BLE001 -- a bad message fails its caller, not the actor
            command.reply.set_exception(error)
            return
        for probe in probes:
            known = self._front.get(probe.hash)
            if (known is not None and probe.dedup_key is not None
                    and known.created_at > now - probe.match_seconds
                    and known.payload_hash != probe.payload_hash):
                self.conflicts_at_front += 1
                admissions.append(DedupConflict(probe.dedup_key, known.message_id))
            else:
                admissions.append(probe)
        self._waiting.append((command, admissions))
        self._waiting_count += len(command.messages)

    def _forward(self) -> None:
        """Everything admitted since the last forward goes to the store as one command."""
        waiting, self._waiting, self._waiting_count = self._waiting, [], 0
        if not waiting:
            return
        to_store = tuple((message, admission)
                         for command, admissions in waiting
                         for message, admission in zip(command.messages, admissions, strict=True)
                         if isinstance(admission, DedupProbe))
        if not to_store:
            _deliver(waiting, [], None)
            return
        stored = self._submit(AcceptMessages(to_store))
        remember = self.actor_ref.tell
        stored.add_done_callback(lambda done: _deliver(waiting, done, remember))

    def _remember(self, accepted: Sequence[tuple[DedupProbe, int]]) -> None:
        now = self._clock()
        for probe, message_id in accepted:
            self._front[probe.hash] = _Remembered(message_id, now, probe.payload_hash,
                                                  probe.match_seconds)
            self._front.move_to_end(probe.hash)
        while len(self._front) > self._memory_limit:
            self._front.popitem(last=False)

    def _forget_expired(self, now: float) -> None:
        # Entries are in insertion (= time) order; a key entry may outlive the window, so we
        # stop at the first entry that is still useful rather than scan everything.
        while self._front:
            oldest = next(iter(self._front.values()))
            if oldest.created_at > now - oldest.match_seconds:
                break
            self._front.popitem(last=False)


def _deliver(waiting: list[tuple[AdmitMessages, list[DedupProbe | DedupConflict]]],
             stored: Reply[Any] | list[Any], remember: Callable[[Any], None] | None) -> None:
    """Give each caller its results (runs in the store's thread, after the commit)."""
    if isinstance(stored, Reply) and stored.exception() is not None:
        for command, _ in waiting:
            command.reply.set_exception(stored.exception())  # type: ignore[arg-type]
        return
    outcomes = iter(stored.result() if isinstance(stored, Reply) else stored)
    accepted: list[tuple[DedupProbe, int]] = []
    for command, admissions in waiting:
        results: list[Receipt | TgrelayError] = []
        for admission in admissions:
            if isinstance(admission, DedupConflict):
                results.append(admission)
                continue
            outcome = next(outcomes)
            if isinstance(outcome, Receipt) and not outcome.duplicate:
                accepted.append((admission, outcome.id))
            results.append(outcome)
        command.reply.set_result(results)
    if accepted and remember is not None:
        # While stopping the actor may be gone: the front is only a cache, the store has every row.
        with contextlib.suppress(pykka.ActorDeadError):
            remember(RememberAccepted(tuple(accepted)))
