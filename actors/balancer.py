"""The balancer actor: claims pending rows only as tokens have room, and spreads them.

Pull-based flow (DESIGN.md 4): nothing is pushed at a token. The balancer looks at each
token's published view (:class:`~actors.token.TokenBoard`), works out how many rows it may
still hold, picks owners for a page with smooth weighted round-robin, and asks the store to
lease that page (``ClaimDue``). The store leases row *i* to owner *i* (skipping chats that
already have a row in flight, and tokens that a row's chat refused), and the balancer hands
each token its rows. A million pending rows stay in SQLite; at most a page sits in memory.

Smooth weighted round-robin (nginx): every pick, each candidate's current weight grows by its
effective weight, the largest wins and pays back the total. Picks interleave (a a b a a b ...),
never bunch. The effective weight is the configured weight x the token's health (success rate,
recent 429s) x its speed relative to the fastest token of the pool, so a slow token gets
proportionally less. Tokens that are cooling down, paused, confirming a 401, revoked or
quarantined are not candidates.

Weights are shares, also under saturation: a page stops at the first pick whose token has no
room left, rather than giving its turn to the others (which would make shares follow capacity,
not weights). Two exceptions keep the pool's throughput: a token at Telegram's per-bot limit
(its rows wait for its rate budget) passes its turn on, since waiting for it would leave the
other bots' budgets unused while messages wait; and a token that has had no room for longer
than ``FULL_PATIENCE_SECONDS`` is stuck, not busy (hanging requests, say), and is passed over
so it cannot stall its pool.

Wake-ups: ``WorkAccepted`` from the relay, ``TokenHasCapacity`` from token actors and a
periodic ``Tick`` (due retries, cooled-down tokens). Wake-ups that arrive while
others wait in the mailbox are merged: one claim round serves them all.

Threading: every handler runs in the balancer's thread; it blocks only on the local store.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pykka

from actors.errors import StoreUnavailable, TgrelayError
from actors.messages import ClaimDue, ClaimedMessage, FailRefused, ReleaseLeases
from actors.observe import Metrics
from actors.ratelimit import Alarm
from actors.sending_messages import (
    AssignMessages,
    BalancerFailed,
    CrashForTest,
    StopClaiming,
    Tick,
    TokenHasCapacity,
    WorkAccepted,
)
from actors.store import StoreClient
from actors.token import TokenBoard, TokenView
from supervision.redact import redact

log = logging.getLogger("tgrelay.balancer")

TICK_SECONDS = 0.1
FULL_PATIENCE_SECONDS = 0.25
REFUSED_CHECK_SECONDS = 5.0
MIN_SPEED = 0.05
PAGE_SIZE = 256
MAX_DEFERRED_WAKES = 64  # a busy mailbox still gets a claim round this often


class BalancerCrashed(TgrelayError):
    """A balancer handler failed; the supervisor restarts the balancer."""


class SmoothWeightedRoundRobin:
    """nginx's smooth weighted round-robin over names; state survives between pages."""

    def __init__(self) -> None:
        self.current: dict[str, float] = {}

    def pick(self, weights: Mapping[str, float]) -> str:
        chosen = self.peek(weights)
        self.charge(weights, chosen)
        return chosen

    def peek(self, weights: Mapping[str, float]) -> str:
        """What :meth:`pick` would return, without taking the turn."""
        current = self.current
        return max(weights, key=lambda name: current.get(name, 0.0) + weights[name])

    def charge(self, weights: Mapping[str, float], chosen: str) -> None:
        """Account for ``chosen`` as if :meth:`pick` had returned it."""
        for name, weight in weights.items():
            self.current[name] = self.current.get(name, 0.0) + weight
        self.current[chosen] = self.current.get(chosen, 0.0) - sum(weights.values())


