"""The deduplicator actor: recognises a message handed over twice.

Two kinds of identity (DESIGN.md 9):

* content: SHA-256 over the canonical ``(chat_id, text)``; a second one within a *sliding*
  ``window_seconds`` of the first is a duplicate. Sliding, because fixed time buckets miss a
  pair that straddles a bucket edge;
* a caller's ``dedup_key`` (like an SQS deduplication id or a Stripe idempotency key): the
  same key within ``ttl_seconds`` is a duplicate, and the same key with a different payload is
  a client bug answered with :class:`~actors.errors.DedupConflict`.

The actor keeps a bounded in-memory front of recent decisions, so a burst of retries is
answered without a write transaction. The store is the arbiter for everything the front does
not know (after a restart, or two identical messages in flight at once): it checks
``deduplication_cache`` inside the accepting transaction, which is what makes "N threads submit
the same message, exactly one is accepted" true.

Threading: :meth:`admit` and :meth:`remember` run in the actor's thread (called through a
pykka proxy); :func:`fingerprint` is pure and runs anywhere.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pykka

from actors.errors import DedupConflict
from actors.messages import ChatId, DedupProbe, OutgoingMessage

MEMORY_LIMIT = 200_000


@dataclass(frozen=True)
class KnownDuplicate:
    """The front already knows the original: no write is needed."""

    original_id: int


Admission = DedupProbe | KnownDuplicate | DedupConflict


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
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()


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
    def __init__(self, window_seconds: float, ttl_seconds: float,
                 clock: Callable[[], float] = time.time, memory_limit: int = MEMORY_LIMIT) -> None:
        super().__init__()
        self.window_seconds = window_seconds
        self.ttl_seconds = ttl_seconds
        self._clock = clock
        self._memory_limit = memory_limit
        self._front: OrderedDict[str, _Remembered] = OrderedDict()
        self.front_hits = 0

    def admit(self, messages: Sequence[OutgoingMessage]) -> list[Admission]:
        """For each message: a known duplicate, a conflict, or a probe for the store."""
        now = self._clock()
        self._forget_expired(now)
        admissions: list[Admission] = []
        for message in messages:
            probe = fingerprint(message, self.window_seconds, self.ttl_seconds)
            known = self._front.get(probe.hash)
            if known is None or known.created_at <= now - probe.match_seconds:
                admissions.append(probe)
            elif probe.dedup_key is not None and known.payload_hash != probe.payload_hash:
                admissions.append(DedupConflict(probe.dedup_key, known.message_id))
            else:
                self.front_hits += 1
                admissions.append(KnownDuplicate(known.message_id))
        return admissions

    def remember(self, accepted: Sequence[tuple[DedupProbe, int]]) -> None:
        """Record probes the store accepted as new messages (a ``tell``; nobody waits)."""
        now = self._clock()
        for probe, message_id in accepted:
            self._front[probe.hash] = _Remembered(message_id, now, probe.payload_hash,
                                                  probe.match_seconds)
            self._front.move_to_end(probe.hash)
        while len(self._front) > self._memory_limit:
            self._front.popitem(last=False)

    def statistics(self) -> dict[str, int]:
        return {"remembered": len(self._front), "front_hits": self.front_hits}

    def _forget_expired(self, now: float) -> None:
        # Entries are in insertion (= time) order; a key entry may outlive the window, so we
        # stop at the first entry that is still useful rather than scan everything.
        while self._front:
            oldest = next(iter(self._front.values()))
            if oldest.created_at > now - oldest.match_seconds:
                break
            self._front.popitem(last=False)
