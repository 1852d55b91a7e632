"""The ``tgrelay`` command line: parses arguments and hands each subcommand to its module.

Exit codes (CONTRACT.md): 0 ok, 1 operational failure, 2 usage or config error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from actors.errors import ConfigError, TgrelayError
from supervision.redact import install_log_redaction

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", metavar="PATH",
                        help="config file (default: $TGRELAY_CONFIG, else conf/tgrelay.toml)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tgrelay", description="Reliable Telegram message relay.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the relay and its HTTP API until SIGTERM/SIGINT")
    _config_option(run)
    run.add_argument("--drain-seconds", type=float, default=10.0,
                     help="on stop, how long in-flight sends may finish (default 10)")

    send = commands.add_parser("send", help="enqueue messages through the running relay's API")
    _config_option(send)
    send.add_argument("--chat", help="chat id or @channel")
    send.add_argument("--text", help="message text")
    send.add_argument("--pool", help="pool name (default: the default pool)")
    send.add_argument("--key", help="a dedup key for this message")
    send.add_argument("--file", help="a JSON Lines file, one message object a line")

    status = commands.add_parser("status", help="counts by status, token states, delivery rate")
    _config_option(status)
    status.add_argument("--json", action="store_true", help="print JSON")

    tokens = commands.add_parser("tokens", help="bot token operations")
    token_commands = tokens.add_subparsers(dest="tokens_command", required=True, metavar="ACTION")
    validate = token_commands.add_parser("validate", help="getMe for every configured token")
    _config_option(validate)
    validate.add_argument("--json", action="store_true", help="print JSON")

    check = commands.add_parser("check-config", help="validate the config file")
    _config_option(check)

    demo = commands.add_parser("demo", help="the whole system against a built-in Bot API simulator")
    demo.add_argument("--messages", type=int, default=3000, help="how many messages (default 3000)")

    commands.add_parser("simulate", help="run the Bot API simulator on its own", add_help=False)
    return parser


def _handler(command: str) -> Callable[[argparse.Namespace], int]:
    if command in ("run", "send", "status", "check-config"):
        from supervision import service_commands

        return {"run": service_commands.run, "send": service_commands.send,
                "status": service_commands.status,
                "check-config": service_commands.check_config}[command]
    if command == "tokens":
        from supervision import token_commands

        return token_commands.validate
    if command == "demo":
        from supervision import demo

        return demo.run_demo
    raise AssertionError(command)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["simulate"]:
        from simulator.cli import main as simulate

        return simulate(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_log_redaction()
    try:
        return _handler(args.command)(args)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except TgrelayError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
