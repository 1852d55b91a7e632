"""``tgrelay demo``: the whole system against the built-in Bot API simulator.

Four bots in one pool, Telegram's own limits (30 msg/s per bot, 1/s per chat, 20/min per
group), a few thousand messages to private chats and groups, a user who blocked every bot, a
chat that does not exist and a group that migrates to a supergroup. A quarter of the way in,
one token is hit by a 429 storm; a little later another is revoked. A live line shows
progress; at the end a report per token and overall. Exit 0 when every message ended
confirmed or failed with a reason (nothing lost), else 1.

Runs in-process: the simulator on a loopback port, the store in a temporary directory.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from actors.errors import TgrelayError
from actors.messages import FINAL_STATUSES, Receipt
from simulator import BotApiSimulator, SimBot, make_bots
from supervision.config import parse_config
from supervision.relay import RelaySystem

TOKEN_NAMES = ("alpha", "bravo", "charlie", "delta")
WEIGHTS = (2, 1, 1, 1)
STORM_TOKEN, REVOKED_TOKEN = "bravo", "delta"
STORM_SECONDS = 4
PRIVATE_CHATS = 900
GROUPS = 30
BLOCKED_USER = 66_600_001            # blocked every bot: tried on each token, then failed
MISSING_CHAT = 77_700_001            # "chat not found": fails at once, with Telegram's words
OLD_GROUP, SUPERGROUP = -4_242, -1_000_000_004_242
DEADLINE_SECONDS = 55.0
ACCEPT_BATCH = 500


@dataclass
class _Events:
    """The demo's scripted trouble, each fired once when enough messages are done."""

    fired: list[str] = field(default_factory=list)

    def due(self, name: str, done: int, total: int, fraction: float) -> bool:
        if name in self.fired or done < total * fraction:
            return False
        self.fired.append(name)
        return True


def _chat_for(index: int) -> int:
    if index % 10 == 0:
        return -4_000_000 - index // 10 % GROUPS
    return 100_000_000 + index % PRIVATE_CHATS


def _plan(count: int) -> list[dict[str, Any]]:
    """``count`` messages: mostly private chats, a tenth to groups, a few that must fail."""
    special = [(BLOCKED_USER, 3), (MISSING_CHAT, 2), (OLD_GROUP, 5)]
    messages = [{"chat_id": chat, "text": f"demo {chat} #{n}"} for chat, times in special
                for n in range(times)]
    messages += [{"chat_id": _chat_for(i), "text": f"demo message {i}"}
                 for i in range(max(0, count - len(messages)))]
    return messages[:count]


def _config_text(directory: Path, url: str, bots: list[SimBot]) -> str:
    tokens = "".join(
        f'[[pools.default.tokens]]\nname = "{name}"\ntoken = "{bot.token}"\nweight = {weight}\n'
        for name, weight, bot in zip(TOKEN_NAMES, WEIGHTS, bots, strict=True))
    return (f'[store]\npath = "{directory / "demo.db"}"\narchive_path = ""\n'
            f'synchronous = "normal"\n\n[telegram]\napi_base_url = "{url}"\n'
            f"request_timeout_seconds = 5\n\n[pools.default]\n{tokens}")


