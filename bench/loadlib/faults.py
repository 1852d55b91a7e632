"""The fault plan: a steady mix from the start, and timed events (what happens when).

Steady faults (latency, HTML 502s, resets, accept-then-timeout, blocked and missing chats) are
set through the simulator's control endpoint before the load starts. Timed faults run on the
:class:`FaultRunner` thread at their offset from the start of the load:

- ``flood TOKEN@T:S``: a 429 storm on one token for S seconds (``retry_after`` = time left);
- ``revoke TOKEN@T``: the token answers 401 from then on;
- ``partition T:S``: every Bot API request is reset for S seconds;
- ``kill T[:DOWN]``: the relay is SIGKILLed, and started again DOWN seconds later (default 0).

Every fault, as carried out, goes into the :class:`EventLog` with its time: the report lists
them and the plots mark them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .processes import RelayProcess, SimulatorControl, TokenSpec

TIMED_KINDS = ("flood", "revoke", "partition", "kill")


@dataclass(frozen=True)
class FaultMix:
    """Faults present for the whole run."""

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    bad_gateway_rate: float = 0.0
    reset_rate: float = 0.0
    accept_then_timeout_rate: float = 0.0
    accept_then_timeout_seconds: float = 6.0
    blocked_chats: tuple[int, ...] = ()
    missing_chats: tuple[int, ...] = ()

    def describe(self) -> list[str]:
        parts = []
        if self.latency_ms or self.jitter_ms:
            parts.append(f"latency {self.latency_ms:g} ms + up to {self.jitter_ms:g} ms jitter")
        if self.bad_gateway_rate:
            parts.append(f"HTML 502 on {self.bad_gateway_rate:.2%} of requests")
        if self.reset_rate:
            parts.append(f"connection reset on {self.reset_rate:.2%} of requests")
        if self.accept_then_timeout_rate:
            parts.append(f"accept-then-timeout on {self.accept_then_timeout_rate:.2%} of sends "
                         f"(answer held {self.accept_then_timeout_seconds:g} s)")
        if self.blocked_chats:
            parts.append(f"{_chats(len(self.blocked_chats))} every bot (403)")
        if self.missing_chats:
            parts.append(f"{_chats(len(self.missing_chats), 'does not exist', 'do not exist')} "
                         "(400 chat not found)")
        return parts


def _chats(count: int, one: str = "blocks", many: str = "block") -> str:
    return f"1 chat {one}" if count == 1 else f"{count} chats {many}"


@dataclass(frozen=True)
class TimedFault:
    at: float
    kind: str
    token: str | None = None
    seconds: float = 0.0

    def describe(self) -> str:
        match self.kind:
            case "flood":
                return f"429 storm on {self.token} for {self.seconds:g} s"
            case "revoke":
                return f"token {self.token} revoked"
            case "partition":
                return f"network partition for {self.seconds:g} s"
            case _:
                down = f", down {self.seconds:g} s" if self.seconds else ""
                return f"relay SIGKILLed{down}"


def parse_timed(kind: str, spec: str, token_names: Sequence[str]) -> TimedFault:
    """``flood t3@30:15``, ``revoke t7@60``, ``partition 90:20``, ``kill 45`` or ``kill 45:2``.

    A token is its name (``t3``) or its index (``3``). Raises ``ValueError`` with the reason.
    """
    token: str | None = None
    rest = spec
    if kind in ("flood", "revoke"):
        token, separator, rest = spec.partition("@")
        if not separator:
            raise ValueError(f"--{kind} {spec}: expected TOKEN@SECONDS")
        if token.isdigit() and int(token) < len(token_names):
            token = token_names[int(token)]
        if token not in token_names:
            raise ValueError(f"--{kind} {spec}: no token {token!r} (tokens: {', '.join(token_names)})")
    at_text, _, seconds_text = rest.partition(":")
    try:
        at = float(at_text)
        seconds = float(seconds_text) if seconds_text else 0.0
    except ValueError:
        raise ValueError(f"--{kind} {spec}: times are numbers of seconds") from None
    if at < 0 or seconds < 0:
        raise ValueError(f"--{kind} {spec}: times must not be negative")
    if kind in ("flood", "partition") and seconds <= 0:
        raise ValueError(f"--{kind} {spec}: give the duration, e.g. {at_text}:20")
    return TimedFault(at, kind, token, seconds)


class EventLog:
    """What happened when; thread-safe. ``t`` is seconds since the load started."""

    def __init__(self, start_wall: float) -> None:
        self.start_wall = start_wall
        self._lock = threading.Lock()
        self.events: list[dict[str, Any]] = []

    def add(self, kind: str, detail: str, *, seconds: float = 0.0, token: str | None = None) -> None:
        at = time.time()
        with self._lock:
            self.events.append({"t": round(at - self.start_wall, 3), "at": at, "kind": kind,
                                "detail": detail, "seconds": seconds, "token": token})


def apply_mix(control: SimulatorControl, mix: FaultMix, log: EventLog) -> None:
    if mix.latency_ms or mix.jitter_ms:
        control.post("latency", ms=mix.latency_ms, jitter_ms=mix.jitter_ms)
    if mix.bad_gateway_rate:
        control.post("bad_gateway", rate=mix.bad_gateway_rate)
    if mix.reset_rate:
        control.post("reset_connections", rate=mix.reset_rate)
    if mix.accept_then_timeout_rate:
        control.post("accept_then_timeout", rate=mix.accept_then_timeout_rate,
                     delay_seconds=mix.accept_then_timeout_seconds)
    for chat in mix.blocked_chats:
        control.post("block_chat", chat_id=chat)
    for chat in mix.missing_chats:
        control.post("missing_chat", chat_id=chat)
    for line in mix.describe():
        log.add("steady", line)


class FaultRunner:
    """Carries out timed faults on a thread of its own; :meth:`join` re-raises its failure."""

    def __init__(self, faults: Sequence[TimedFault], control: SimulatorControl,
                 relay: RelayProcess | None, tokens: dict[str, TokenSpec], log: EventLog) -> None:
        if relay is None and any(fault.kind == "kill" for fault in faults):
            raise ValueError("--kill needs the relay started by this tool (not --relay-url)")
        self._faults = sorted(faults, key=lambda fault: fault.at)
        self._control = control
        self._relay = relay
        self._tokens = tokens
        self._log = log
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="load-faults", daemon=True)

    @property
    def last_at(self) -> float:
        return max((fault.at + fault.seconds for fault in self._faults), default=0.0)

    def start(self) -> FaultRunner:
        self._thread.start()
        return self

    def done(self) -> bool:
        return not self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()

    def join(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"a fault could not be carried out: {self._error}") from self._error

    def _run(self) -> None:
        try:
            for fault in self._faults:
                if self._stop.wait(max(0.0, self._log.start_wall + fault.at - time.time())):
                    return
                self._carry_out(fault)
        except BaseException as error:  # handed to join()
            self._error = error

    def _carry_out(self, fault: TimedFault) -> None:
        if fault.kind == "kill":
            assert self._relay is not None
            self._relay.kill()
            self._log.add("kill", fault.describe())
            if fault.seconds:
                time.sleep(fault.seconds)
            took = self._relay.start()
            self._log.add("restart", f"relay listening again after {took:.1f} s")
            return
        if fault.kind == "partition":
            self._control.post("partition", seconds=fault.seconds)
        else:
            assert fault.token is not None
            bot = self._tokens[fault.token].bot_id
            if fault.kind == "flood":
                self._control.post("flood", bot=bot, seconds=fault.seconds)
            else:
                self._control.post("revoke", bot=bot)
        self._log.add(fault.kind, fault.describe(), seconds=fault.seconds, token=fault.token)
