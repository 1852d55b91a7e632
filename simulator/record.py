"""The record: every API call the simulator saw and every message it delivered.

Handler threads append; tests and the control endpoint read snapshots. One lock guards both
lists; reads copy under the lock, so a reader never sees a half-written entry. Bots appear by id
and username only: a token never enters the record.

Times come in two flavours: ``timestamp`` (``time.time()``, comparable across processes) and
``monotonic`` (``time.monotonic()``, for exact intervals inside one process).
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True, slots=True)
class Delivery:
    """A message Telegram would have shown in a chat.

    ``chat_id`` is the resolved numeric id; ``chat_ref`` is what the client sent (an id or an
    ``@username``, lowercased). ``text`` is exactly what the client sent (Telegram's answer
    trims surrounding whitespace). ``answer_delayed`` marks a delivery whose answer was held back by the
    accept-then-timeout fault, so the client probably never learnt of it.
    """

    bot_id: int
    bot_username: str
    chat_id: int
    chat_ref: int | str
    text: str
    message_id: int
    timestamp: float
    monotonic: float
    answer_delayed: bool = False

    def to_json(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Call:
    """One request to ``/bot<token>/<method>``, whatever its outcome.

    ``bot_id`` is the id half of the token (also for unknown tokens), ``None`` when the token
    was malformed. ``status`` is the HTTP status answered, ``None`` when the connection was reset
    instead. ``fault`` names the injected fault that shaped the answer, if any. Times are those
    of the request's arrival.
    """

    bot_id: int | None
    method: str
    status: int | None
    chat_id: int | str | None
    retry_after: int | None
    fault: str | None
    timestamp: float
    monotonic: float

    def to_json(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Duplicate:
    """The same text delivered more than once to the same chat."""

    chat_id: int
    text: str
    deliveries: tuple[Delivery, ...]

    @property
    def count(self) -> int:
        return len(self.deliveries)

    def to_json(self) -> dict[str, object]:
        return {
            "chat_id": self.chat_id,
            "text": self.text,
            "count": self.count,
            "message_ids": [delivery.message_id for delivery in self.deliveries],
            "bot_ids": [delivery.bot_id for delivery in self.deliveries],
        }


class Record:
    """Thread-safe, append-only (until :meth:`clear`) log of calls and deliveries."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: list[Call] = []
        self._deliveries: list[Delivery] = []
        self._copies: Counter[tuple[int, str]] = Counter()

    def add_call(self, call: Call) -> None:
        with self._lock:
            self._calls.append(call)

    def add_delivery(self, delivery: Delivery) -> None:
        with self._lock:
            self._deliveries.append(delivery)
            self._copies[(delivery.chat_id, delivery.text)] += 1

    def clear(self) -> None:
        with self._lock:
            self._calls.clear()
            self._deliveries.clear()
            self._copies.clear()

    def deliveries(self, bot_id: int | None = None, chat_id: int | None = None) -> list[Delivery]:
        """Deliveries in the order they happened, optionally only one bot's or one chat's."""
        with self._lock:
            found = list(self._deliveries)
        if bot_id is not None:
            found = [delivery for delivery in found if delivery.bot_id == bot_id]
        if chat_id is not None:
            found = [delivery for delivery in found if delivery.chat_id == chat_id]
        return found

    def delivery_count(self, bot_id: int | None = None, chat_id: int | None = None) -> int:
        if bot_id is None and chat_id is None:
            with self._lock:
                return len(self._deliveries)
        return len(self.deliveries(bot_id=bot_id, chat_id=chat_id))

    def delivered_texts(self, chat_id: int | None = None) -> list[str]:
        return [delivery.text for delivery in self.deliveries(chat_id=chat_id)]

    def duplicates(self) -> list[Duplicate]:
        """Every (chat_id, text) delivered more than once, with all of its deliveries."""
        with self._lock:
            repeated = {key for key, copies in self._copies.items() if copies > 1}
            if not repeated:
                return []
            found = [d for d in self._deliveries if (d.chat_id, d.text) in repeated]
        grouped: dict[tuple[int, str], list[Delivery]] = {}
        for delivery in found:
            grouped.setdefault((delivery.chat_id, delivery.text), []).append(delivery)
        return [
            Duplicate(chat_id=chat_id, text=text, deliveries=tuple(copies))
            for (chat_id, text), copies in grouped.items()
        ]

    def calls(self, bot_id: int | None = None, method: str | None = None) -> list[Call]:
        """Calls in arrival order, optionally only one bot's or one method's."""
        with self._lock:
            found = list(self._calls)
        found.sort(key=lambda call: call.monotonic)
        if bot_id is not None:
            found = [call for call in found if call.bot_id == bot_id]
        if method is not None:
            found = [call for call in found if call.method.lower() == method.lower()]
        return found

    def call_counts(self) -> dict[int | None, int]:
        """Calls per bot id (``None``: malformed tokens)."""
        with self._lock:
            return dict(Counter(call.bot_id for call in self._calls))

    def rate_limited_counts(self) -> dict[int | None, int]:
        """429 answers per bot id."""
        with self._lock:
            return dict(Counter(call.bot_id for call in self._calls if call.status == 429))

    def call_times(self, bot_id: int) -> list[float]:
        """Monotonic arrival times of every call to ``bot_id``, ascending."""
        return [call.monotonic for call in self.calls(bot_id=bot_id)]

    def retry_after_violations(self, grace: float = 0.0, per_chat: bool = False) -> list[Call]:
        """Calls that arrived while an earlier 429's ``retry_after`` still ran for that bot.

        With ``per_chat`` a 429 only covers later calls to the same chat. ``grace`` forgives
        calls that arrived that many seconds early (requests already in flight when the 429
        was answered, for a client with several workers).
        """
        cooling_until: dict[tuple[int | None, int | str | None], float] = {}
        violations = []
        for call in self.calls():
            key = (call.bot_id, call.chat_id if per_chat else None)
            if call.monotonic < cooling_until.get(key, float("-inf")) - grace:
                violations.append(call)
            if call.status == 429 and call.retry_after is not None:
                until = call.monotonic + call.retry_after
                cooling_until[key] = max(cooling_until.get(key, until), until)
        return violations

    def statistics(self) -> dict[str, object]:
        """A snapshot: totals, and per bot id the calls, deliveries, 429s and statuses."""
        with self._lock:
            calls = list(self._calls)
            deliveries = list(self._deliveries)
            duplicated = sum(1 for copies in self._copies.values() if copies > 1)
        tallies: dict[int | None, _BotTally] = {}
        for call in calls:
            tally = tallies.setdefault(call.bot_id, _BotTally())
            tally.calls += 1
            status = "reset" if call.status is None else str(call.status)
            tally.by_status[status] = tally.by_status.get(status, 0) + 1
            tally.rate_limited += call.status == 429
        for delivery in deliveries:
            tallies.setdefault(delivery.bot_id, _BotTally()).delivered += 1
        return {
            "calls": len(calls),
            "deliveries": len(deliveries),
            "duplicated_messages": duplicated,
            "bots": {str(bot_id): asdict(tally) for bot_id, tally in tallies.items()},
        }


@dataclass
class _BotTally:
    calls: int = 0
    delivered: int = 0
    rate_limited: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
