"""The supervisor: starts the sending side, restarts what fails, stops it without loss.

pykka has no supervision, so this is OTP's idea adapted (DESIGN.md 7):

* every token actor and the balancer report failure here, from their handler guard and from
  ``on_failure``; the supervisor ignores a second report of the same generation;
* a failed token actor is stopped, its leased rows go back to pending at once
  (``ReleaseLeases``; the balancer reroutes them, ``messages.rerouted``), and a new generation
  starts after a jittered exponential backoff. More than ``restart_intensity`` restarts within
  ``restart_period`` seconds quarantine the token (alert) instead: the system keeps going;
* a failed balancer is restarted under the same intensity; beyond it the supervisor gives up
  on sending (alert) and stops claiming. Nothing is lost: every message is a row in SQLite;
* the store actor is watched; if it dies, sending stops in order (its rows resume at the next
  start, when the store's recovery releases every lease).

Threading: :class:`SupervisorActor` handlers run in its own thread. :class:`SendingSystem`
(the relay's :class:`~supervision.relay.SendingSide`) is called from any thread: it reads the
thread-safe token board and only ``tell``s actors, except in :meth:`SendingSystem.stop`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pykka

from actors.balancer import BalancerActor
from actors.errors import StoreUnavailable
from actors.messages import ReleaseLeases
from actors.observe import AlertSink, Metrics
from actors.ratelimit import Alarm, tell_if_alive
from actors.sending_messages import (
    BalancerFailed,
    CheckStore,
    CrashForTest,
    Drain,
    RestartToken,
    StopClaiming,
    TokenFailed,
    WorkAccepted,
)
from actors.store import StoreClient
from actors.token import (
    FAILING,
    HEALTHY,
    TokenActor,
    TokenBoard,
    TokenSettings,
    TokenView,
    TokenWiring,
    backoff,
    check_token,
    token_settings_from_config,
)
from supervision.redact import redact

if TYPE_CHECKING:
    from supervision.relay import RelaySystem

log = logging.getLogger("tgrelay.supervisor")

STOP_TIMEOUT_SECONDS = 5.0


def _token_default(name: str) -> Any:
    """The default of one ``TokenSettings`` field."""
    return next(f.default for f in dataclasses.fields(TokenSettings) if f.name == name)


@dataclass(frozen=True)
class SupervisionSettings:
    """Restart policy and sending knobs that the config file does not (yet) expose."""

    restart_intensity: int = 5       # restarts allowed within restart_period ...
    restart_period: float = 60.0     # ... before the token is quarantined
    restart_backoff_base: float = 0.1
    restart_backoff_cap: float = 10.0
    store_check_seconds: float = 1.0
    # Sending knobs default to the token actor's own defaults: one source, no drift.
    workers_per_token: int = _token_default("workers")
    max_attempts: int = _token_default("max_attempts")
    in_doubt_policy: str = _token_default("in_doubt_policy")
    backoff_base: float = _token_default("backoff_base")
    tick_seconds: float = 0.1


@dataclass
class _Slot:
    """One configured token across its generations."""

    settings: TokenSettings
    generation: int = 0
    owner: str = ""
    ref: pykka.ActorRef[TokenActor] | None = None
    restarts: deque[float] = field(default_factory=deque)
    quarantined: bool = False
    owners: list[str] = field(default_factory=list)


class _Refs:
    """The current balancer and supervisor refs, readable from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.balancer: pykka.ActorRef[BalancerActor] | None = None
        self.supervisor: pykka.ActorRef[SupervisorActor] | None = None

    def tell_balancer(self, message: object) -> None:
        with self._lock:
            ref = self.balancer
        if ref is not None:
            tell_if_alive(ref, message)

    def set_balancer(self, ref: pykka.ActorRef[BalancerActor] | None) -> None:
        with self._lock:
            self.balancer = ref


@dataclass(frozen=True)
class _BeginStop:
    """Asked by :meth:`SendingSystem.stop`: restart nothing more; answers the slots."""


@dataclass(frozen=True)
class _Started:
    """Asked once at start: answered after ``on_start``, when every actor is running."""


@dataclass(frozen=True)
class _CrashToken:
    name: str


