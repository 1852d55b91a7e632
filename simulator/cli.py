"""``tgrelay simulate``: the Bot API simulator on its own, until SIGINT or SIGTERM.

:func:`main` parses ``argv`` and runs; :func:`add_arguments` and :func:`run` let another
command line mount the same options as a subcommand. Tokens are never printed: ``--env-file``
writes them (with the simulator's URL) to a file only the user can read, ready to ``source``
before ``tgrelay run``. The main thread waits for a signal; the server runs on its own thread.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from simulator.bots import SimBot, make_bots
from simulator.faults import FaultSet
from simulator.limits import Limits, Rate
from simulator.simulator import BotApiSimulator

DEFAULT_PORT = 8081


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tgrelay simulate",
        description="Run a local Telegram Bot API simulator (getMe, sendMessage) with faults.",
    )
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The simulator's options, for a standalone parser or a subcommand's."""
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on")
    server.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    server.add_argument("--bots", type=int, default=3, help="generated bots: alpha_bot, ...")
    server.add_argument("--bot", action="append", default=[], metavar="USERNAME=TOKEN", help="add a bot")
    server.add_argument("--env-file", type=Path, help="write TGRELAY_SIM_URL and BOT_<NAME>_TOKEN lines here")
    server.add_argument("--seed", type=int, help="seed the fault dice for repeatable runs")
    server.add_argument("--log-level", default="INFO", help="DEBUG logs every call (bot ids)")

    limits = parser.add_argument_group("rate limits")
    limits.add_argument("--no-limits", action="store_true", help="never answer 429 by itself")
    limits.add_argument("--per-bot-per-second", type=int, default=30)
    limits.add_argument("--per-chat-per-second", type=int, default=1)
    limits.add_argument("--per-group-per-minute", type=int, default=20)

    faults = parser.add_argument_group("faults (also at POST /_control/<action>)")
    faults.add_argument("--latency-ms", type=float, default=0.0)
    faults.add_argument("--jitter-ms", type=float, default=0.0)
    faults.add_argument("--bad-gateway-rate", type=float, default=0.0, metavar="FRACTION")
    faults.add_argument("--reset-rate", type=float, default=0.0, metavar="FRACTION")
    faults.add_argument("--accept-then-timeout-rate", type=float, default=0.0, metavar="FRACTION")
    faults.add_argument("--accept-then-timeout-seconds", type=float, default=30.0)
    faults.add_argument("--revoke", action="append", default=[], metavar="BOT")
    faults.add_argument("--blocked-chat", action="append", default=[], metavar="CHAT")
    faults.add_argument("--missing-chat", action="append", default=[], metavar="CHAT")
    faults.add_argument(
        "--migrate", action="append", default=[], metavar="GROUP=SUPERGROUP", help="-42=-1001"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run; 0 ok, 1 failure, 2 usage error."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Run the simulator described by parsed ``args`` until SIGINT or SIGTERM."""
    logging.basicConfig(level=str(args.log_level).upper(), format="%(asctime)s %(levelname)s %(message)s")
    try:
        simulator = _build(args)
    except ValueError as problem:
        print(f"tgrelay simulate: {problem}", file=sys.stderr)
        return 2
    try:
        simulator.start()
    except OSError as problem:
        print(f"tgrelay simulate: cannot listen on {args.host}:{args.port}: {problem}",
              file=sys.stderr)  # fmt: skip
        return 1
    try:
        _announce(simulator, args.env_file)
        _wait_for_signal()
    finally:
        simulator.stop()
    return 0


def _build(args: argparse.Namespace) -> BotApiSimulator:
    bots = make_bots(args.bots) + [_named_bot(spec) for spec in args.bot]
    simulator = BotApiSimulator(
        bots=bots,
        host=args.host,
        port=args.port,
        enforce_limits=not args.no_limits,
        limits=Limits(
            per_bot=Rate(args.per_bot_per_second, 1.0),
            per_private_chat=Rate(args.per_chat_per_second, 1.0),
            per_group=Rate(args.per_group_per_minute, 60.0),
        ),
        faults=FaultSet(
            latency_ms=args.latency_ms,
            jitter_ms=args.jitter_ms,
            bad_gateway_rate=args.bad_gateway_rate,
            reset_rate=args.reset_rate,
            accept_then_timeout_rate=args.accept_then_timeout_rate,
            accept_then_timeout_seconds=args.accept_then_timeout_seconds,
        ),
        missing_chats=[_chat_arg(chat) for chat in args.missing_chat],
        blocked_chats=[_chat_arg(chat) for chat in args.blocked_chat],
        migrated_groups=dict(_migration(spec) for spec in args.migrate),
        seed=args.seed,
    )
    for ref in args.revoke:
        try:
            simulator.revoke(int(ref) if ref.isdigit() else ref)
        except KeyError:
            raise ValueError(f"--revoke {ref}: no such bot") from None
    return simulator


def _named_bot(spec: str) -> SimBot:
    username, separator, token = spec.partition("=")
    if not separator or not username:
        raise ValueError("--bot takes USERNAME=TOKEN")
    try:
        return SimBot(token=token, username=username)
    except ValueError:
        raise ValueError(f"--bot {username}=...: the token is not Telegram-shaped") from None


def _chat_arg(chat: str) -> int | str:
    return chat if chat.startswith("@") else int(chat)


def _migration(spec: str) -> tuple[int, int]:
    group, separator, supergroup = spec.partition("=")
    if not separator:
        raise ValueError("--migrate takes GROUP=SUPERGROUP, e.g. -42=-1001234567890")
    return int(group), int(supergroup)


def _announce(simulator: BotApiSimulator, env_file: Path | None) -> None:
    if env_file is not None:
        _write_env_file(simulator, env_file)
    print(f"Bot API simulator listening on {simulator.url}", flush=True)
    for bot in simulator.bots:
        state = " (revoked)" if simulator.is_revoked(bot) else ""
        print(f"  bot {bot.id} @{bot.username}{state}", flush=True)
    if env_file is None:
        print("  tokens: pass --env-file PATH to write them; they are never printed", flush=True)
    else:
        print(f"  tokens written to {env_file}", flush=True)


def _write_env_file(simulator: BotApiSimulator, env_file: Path) -> None:
    lines = [f"TGRELAY_SIM_URL={simulator.url}"]
    lines += [f"{_env_name(bot)}={bot.token}" for bot in simulator.bots]
    descriptor = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write("\n".join(lines) + "\n")


def _env_name(bot: SimBot) -> str:
    stem = bot.username.removesuffix("_bot").removesuffix("bot").strip("_") or str(bot.id)
    return f"BOT_{stem.upper()}_TOKEN"


def _wait_for_signal() -> None:
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[signum] = signal.signal(signum, request_stop)
        except ValueError:
            break  # signals reach only the main thread; elsewhere the process is stopped
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
