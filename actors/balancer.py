"""The balancer actor: claims pending rows only as tokens have room, and spreads them.

Pull-based flow (DESIGN.md 4): nothing is pushed at a token. The balancer looks at each
token's published view (:class:`~actors.token.TokenBoard`), works out how many rows it may
still hold, picks owners for a page with smooth weighted round-robin, and asks the store to
lease that page (``ClaimDue``). The store leases row *i* to owner *i* (skipping chats that
already have a row in flight, and tokens that a row's chat refused), and the balancer hands
each token its rows. A million pending rows stay in SQLite; at most a page sits in memory.

Smooth weighted round-robin (nginx): every pick, each candidate's current weight grows by its
effective weight (configured weight x measured health), the largest wins and pays back the
total. Picks interleave (a a b a a b ...), never bunch. Tokens that are cooling down, paused,
confirming a 401, revoked or quarantined are not candidates. How many rows a token may hold
also scales with its effective weight, so under saturation the shares still follow weights.

Wake-ups: ``WorkAccepted`` from the relay, ``TokenHasCapacity`` from token actors and a
periodic ``Tick`` (due retries, cooled-down tokens, gauges). Wake-ups that arrive while
others wait in the mailbox are merged: one claim round serves them all.

Threading: every handler runs in the balancer's thread; it blocks only on the local store.
"""

from __future__ import annotations

import logging
import math
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pykka

from actors.errors import StoreUnavailable, TgrelayError
from actors.messages import ClaimDue, ClaimedMessage, ReleaseLeases
from actors.observe import Metrics
from actors.ratelimit import Alarm
from actors.sending_messages import (
    AssignMessages,
    BalancerFailed,
    StopClaiming,
    Tick,
    TokenHasCapacity,
    WorkAccepted,
)
from actors.store import StoreClient
from actors.token import HEALTHY, TokenBoard, TokenView
from supervision.redact import redact

log = logging.getLogger("tgrelay.balancer")

TICK_SECONDS = 0.1
GAUGE_SECONDS = 1.0
PAGE_SIZE = 256
MAX_DEFERRED_WAKES = 64  # a busy mailbox still gets a claim round this often


class BalancerCrashed(TgrelayError):
    """A balancer handler failed; the supervisor restarts the balancer."""


class SmoothWeightedRoundRobin:
    """nginx's smooth weighted round-robin over names; state survives between pages."""

    def __init__(self) -> None:
        self.current: dict[str, float] = {}

    def pick(self, weights: Mapping[str, float]) -> str:
        total = 0.0
        best: str | None = None
        for name, weight in weights.items():
            self.current[name] = self.current.get(name, 0.0) + weight
            total += weight
            if best is None or self.current[name] > self.current[best]:
                best = name
        assert best is not None
        self.current[best] -= total
        return best

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
        self._dirty: set[str] = set()
        self._deferred = 0
        self._claiming = True
        self._last_gauges = 0.0
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
        except Exception as error:
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
                self._gauges()
            case StopClaiming():
                self._claiming = False
                return self.statistics()
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
        """Fill every candidate token of ``pool`` up to its room, page after page."""
        now = time.monotonic()
        candidates = [v for v in (self._board.get(n) for n in self._pools[pool])
                      if v.usable and v.usable_at <= now and v.ref is not None]
        if not candidates:
            return
        weights = {v.name: v.weight * v.health for v in candidates}
        strongest = max(weights.values())
        if strongest <= 0:
            return
        room = {v.name: self._room(v, weights[v.name] / strongest) for v in candidates}
        views = {v.name: v for v in candidates}
        rr = self._rr[pool]
        while True:
            saved = dict(rr.current)
            picks: list[str] = []
            left = dict(room)
            while len(picks) < self._page_size:
                open_weights = {n: weights[n] for n, r in left.items() if r > 0}
                if not open_weights:
                    break
                name = rr.pick(open_weights)
                picks.append(name)
                left[name] -= 1
            if not picks:
                return
            rows = self._claim_page(pool, picks, views)
            rr.current = saved
            if rows is None:
                return
            for row in rows:  # the store may have skipped or swapped owners: charge what it did
                open_weights = {n: weights[n] for n, r in room.items() if r > 0}
                rr.charge(open_weights or {row.token: 1.0}, row.token)
                room[row.token] -= 1
            self._hand_out(rows, views)
            if len(rows) < len(picks):
                return

    def _room(self, view: TokenView, weight_share: float) -> int:
        """Rows ``view`` may still be handed: its window, scaled by weight, minus what it holds
        and what is on its way to it."""
        window = max(1, math.ceil(view.window * weight_share))
        on_the_way = self._handed.get(view.owner, view.received) - view.received
        return max(0, window - view.held - on_the_way)

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

    def _gauges(self) -> None:
        now = time.monotonic()
        if now - self._last_gauges < GAUGE_SECONDS:
            return
        self._last_gauges = now
        views = self._board.views()
        for view in views:
            self._metrics.gauge(f"tokens.{view.name}.health", view.health)
        self._metrics.gauge("tokens.healthy", sum(1 for v in views if v.state == HEALTHY
                                                  and v.usable))
        self._metrics.gauge("queue.in_flight", sum(v.held for v in views))