class SupervisorActor(pykka.ThreadingActor):
    def __init__(self, store: StoreClient, board: TokenBoard, alarm: Alarm, refs: _Refs,
                 tokens: Sequence[TokenSettings], pools: Mapping[str, Sequence[str]],
                 metrics: Metrics, alert: AlertSink, settings: SupervisionSettings) -> None:
        super().__init__()
        self._store = store
        self._board = board
        self._alarm = alarm
        self._refs = refs
        self._pools = pools
        self._metrics = metrics
        self._alert = alert
        self._settings = settings
        self._slots = {token.name: _Slot(token) for token in tokens}
        self._balancer_generation = 0
        self._balancer_restarts: deque[float] = deque()
        self._stopping = False
        self.restarts = 0
        self.rerouted = 0

    # --- pykka hooks ------------------------------------------------------------------------

    def on_start(self) -> None:
        self._refs.supervisor = self.actor_ref
        for slot in self._slots.values():
            self._start_token(slot, previous=None)
        self._start_balancer()
        self._alarm.tell_after(self._settings.store_check_seconds, self.actor_ref, CheckStore())

    def on_failure(self, *exc_info: Any) -> None:
        self._alert("supervisor_gave_up", redact(f"the supervisor itself failed "
                                                 f"({exc_info[1]!r}); sending stops"))
        self._refs.tell_balancer(StopClaiming())

    def on_receive(self, message: Any) -> Any:
        try:
            return self._handle(message)
        except Exception as error:  # noqa: BLE001 -- alerted and logged: see below
            # The supervisor is the root: it reports and carries on rather than die.
            text = redact("".join(traceback.format_exception(error)))
            log.error("the supervisor failed handling %s: %s", type(message).__name__, text)
            self._alert("supervisor_error", redact(f"{type(error).__name__}: {error}"))
            return None

    # --- handlers ---------------------------------------------------------------------------

    def _handle(self, message: Any) -> Any:
        match message:
            case TokenFailed():
                self._token_failed(message)
            case RestartToken(name=name, owner=owner):
                self._restart_token(name, owner)
            case BalancerFailed(generation=generation, description=description):
                self._balancer_failed(generation, description)
            case CheckStore():
                self._check_store()
            case _CrashToken(name=name):
                ref = self._slots[name].ref
                if ref is not None:
                    tell_if_alive(ref, CrashForTest())
            case _Started():
                return None
            case _BeginStop():
                self._stopping = True
                return [(s.settings.name, s.ref, tuple(s.owners)) for s in self._slots.values()]
            case _:
                raise TypeError(f"the supervisor does not understand {type(message).__name__}")
        return None

    def _token_failed(self, failed: TokenFailed) -> None:
        slot = self._slots.get(failed.name)
        if slot is None or slot.owner != failed.owner or slot.ref is None:
            return  # a second report of a generation already handled
        log.error("token %s (%s) failed: %s", failed.name, failed.owner, failed.description)
        dead, slot.ref = slot.ref, None
        _stop_quietly(dead)
        self._board.update(failed.name, state=FAILING, accepting=False, ref=None, held=0,
                           in_flight=0, last_error=failed.description)
        self._release(failed.owner)
        if self._stopping:
            return
        now = time.monotonic()
        slot.restarts.append(now)
        while slot.restarts and slot.restarts[0] < now - self._settings.restart_period:
            slot.restarts.popleft()
        if len(slot.restarts) > self._settings.restart_intensity:
            self._quarantine(slot, failed.description)
            return
        delay = backoff(len(slot.restarts), self._settings.restart_backoff_base,
                        self._settings.restart_backoff_cap)
        log.warning("restarting token %s in %.2f s (%d restarts in %g s)", failed.name, delay,
                    len(slot.restarts), self._settings.restart_period)
        self._alarm.tell_after(delay, self.actor_ref, RestartToken(failed.name, failed.owner))

    def _restart_token(self, name: str, failed_owner: str) -> None:
        slot = self._slots[name]
        if self._stopping or slot.quarantined or slot.owner != failed_owner:
            return
        self._release(failed_owner)  # a claim that raced with the failure
        self.restarts += 1
        self._metrics.incr("supervisor.restarts")
        self._start_token(slot, previous=self._board.get(name))

    def _quarantine(self, slot: _Slot, description: str) -> None:
        name = slot.settings.name
        slot.quarantined = True
        self._board.update(name, quarantined=True, state=FAILING, accepting=False, health=0.0)
        self._alert("token_quarantined",
                    f"token {name} (pool {slot.settings.pool}) failed "
                    f"{len(slot.restarts)} times in {self._settings.restart_period:g} s and is "
                    f"quarantined; its messages go to the other tokens. Last failure: "
                    f"{description}")

    def _release(self, owner: str) -> None:
        """Every row leased to ``owner`` back to pending, and the balancer told."""
        try:
            released = self._store.call(ReleaseLeases(owner))
        except StoreUnavailable as error:
            log.error("could not release the leases of %s (%s); the next start will", owner, error)
            return
        if released:
            self.rerouted += released
            self._metrics.incr("messages.rerouted", released)
            log.info("%d messages of %s go back to pending for another token", released, owner)
        self._refs.tell_balancer(WorkAccepted(frozenset(self._pools)))

    def _balancer_failed(self, generation: int, description: str) -> None:
        if generation != self._balancer_generation or self._stopping:
            return
        log.error("the balancer failed: %s", description)
        old = self._refs.balancer
        self._refs.set_balancer(None)
        if old is not None:
            _stop_quietly(old)
        now = time.monotonic()
        self._balancer_restarts.append(now)
        while self._balancer_restarts and \
                self._balancer_restarts[0] < now - self._settings.restart_period:
            self._balancer_restarts.popleft()
        if len(self._balancer_restarts) > self._settings.restart_intensity:
            self._give_up(f"the balancer failed {len(self._balancer_restarts)} times in "
                          f"{self._settings.restart_period:g} s (last: {description})")
            return
        self.restarts += 1
        self._metrics.incr("supervisor.restarts")
        self._start_balancer()

    def _check_store(self) -> None:
        if self._stopping:
            return
        if not self._store.actor.is_alive():
            self._give_up("the store actor stopped")
            return
        self._alarm.tell_after(self._settings.store_check_seconds, self.actor_ref, CheckStore())

    def _give_up(self, why: str) -> None:
        """Stop sending in order; every unfinished message stays a row in SQLite."""
        self._stopping = True
        self._alert("supervisor_gave_up", f"{why}; sending stops. Nothing is lost: unfinished "
                    "messages stay in the database and resume at the next start")
        self._refs.tell_balancer(StopClaiming())
        for slot in self._slots.values():
            if slot.ref is not None:
                tell_if_alive(slot.ref, Drain())

    # --- starting actors --------------------------------------------------------------------

    def _start_token(self, slot: _Slot, previous: TokenView | None) -> None:
        slot.generation += 1
        slot.owner = f"{slot.settings.name}#{slot.generation}"
        slot.owners.append(slot.owner)
        wiring = TokenWiring(
            store=self._store, board=self._board, alarm=self._alarm, metrics=self._metrics,
            alert=self._alert, report_failure=self._token_reporter(),
            wake_balancer=self._refs.tell_balancer)
        restarts = 0 if previous is None else previous.restarts + 1
        self._board.register(TokenView(slot.settings.name, slot.settings.pool, slot.owner,
                                       slot.settings.weight, slot.settings.window,
                                       accepting=False, restarts=restarts))
        slot.ref = TokenActor.start(slot.settings, slot.owner, wiring, previous)
        self._refs.tell_balancer(WorkAccepted(frozenset({slot.settings.pool})))

    def _start_balancer(self) -> None:
        self._balancer_generation += 1
        ref = BalancerActor.start(
            self._store, self._board, self._pools, self._alarm, self._metrics,
            self._balancer_reporter(), generation=self._balancer_generation,
            tick_seconds=self._settings.tick_seconds)
        self._refs.set_balancer(ref)

    def _token_reporter(self) -> Callable[[TokenFailed], None]:
        ref = self.actor_ref
        return lambda failed: _tell_or_log(ref, failed)

    def _balancer_reporter(self) -> Callable[[BalancerFailed], None]:
        ref = self.actor_ref
        return lambda failed: _tell_or_log(ref, failed)


