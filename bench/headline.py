"""The headline run: 100,000 messages over 10 tokens with every fault mixed in.

    python bench/headline.py [--run-dir DIR] [--update-docs] [extra bench/load.py options]
    python bench/headline.py --check-only DIR [--update-docs]     # report a finished run again

Telegram's own limits in the simulator and in the relay (30 msg/s per bot, 1 msg/s per chat),
50-150 ms of Bot API latency, and in one run:

- HTML 502 pages on 1% of requests and connection resets on 1%;
- accept-then-timeout on 0.2% of sends (delivered, answer held 6 s; the relay gives up after 3 s,
  so each is a send in doubt, resent: the source of honest duplicates);
- 5 chats that blocked every bot and 5 that do not exist (the recipient's fault: these fail);
- token t9 revoked at 60 s; a 30 s 429 storm on t3 at 100 s; a 20 s network partition at 160 s;
- the relay SIGKILLed at 45 s, 130 s, 220 s (down 3 s), 300 s and 420 s, started again each time.

200 msg/s offered in batches of 25 for 500 s: three quarters of what the 9 tokens left after the
revocation may send (270/s), the headroom an operator would keep, so the backlog the faults
leave behind drains while the load goes on. Prints the report
summary and a README section with the figures; ``--update-docs`` copies the overview picture to
``docs/load-report-example.png``. Exit code as bench/load.py's.
"""

from __future__ import annotations

import json
import shutil
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import load  # noqa: E402

HEADLINE = [
    "--tokens", "10", "--messages", "100000", "--rate", "200", "--batch", "25", "--concurrency", "64",
    "--per-bot-per-second", "30", "--per-chat-per-second", "1", "--request-timeout", "3",
    "--latency-ms", "50", "--jitter-ms", "100",
    "--bad-gateway-rate", "0.01", "--reset-rate", "0.01",
    "--accept-then-timeout-rate", "0.002", "--accept-then-timeout-seconds", "6",
    "--blocked-chats", "5", "--missing-chats", "5",
    "--revoke", "t9@60", "--flood", "t3@100:30", "--partition", "160:20",
    "--kill", "45", "--kill", "130", "--kill", "220:3", "--kill", "300", "--kill", "420",
    "--drain-timeout", "900", "--seed", "5",
]
COMMAND = "python bench/headline.py"


def _fault_lines(report: dict[str, Any]) -> str:
    lines: list[str] = []
    for event in report["events"]:
        if event["kind"] == "steady" and not event["detail"].startswith("latency"):
            lines.append(f"- throughout: {event['detail']}")
        elif event["kind"] == "restart" and lines:
            lines[-1] += f"; {event['detail'].removeprefix('relay ')}"
        elif event["kind"] in ("flood", "revoke", "partition", "kill"):
            lines.append(f"- at {event['t']:.0f} s: {event['detail']}")
    return "\n".join(lines)


def readme_section(report: dict[str, Any]) -> str:
    check, latencies = report["check"], report["latency_seconds"]
    latency, quiet = latencies["accept_to_delivered"], latencies["accept_to_delivered_before_timed_faults"]
    client, elapsed, settings = report["client"], report["elapsed"], report["settings"]
    failed = check["failed"]
    limits = settings["limits"] or {}
    explained = "all explained" if not check["duplicates"]["unexplained"]["count"] else "NOT all explained"
    mix = settings["fault_mix"]
    return f"""## Reliability under load and faults

`{COMMAND}` offers {client['messages_offered']:,} messages through the HTTP API at {settings['rate']:g}/s ({settings['batch']} per request) to {settings['chats']:,} chats over {settings['tokens']} bot tokens, against the Bot API simulator with Telegram's limits ({limits.get('per_bot_per_second', '-')} msg/s per bot, {limits.get('per_chat_per_second', '-')} msg/s per chat; the relay enforces the same) and {mix['latency_ms']:g}-{mix['latency_ms'] + mix['jitter_ms']:g} ms per Bot API call. The relay gives up waiting for an answer after {settings['request_timeout']:g} s. Faults:

{_fault_lines(report)}

Then it waits for the backlog to drain, stops the relay and compares the simulator's delivery record with the store message by message (`bench/loadlib/check.py`).

| | |
|---|---|
| accepted | {check['population']:,} |
| confirmed | {check['confirmed']:,} |
| failed, the recipient's fault (blocked, chat not found) | {failed['recipient']:,} |
| failed, anything else | {failed['other']:,} |
| **lost** | **{check['lost']['count']:,}** |
| duplicate deliveries / in-doubt sends | {check['duplicates']['deliveries']:,} / {check['in_doubt_total']:,} ({explained} by an in-doubt send of that message) |
| delivery rate: confirmed / accepted | {check['delivery_rate']:.2%} |
| delivery rate of deliverable messages | {check['deliverable_rate']:.2%} (target 99.5%) |
| accepted → delivered, p50 / p95 / p99, whole run | {latency['p50']:.2f} s / {latency['p95']:.2f} s / {latency['p99']:.2f} s |
| the same, before the first timed fault | {quiet['p50']:.2f} s / {quiet['p95']:.2f} s / {quiet['p99']:.2f} s |
| throughput | {report['throughput']['delivered_per_second']:,.0f} deliveries/s; peak backlog {report['throughput']['peak_backlog']:,} |
| elapsed | {elapsed['load_seconds']:.0f} s of load; the backlog drained {elapsed['drain_seconds']:.0f} s later |
| machine | {report['machine']} |

The whole-run latency is the faults' doing: a message accepted during the partition waits for it to heal and then for its turn under 30 msg/s per bot, and so does everything queued behind it. Duplicates come only from sends whose outcome the relay could not know (an answer that never came, a SIGKILL after the request left): Telegram has no idempotency key for bots, so the relay resends them (at-least-once) and counts each one.

![load report](docs/load-report-example.png)

Other mixes: `python bench/load.py --help` (a constant arrival rate, faults at given times, a report with pictures in `var/load-runs/<run id>/`). `tests/test_load_tool.py` shows the checker failing when a message is lost or delivered twice.
"""


def main(argv: list[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    update_docs = "--update-docs" in arguments
    arguments = [argument for argument in arguments if argument != "--update-docs"]
    if "--check-only" in arguments:  # the checker and the report again, over a finished run
        run_dir = Path(arguments[arguments.index("--check-only") + 1])
    else:
        if "--run-dir" not in arguments:
            arguments += ["--run-dir", str(REPO / "var" / "load-runs" / f"headline-{datetime.now():%Y%m%d-%H%M%S}")]
        run_dir = Path(arguments[arguments.index("--run-dir") + 1])
    code = load.main([*HEADLINE, *arguments])
    report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    section = readme_section(report)
    (run_dir / "README-section.md").write_text(section, encoding="utf-8")
    print(f"\nREADME section written to {run_dir / 'README-section.md'}")
    if update_docs and (run_dir / "overview.png").exists():
        target = REPO / "docs" / "load-report-example.png"
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(run_dir / "overview.png", target)
        print(f"picture copied to {target}")
    return code


if __name__ == "__main__":
    sys.exit(main())
