"""Fault injection: what goes wrong, for every bot or for one.

A :class:`FaultSet` is plain data; :class:`Faults` keeps one global set and one per bot id
and turns them into a :class:`FaultPlan` for each request. Scopes stack: a request to bot B
suffers the global faults *and* B's (latencies add up, each probability is drawn on its own).
Revocation lives here too, since it is injected like the rest.

Handler threads call :meth:`Faults.plan` and :meth:`Faults.answer_delay`; control callers
change the sets. One lock guards everything; the random generator is seedable for repeatable
runs.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from enum import Enum


@dataclass(frozen=True)
class FaultSet:
    """The faults of one scope. Rates are probabilities in [0, 1]; ``*_until`` are monotonic.

    ``flood_retry_after`` fixes the ``retry_after`` of a 429 storm; ``None`` means "the time
    left in the storm", so a client that honours it is answered normally afterwards.
    """

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    bad_gateway_rate: float = 0.0
    reset_rate: float = 0.0
    partition_until: float = 0.0
    flood_until: float = 0.0
    flood_retry_after: int | None = None
    accept_then_timeout_rate: float = 0.0
    accept_then_timeout_seconds: float = 0.0

    def __post_init__(self) -> None:
        for name in ("bad_gateway_rate", "reset_rate", "accept_then_timeout_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")
        for name in ("latency_ms", "jitter_ms", "accept_then_timeout_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.flood_retry_after is not None and self.flood_retry_after < 1:
            raise ValueError("flood_retry_after must be at least 1 second")


class FaultAction(Enum):
    """What happens to a request before the Bot API logic sees it."""

    ANSWER = "answer"
    RESET = "reset"
    PARTITION = "partition"
    BAD_GATEWAY = "bad_gateway"
    FLOOD = "flood"


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """The fate of one request: an action, a latency to add, and a 429 storm's retry_after."""

    action: FaultAction
    latency_seconds: float = 0.0
    retry_after: int | None = None


NO_FAULT = FaultPlan(FaultAction.ANSWER)


class Faults:
    """The global fault set, per-bot fault sets and the revoked bot ids; thread-safe."""

    def __init__(
        self,
        initial: FaultSet | None = None,
        revoked: Iterable[int] = (),
        seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._random = random.Random(seed)
        self._initial = initial or FaultSet()
        self._initial_revoked = frozenset(revoked)
        self._global = self._initial
        self._per_bot: dict[int, FaultSet] = {}
        self._revoked: set[int] = set(self._initial_revoked)
        self._quiet = self._initial == FaultSet()

    def clear(self) -> None:
        """Back to the constructor's faults and revocations."""
        with self._lock:
            self._global = self._initial
            self._per_bot.clear()
            self._revoked = set(self._initial_revoked)
            self._quiet = self._initial == FaultSet()

    def update(self, bot_id: int | None = None, **changes: object) -> FaultSet:
        """Change some fields of the global set (``bot_id=None``) or of one bot's set."""
        with self._lock:
            current = self._global if bot_id is None else self._per_bot.get(bot_id, FaultSet())
            changed = replace(current, **changes)  # type: ignore[arg-type]
            if bot_id is None:
                self._global = changed
            elif changed == FaultSet():
                self._per_bot.pop(bot_id, None)
            else:
                self._per_bot[bot_id] = changed
            self._quiet = self._global == FaultSet() and not self._per_bot
        return changed

    def seconds_from_now(self, seconds: float) -> float:
        """The monotonic deadline ``seconds`` from now, for ``*_until`` fields."""
        return self._clock() + seconds

    def revoke(self, bot_id: int) -> None:
        with self._lock:
            self._revoked.add(bot_id)

    def unrevoke(self, bot_id: int) -> None:
        with self._lock:
            self._revoked.discard(bot_id)

    def is_revoked(self, bot_id: int) -> bool:
        with self._lock:
            return bot_id in self._revoked

    def plan(self, bot_id: int | None) -> FaultPlan:
        """Draw the fate of one request to ``bot_id`` (``None``: an unknown token)."""
        if self._quiet:
            return NO_FAULT
        now = self._clock()
        latency = 0.0
        with self._lock:
            for faults in self._scopes(bot_id):
                if faults.partition_until > now:
                    return FaultPlan(FaultAction.PARTITION)
                if faults.reset_rate and self._random.random() < faults.reset_rate:
                    return FaultPlan(FaultAction.RESET)
                latency += faults.latency_ms + self._random.uniform(0, faults.jitter_ms)
            latency /= 1000.0
            for faults in self._scopes(bot_id):
                if faults.bad_gateway_rate and self._random.random() < faults.bad_gateway_rate:
                    return FaultPlan(FaultAction.BAD_GATEWAY, latency)
            for faults in self._scopes(bot_id):
                if faults.flood_until > now:
                    retry_after = faults.flood_retry_after or max(1, math.ceil(faults.flood_until - now))
                    return FaultPlan(FaultAction.FLOOD, latency, retry_after)
        return FaultPlan(FaultAction.ANSWER, latency) if latency else NO_FAULT

    def answer_delay(self, bot_id: int) -> float:
        """Seconds to hold back the answer to a delivered message (accept-then-timeout)."""
        if self._quiet:
            return 0.0
        with self._lock:
            for faults in self._scopes(bot_id):
                rate = faults.accept_then_timeout_rate
                if rate and self._random.random() < rate:
                    return faults.accept_then_timeout_seconds
        return 0.0

    def snapshot(self) -> dict[str, object]:
        """The configured faults, with deadlines shown as seconds left."""
        now = self._clock()
        with self._lock:
            return {
                "global": _describe(self._global, now),
                "bots": {str(bot): _describe(fs, now) for bot, fs in self._per_bot.items()},
                "revoked": sorted(self._revoked),
            }

    def _scopes(self, bot_id: int | None) -> list[FaultSet]:
        scopes = [self._global]
        if bot_id is not None and bot_id in self._per_bot:
            scopes.append(self._per_bot[bot_id])
        return scopes


def _describe(faults: FaultSet, now: float) -> dict[str, object]:
    described = asdict(faults)
    for deadline in ("partition_until", "flood_until"):
        described[deadline.replace("_until", "_seconds_left")] = max(0.0, described.pop(deadline) - now)
    return described