class BalancerActor(pykka.ThreadingActor):
    """See the module docstring. ``pools`` maps each pool to its token names."""

    def __init__(self, store: StoreClient, board: TokenBoard, pools: Mapping[str, Sequence[str]],
                 alarm: Alarm, metrics: Metrics, report_failure: Callable[[BalancerFailed], None],
                 generation: int = 1, tick_seconds: float = TICK_SECONDS,
                 page_size: int = PAGE_SIZE) -> None:
        super().__init__()
        self._store = store
        self._board = board
        self._pools = {pool: tuple(names) for pool, names in pools.items()}
        self._pool_of = {name: pool for pool, names in self._pools.items() for name in names}
        self._alarm = alarm
        self._metrics = metrics
        self._report_failure = report_failure
        self.generation = generation
        self._tick_seconds = tick_seconds
        self._page_size = page_size
        self._rr = {pool: SmoothWeightedRoundRobin() for pool in self._pools}
        self._handed: dict[str, int] = {}  # owner -> rows ever handed to that generation
        self._full_since: dict[str, float] = {}  # token -> since when it has had no room
        self._in_service: dict[str, tuple[str, ...]] = {}  # pool -> tokens last seen in service
        self._refused_checked = 0.0
        self._dirty: set[str] = set()
        self._deferred = 0
        self._claiming = True
        self._failure_reported = False
        self.claims = 0
        self.rows_claimed = 0

    # --- pykka hooks ------------------------------------------------------------------------

    def on_start(self) -> None:
        self._dirty.update(self._pools)
        self._alarm.tell_after(self._tick_seconds, self.actor_ref, Tick())

    def on_failure(self, *exc_info: Any) -> None:
        if not self._failure_reported:
            self._report(redact(f"{type(exc_info[1]).__name__}: {exc_info[1]}"))

    def on_receive(self, message: Any) -> Any:
        try:
            return self._handle(message)
        except Exception as error:  # noqa: BLE001 -- reported to the supervisor, then re-raised
            description = redact(f"{type(error).__name__}: {error}")
            log.error("the balancer failed: %s", redact("".join(traceback.format_exception(error))))
            self._report(description)
            raise BalancerCrashed(description) from None

    def _report(self, description: str) -> None:
        self._failure_reported = True
        self._report_failure(BalancerFailed(self.generation, description))

    # --- handlers ---------------------------------------------------------------------------

    def _handle(self, message: Any) -> Any:
        match message:
            case WorkAccepted(pools=pools):
                self._dirty.update(pool for pool in pools if pool in self._pools)
            case TokenHasCapacity(name=name):
                if name in self._pool_of:
                    self._dirty.add(self._pool_of[name])
            case Tick():
                self._dirty.update(self._pools)
                self._alarm.tell_after(self._tick_seconds, self.actor_ref, Tick())
                if self._claiming:
                    self._fail_refused()
            case StopClaiming():
                self._claiming = False
                return self.statistics()
            case CrashForTest():
                raise BalancerCrashed("crash injected by a test")
            case _:
                raise TypeError(f"the balancer does not understand {type(message).__name__}")
        if not self._claiming:
            self._dirty.clear()
            return None
        if not self.actor_inbox.empty() and self._deferred < MAX_DEFERRED_WAKES:
            self._deferred += 1  # more wake-ups are queued: one round will serve them all
            return None
        self._deferred = 0
        dirty, self._dirty = self._dirty, set()
        for pool in sorted(dirty):
            self._claim_for(pool)
        return None

    def statistics(self) -> dict[str, Any]:
        return {"claims": self.claims, "rows_claimed": self.rows_claimed,
                "claiming": self._claiming, "generation": self.generation}

    # --- claiming ---------------------------------------------------------------------------

    def _claim_for(self, pool: str) -> None:
        """Hand the candidate tokens of ``pool`` rows in weighted turns, page after page."""
        now = time.monotonic()
        views = {v.name: v for v in (self._board.get(n) for n in self._pools[pool])
                 if v.usable and v.usable_at <= now and v.ref is not None}
        room = {name: self._room(view) for name, view in views.items()}
        for name, free in room.items():
            if free > 0:
                self._full_since.pop(name, None)
            else:
                self._full_since.setdefault(name, now)
        weights = {name: weight for name, weight in self._effective_weights(views).items()
                   if room[name] > 0 or (not views[name].rate_capped
                                         and now - self._full_since[name] < FULL_PATIENCE_SECONDS)}
        if not weights:
            return
        rr = self._rr[pool]
        while True:
            saved = dict(rr.current)
            picks: list[str] = []
            left = dict(room)
            while len(picks) < self._page_size:
                name = rr.peek(weights)
                if left[name] <= 0:
                    break  # its turn: wait for it rather than give the turn away
                rr.charge(weights, name)
                picks.append(name)
                left[name] -= 1
            if not picks:
                return
            rows = self._claim_page(pool, picks, views)
            rr.current = saved
            if rows is None:
                return
            self._charge(rr, weights, room, rows)
            self._hand_out(rows, views)
            if len(rows) < len(picks):
                self._claim_for_the_passed_over(pool, picks, weights, room, views)
                return

    def _claim_for_the_passed_over(self, pool: str, picks: list[str], weights: Mapping[str, float],
                                   room: dict[str, int], views: Mapping[str, TokenView]) -> None:
        """The page came back short, so the pool is not saturated and turns need not be kept.
        Tokens that got no slot (a low weight, a turn still far off) may be the only ones a
        row can go to (every other token of its pool refused its chat): offer them too."""
        passed_over = [name for name in weights if room[name] > 0 and name not in picks]
        if not passed_over:
            return
        owners = [name for name in passed_over for _ in range(room[name])][:self._page_size]
        rows = self._claim_page(pool, owners, views)
        if rows:
            self._charge(self._rr[pool], weights, room, rows)
            self._hand_out(rows, views)

    @staticmethod
    def _charge(rr: SmoothWeightedRoundRobin, weights: Mapping[str, float],
                room: dict[str, int], rows: list[ClaimedMessage]) -> None:
        """The store may skip or swap owners: charge the turns it actually gave."""
        for row in rows:
            rr.charge(weights, row.token)
            room[row.token] -= 1

    def _fail_refused(self) -> None:
        """Rows that every token still in service refused (403) can never be claimed: when a
        pool loses a token (revoked, quarantined), and every few seconds for rows released in
        a race with that, fail them with the reason."""
        now = time.monotonic()
        due = now - self._refused_checked >= REFUSED_CHECK_SECONDS
        for pool in self._pools:
            in_service = tuple(sorted(self._board.in_service(pool)))
            if in_service == self._in_service.get(pool) and not due:
                continue
            self._in_service[pool] = in_service
            try:
                failed = self._store.call(FailRefused(pool, in_service))
            except StoreUnavailable as error:
                log.warning("could not check pool %s for refused messages: %s", pool, error)
                continue
            if failed:
                log.info("%d messages of pool %s were refused by every token still in service",
                         len(failed), pool)
                self._metrics.incr("messages.failed", len(failed))
        if due:
            self._refused_checked = now

    @staticmethod
    def _effective_weights(views: Mapping[str, TokenView]) -> dict[str, float]:
        """Configured weight x health x speed relative to the pool's fastest token."""
        latencies = [v.latency_ms for v in views.values() if v.latency_ms]
        fastest = min(latencies, default=None)
        weights = {}
        for name, view in views.items():
            speed = 1.0 if fastest is None or not view.latency_ms else \
                max(MIN_SPEED, fastest / view.latency_ms)
            weights[name] = view.weight * view.health * speed
        return {name: weight for name, weight in weights.items() if weight > 0}

    def _room(self, view: TokenView) -> int:
        """Rows ``view`` may still be handed: its window minus what it holds and what is on
        its way to it."""
        on_the_way = self._handed.get(view.owner, view.received) - view.received
        return max(0, view.window - view.held - on_the_way)

    def _claim_page(self, pool: str, picks: list[str], views: Mapping[str, TokenView]
                    ) -> list[ClaimedMessage] | None:
        command = ClaimDue(pool, tuple(views[n].owner for n in picks), tuple(picks))
        try:
            rows: list[ClaimedMessage] = self._store.call(command)
        except StoreUnavailable as error:
            log.warning("claiming for pool %s failed: %s; retrying at the next tick", pool, error)
            return None
        self.claims += 1
        self.rows_claimed += len(rows)
        return rows

    def _hand_out(self, rows: list[ClaimedMessage], views: Mapping[str, TokenView]) -> None:
        by_owner: dict[str, list[ClaimedMessage]] = {}
        for row in rows:
            by_owner.setdefault(row.owner, []).append(row)
        for owner, owned in by_owner.items():
            view = views[owned[0].token]
            assert view.ref is not None
            self._handed[owner] = self._handed.get(owner, view.received) + len(owned)
            try:
                view.ref.tell(AssignMessages(tuple(owned)))
            except pykka.ActorDeadError:
                # The generation died after we read its view: its rows must not wait for a
                # restart that may be quarantine. Release them now (idempotent).
                released = self._store.call(ReleaseLeases(owner))
                self._metrics.incr("messages.rerouted", released)