def _tell_or_log(ref: pykka.ActorRef[Any], failure: TokenFailed | BalancerFailed) -> None:
    if not tell_if_alive(ref, failure):
        log.error("a failure arrived after the supervisor stopped: %s", failure)


def _stop_quietly(ref: pykka.ActorRef[Any]) -> None:
    """Stop ``ref`` and wait until it has (it may already be dead: that is the usual case)."""
    try:
        ref.stop(block=True, timeout=STOP_TIMEOUT_SECONDS)
    except pykka.ActorDeadError:
        return
    except pykka.Timeout:
        log.error("an actor did not stop within %g s", STOP_TIMEOUT_SECONDS)


class SendingSystem:
    """The relay's sending side (:class:`~supervision.relay.SendingSide`)."""

    def __init__(self, store: StoreClient, tokens: Sequence[TokenSettings],
                 pools: Mapping[str, Sequence[str]], metrics: Metrics, alert: AlertSink,
                 settings: SupervisionSettings) -> None:
        self._store = store
        self._tokens = {token.name: token for token in tokens}
        self._metrics = metrics
        self.board = TokenBoard()
        self._alarm = Alarm()
        self._refs = _Refs()
        self._stopped = False
        self._supervisor = SupervisorActor.start(store, self.board, self._alarm, self._refs,
                                                 tokens, pools, metrics, alert, settings)
        self._supervisor.ask(_Started(), timeout=STOP_TIMEOUT_SECONDS)

    # --- SendingSide ------------------------------------------------------------------------

    def notify_accepted(self, pools: set[str]) -> None:
        self._refs.tell_balancer(WorkAccepted(frozenset(pools)))

    def statistics(self) -> dict[str, Any]:
        views = self.board.views()
        return {
            "tokens": [view.as_api() for view in views],
            "healthy": sum(1 for v in views if v.state == HEALTHY and v.usable),
            "in_flight": sum(v.in_flight for v in views),
            "held": sum(v.held for v in views),
            "restarts": sum(v.restarts for v in views),
            "quarantined": sorted(v.name for v in views if v.quarantined),
            "in_doubt_sends": sum(v.in_doubt for v in views),
        }

    def tokens(self) -> list[dict[str, Any]]:
        return [view.as_api() for view in self.board.views()]

    def validate_token(self, name: str) -> dict[str, Any]:
        settings = self._tokens[name]  # KeyError for an unknown token, as the protocol says
        checked = check_token(settings)
        return {"name": name, "valid": bool(checked.valid), "bot_username": checked.bot_username,
                "error": checked.error}

    def stop(self, drain_seconds: float) -> None:
        """Stop claiming; in-flight sends get ``drain_seconds``; every lease is released."""
        if self._stopped:
            return
        self._stopped = True
        slots = self._ask(self._supervisor, _BeginStop()) or []
        balancer = self._refs.balancer
        if balancer is not None:
            self._ask(balancer, StopClaiming())
        for _, ref, _ in slots:
            if ref is not None:
                tell_if_alive(ref, Drain())
        deadline = time.monotonic() + drain_seconds
        while time.monotonic() < deadline and any(v.in_flight for v in self.board.views()):
            time.sleep(0.01)
        for _, ref, _ in slots:
            if ref is not None:
                _stop_quietly(ref)
        released = 0
        for _, _, owners in slots:
            for owner in owners:
                try:
                    released += self._store.call(ReleaseLeases(owner))
                except StoreUnavailable as error:
                    log.error("stop: leases of %s stay until the next start (%s)", owner, error)
        if released:
            log.info("stop: %d unfinished messages go back to pending", released)
        if balancer is not None:
            _stop_quietly(balancer)
        _stop_quietly(self._supervisor)
        self._alarm.stop()

    # --- for tests and the demo -------------------------------------------------------------

    def token_view(self, name: str) -> TokenView:
        return self.board.get(name)

    def crash_token_for_test(self, name: str) -> None:
        """Fault injection: the token's current actor raises as if it had a bug."""
        tell_if_alive(self._supervisor, _CrashToken(name))

    def crash_balancer_for_test(self) -> None:
        """Fault injection: the balancer raises as if it had a bug."""
        self._refs.tell_balancer(CrashForTest())

    @staticmethod
    def _ask(ref: pykka.ActorRef[Any], message: object) -> Any:
        try:
            return ref.ask(message, timeout=STOP_TIMEOUT_SECONDS)
        except (pykka.ActorDeadError, pykka.Timeout):
            return None


def start_sending(relay: RelaySystem, settings: SupervisionSettings | None = None) -> SendingSystem:
    """Start token actors for every configured token, the balancer and the supervisor."""
    settings = settings or SupervisionSettings()
    config = relay.config
    tokens = [
        token_settings_from_config(
            token.name, pool, token.token, token.weight, token.max_per_second, config.telegram,
            workers=settings.workers_per_token, max_attempts=settings.max_attempts,
            in_doubt_policy=settings.in_doubt_policy, backoff_base=settings.backoff_base)
        for pool, token in config.tokens()
    ]
    pools = {name: [token.name for token in pool.tokens] for name, pool in config.pools.items()}
    return SendingSystem(relay.store, tokens, pools, relay.metrics, relay.alert, settings)


__all__ = ["SendingSystem", "SupervisionSettings", "SupervisorActor", "start_sending"]
