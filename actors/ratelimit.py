"""Time on the sending side: Telegram's rate limits, and the alarm that waits for them.

A token actor must never sleep in its mailbox, so a budget that is not open yet becomes an
alarm: :class:`Alarm` runs on one daemon thread and, when a deadline passes, calls a short
callback (always a ``tell`` to an actor) from that thread.

:class:`Gcra` and :class:`ChatLimits` are plain objects owned by one token actor and used
only from its thread. All times are ``time.monotonic()`` seconds.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import pykka

from actors.messages import ChatId

log = logging.getLogger("tgrelay.alarm")

# Our clock and Telegram's differ by the network's jitter: keep a little under each limit.
CHAT_MARGIN_FRACTION = 0.02
CHAT_MARGIN_SECONDS = 0.02
GROUP_WINDOW_SECONDS = 60.0


class Gcra:
    """``rate`` sends a second with bursts of ``burst`` (the virtual-scheduling token bucket)."""

    def __init__(self, rate: float, burst: int) -> None:
        self.interval = 1.0 / rate
        self._tolerance = (max(1, burst) - 1) * self.interval
        self._theoretical_arrival = -math.inf

    def wait(self, now: float) -> float:
        """Seconds until one more send conforms (0 when it does now)."""
        return max(0.0, self._theoretical_arrival - self._tolerance - now)

    def consume(self, now: float) -> None:
        self._theoretical_arrival = max(self._theoretical_arrival, now) + self.interval


def is_group_chat(chat_id: ChatId) -> bool:
    """Negative ids are groups and supergroups; ``@name`` is a channel: all share the group limit."""
    return not isinstance(chat_id, int) or chat_id < 0


class ChatLimits:
    """Per private chat (``per_second``) and per group (``per_minute``, a sliding minute).

    Times recorded are those at which a request actually left, so queueing in front of the
    network never makes two sends to one chat look further apart than they were.
    """

    def __init__(self, per_second: float, per_minute: float) -> None:
        self._private_interval = (1.0 / per_second) * (1 + CHAT_MARGIN_FRACTION) + CHAT_MARGIN_SECONDS
        self._group_count = max(1, int(per_minute))
        self._group_window = GROUP_WINDOW_SECONDS * (1 + CHAT_MARGIN_FRACTION) + CHAT_MARGIN_SECONDS
        self._private: dict[ChatId, float] = {}
        self._groups: dict[ChatId, deque[float]] = {}
        self._blocked_until: dict[ChatId, float] = {}

    def wait(self, chat_id: ChatId, now: float) -> float:
        """Seconds until a send to ``chat_id`` is allowed (0 when it is now)."""
        ready = self._blocked_until.get(chat_id, 0.0)
        if is_group_chat(chat_id):
            sent = self._groups.get(chat_id)
            if sent is not None and len(sent) >= self._group_count:
                ready = max(ready, sent[0] + self._group_window)
        elif chat_id in self._private:
            ready = max(ready, self._private[chat_id] + self._private_interval)
        return max(0.0, ready - now)

    def record(self, chat_id: ChatId, sent_at: float) -> None:
        if is_group_chat(chat_id):
            self._groups.setdefault(chat_id, deque(maxlen=self._group_count)).append(sent_at)
        else:
            self._private[chat_id] = max(sent_at, self._private.get(chat_id, sent_at))

    def block(self, chat_id: ChatId, until: float) -> None:
        """A 429 for this chat: nothing goes to it before ``until``."""
        self._blocked_until[chat_id] = max(until, self._blocked_until.get(chat_id, until))

    def forget_idle(self, now: float) -> None:
        """Drop chats whose limits have long expired (they behave exactly like unseen chats)."""
        self._private = {c: t for c, t in self._private.items() if t + self._private_interval > now}
        self._groups = {c: d for c, d in self._groups.items() if d[-1] + self._group_window > now}
        self._blocked_until = {c: t for c, t in self._blocked_until.items() if t > now}


class Alarm:
    """Runs callbacks at monotonic deadlines on one daemon thread.

    Callbacks run on the alarm's thread and must be quick (a ``tell``). A callback that
    raises is logged with its traceback and the alarm carries on.
    """

    def __init__(self, name: str = "tgrelay-alarm") -> None:
        self._heap: list[tuple[float, int, Callable[[], object]]] = []
        self._order = itertools.count()
        self._wakeup = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def at(self, deadline: float, callback: Callable[[], object]) -> None:
        with self._wakeup:
            if self._stopped:
                return
            heapq.heappush(self._heap, (deadline, next(self._order), callback))
            if self._heap[0][0] == deadline:  # a new earliest deadline: re-arm the wait
                self._wakeup.notify()

    def after(self, seconds: float, callback: Callable[[], object]) -> None:
        self.at(time.monotonic() + seconds, callback)

    def tell_after(self, seconds: float, ref: pykka.ActorRef[Any], message: object) -> None:
        """``ref.tell(message)`` in ``seconds``; nothing if the actor has stopped by then."""
        self.after(seconds, lambda: tell_if_alive(ref, message))

    def stop(self) -> None:
        with self._wakeup:
            self._stopped = True
            self._heap.clear()
            self._wakeup.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._wakeup:
                while not self._stopped and (not self._heap or self._heap[0][0] > time.monotonic()):
                    timeout = None if not self._heap else self._heap[0][0] - time.monotonic()
                    self._wakeup.wait(timeout)
                if self._stopped:
                    return
                _, _, callback = heapq.heappop(self._heap)
            try:
                callback()
            except Exception:
                log.exception("an alarm callback failed")


def tell_if_alive(ref: pykka.ActorRef[Any], message: object) -> bool:
    """Tell ``message``; ``False`` if the actor has stopped (a stopped actor needs no wake-up)."""
    try:
        ref.tell(message)
    except pykka.ActorDeadError:
        return False
    return True