class _Alerts:
    """Alerts are part of the show: printed on their own line as they happen."""

    def __init__(self, out: TextIO) -> None:
        self.raised: list[tuple[str, str]] = []
        self._out = out

    def __call__(self, kind: str, text: str) -> None:
        self.raised.append((kind, text))
        print(f"\n>>> ALERT {kind}: {text}", file=self._out, flush=True)


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    """The progress line and the alerts tell the story; routine log lines would break it."""
    loggers = [logging.getLogger(name) for name in ("tgrelay", "simulator")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def run_demo(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    count = max(1, int(getattr(args, "messages", 3000)))
    bots = make_bots(len(TOKEN_NAMES))
    by_name = dict(zip(TOKEN_NAMES, bots, strict=True))
    alerts = _Alerts(out)
    started = time.monotonic()
    with _quiet_logs(), tempfile.TemporaryDirectory(prefix="tgrelay-demo-") as directory, \
            BotApiSimulator(bots=bots, blocked_chats=[BLOCKED_USER], missing_chats=[MISSING_CHAT],
                            migrated_groups={OLD_GROUP: SUPERGROUP}, seed=1) as sim:
        config = parse_config(_config_text(Path(directory), sim.url, bots), environ={})
        relay = RelaySystem.start(config, alert=alerts)
        try:
            print(f"tgrelay demo: {count} messages through 4 tokens "
                  f"({', '.join(f'{n} x{w}' for n, w in zip(TOKEN_NAMES, WEIGHTS, strict=True))})"
                  f" against a Bot API simulator at {sim.url}", file=out)
            receipts = _accept(relay, _plan(count))
            events = _Events()

            def trouble(done: int) -> None:
                if events.due("storm", done, count, 0.25):
                    sim.flood(by_name[STORM_TOKEN], seconds=STORM_SECONDS)
                    print(f"\n>>> 429 storm on {STORM_TOKEN} for {STORM_SECONDS} s", file=out)
                if events.due("revoke", done, count, 0.4):
                    sim.revoke(by_name[REVOKED_TOKEN])
                    print(f"\n>>> token {REVOKED_TOKEN} revoked", file=out)

            finished = _watch(relay, count, started, trouble, out)
            report = _report(relay, sim, receipts, by_name, started, alerts)
        finally:
            relay.stop(drain_seconds=2.0)
    print(report, file=out)
    lost = count - finished
    if lost:
        print(f"{lost} messages did not finish within {DEADLINE_SECONDS:g} s", file=out)
    return 0 if lost == 0 else 1


def _accept(relay: RelaySystem, messages: list[dict[str, Any]]) -> list[Receipt]:
    receipts: list[Receipt] = []
    for start in range(0, len(messages), ACCEPT_BATCH):
        for outcome in relay.send_many(messages[start:start + ACCEPT_BATCH]):
            if isinstance(outcome, TgrelayError):
                raise outcome
            receipts.append(outcome)
    return receipts


def _watch(relay: RelaySystem, count: int, started: float, trouble: Callable[[int], None],
           out: TextIO) -> int:
    """Show progress until every message is final or the deadline passes; how many finished."""
    live = out.isatty()
    last_line = 0.0
    while True:
        counts = relay.store.statistics()["counts"]
        done = counts["confirmed"] + counts["failed"]
        trouble(done)
        now = time.monotonic()
        elapsed = now - started
        if live or now - last_line >= 2.0 or done >= count:
            states = " ".join(f"{t['name']}:{t['state']}" for t in relay.sending.tokens()) \
                if relay.sending is not None else ""
            line = (f"accepted {count}  confirmed {counts['confirmed']}  failed {counts['failed']}"
                    f"  pending {counts['pending'] + counts['sent']}  "
                    f"{counts['confirmed'] / max(elapsed, 1e-9):5.0f} msg/s  [{states}]")
            print(f"\r{line}\033[K" if live else line, end="" if live else "\n", file=out, flush=True)
            last_line = now
        if done >= count or elapsed > DEADLINE_SECONDS:
            if live:
                print(file=out)
            return done
        time.sleep(0.1)


def _report(relay: RelaySystem, sim: BotApiSimulator, receipts: list[Receipt],
            by_name: dict[str, SimBot], started: float, alerts: _Alerts) -> str:
    elapsed = time.monotonic() - started
    stats = relay.store.statistics()
    counts = stats["counts"]
    reasons: Counter[str] = Counter()
    for receipt in receipts:
        message = relay.get(receipt.id)
        if message.status == "failed":
            reasons[message.last_error or "?"] += 1
    rate_limited = sim.record.rate_limited_counts()
    lines = ["", "per token:",
             f"  {'token':<8} {'weight':>6} {'sent':>6} {'429s':>6} {'errors':>6}  state"]
    tokens = relay.sending.tokens() if relay.sending is not None else []
    for token in tokens:
        answered_429 = rate_limited.get(by_name[token["name"]].id, 0)
        lines.append(f"  {token['name']:<8} {token['weight']:>6g} {token['sent']:>6} "
                     f"{answered_429:>6} {token['errors']:>6}  {token['state']}")
    duplicates = sim.record.duplicates()
    unfinished = sum(1 for r in receipts if relay.get(r.id).status not in FINAL_STATUSES)
    lines += ["", "overall:",
              f"  delivered (confirmed)  {counts['confirmed']}",
              f"  failed                 {counts['failed']}"]
    lines += [f"    {times} x {reason}" for reason, times in reasons.most_common()]
    lines += [f"  unfinished             {unfinished}",
              f"  deliveries seen by the simulator {sim.record.delivery_count()}, "
              f"duplicates {sum(d.count - 1 for d in duplicates)}",
              f"  in doubt (resent)      {stats['in_doubt']}",
              f"  alerts                 {', '.join(k for k, _ in alerts.raised) or 'none'}",
              f"  elapsed                {elapsed:.1f} s"]
    return "\n".join(lines)
