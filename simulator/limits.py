"""Telegram's rate limits: per bot, per private chat, per group.

Each limit is a GCRA (generic cell rate algorithm, the virtual-scheduling form of a token
bucket): ``count`` messages per ``period_seconds``, with a burst of ``count`` allowed up front
and a small timing tolerance so that network jitter never turns a client that respects the
limit into a 429. A rejected request consumes nothing. One lock guards all the state; every
operation is O(1), so handler threads hold it for microseconds.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

_PRUNE_ABOVE = 100_000


@dataclass(frozen=True)
class Rate:
    """``count`` messages per ``period_seconds``."""

    count: int
    period_seconds: float

    def __post_init__(self) -> None:
        if self.count < 1 or self.period_seconds <= 0:
            raise ValueError("a rate needs count >= 1 and period_seconds > 0")

    @property
    def interval(self) -> float:
        return self.period_seconds / self.count


@dataclass(frozen=True)
class Limits:
    """The limits the simulator enforces; the defaults are Telegram's documented ones.

    ``per_group`` applies to groups, supergroups and channels; ``per_private_chat`` to chats
    with users. ``tolerance_seconds`` absorbs jitter between a client's clock and ours.
    """

    per_bot: Rate = field(default_factory=lambda: Rate(30, 1.0))
    per_private_chat: Rate = field(default_factory=lambda: Rate(1, 1.0))
    per_group: Rate = field(default_factory=lambda: Rate(20, 60.0))
    tolerance_seconds: float = 0.05


class RateLimiter:
    """Decides whether a bot may send to a chat now; thread-safe."""

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self._limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._theoretical_arrival: dict[tuple[int, int | None], float] = {}
        self._prune_above = _PRUNE_ABOVE

    @property
    def limits(self) -> Limits:
        return self._limits

    def set_limits(self, limits: Limits) -> None:
        with self._lock:
            self._limits = limits
            self._theoretical_arrival.clear()

    def clear(self) -> None:
        with self._lock:
            self._theoretical_arrival.clear()

    def acquire(self, bot_id: int, chat_id: int, is_group: bool) -> int | None:
        """Consume one send for (bot, chat): ``None`` if allowed, else ``retry_after`` seconds.

        ``retry_after`` is a whole number of seconds, at least 1, after which this same send
        would be allowed (if nothing else consumes the budget in between).
        """
        limits = self._limits
        chat_rate = limits.per_group if is_group else limits.per_private_chat
        checks = (((bot_id, None), limits.per_bot), ((bot_id, chat_id), chat_rate))
        now = self._clock()
        with self._lock:
            wait = 0.0
            for key, rate in checks:
                tat = self._theoretical_arrival.get(key, now)
                allowed_at = tat - self._burst_tolerance(rate)
                wait = max(wait, allowed_at - now)
            if wait > 0:
                return max(1, math.ceil(wait))
            for key, rate in checks:
                tat = self._theoretical_arrival.get(key, now)
                self._theoretical_arrival[key] = max(tat, now) + rate.interval
            if len(self._theoretical_arrival) > self._prune_above:
                self._forget_idle(now)
        return None

    def _forget_idle(self, now: float) -> None:
        """Drop keys whose schedule is in the past: they behave exactly like unseen keys."""
        idle = [key for key, tat in self._theoretical_arrival.items() if tat <= now]
        for key in idle:
            del self._theoretical_arrival[key]
        self._prune_above = max(_PRUNE_ABOVE, 2 * len(self._theoretical_arrival))

    def _burst_tolerance(self, rate: Rate) -> float:
        return (rate.count - 1) * rate.interval + self._limits.tolerance_seconds
