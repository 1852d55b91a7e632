"""Load test tgrelay through its HTTP API with faults, and check every message.

    python bench/load.py --tokens 3 --rate 200 --duration 30 --batch 10 \\
        --bad-gateway-rate 0.02 --reset-rate 0.01 --revoke t2@10 --partition 15:5 --kill 20

Starts the Bot API simulator and the relay (``tgrelay simulate`` and ``tgrelay run``) as
subprocesses unless given ``--simulator-url`` / ``--relay-url``, offers messages at a constant
arrival rate (an open model: see ``loadlib/client.py``), injects the faults at their times,
waits for the backlog to drain (bounded by ``--drain-timeout``), stops the relay, and compares
the simulator's delivery record with the store message by message (``loadlib/check.py``).

Writes ``report.json``, ``report.md`` and PNGs into the run directory (default
``var/load-runs/<run id>``), and the raw records beside them, so that
``python bench/load.py --check-only RUN_DIR`` can check again (after deliberate damage, say).
Exit code: 0 when nothing was lost, every duplicate is explained by an in-doubt send and every
deliverable message was confirmed; 1 otherwise; 2 for a usage error.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import threading
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run as a script: the repo's packages and bench.loadlib

import requests  # noqa: E402

from bench.loadlib import plots, report  # noqa: E402
from bench.loadlib.check import Delivered, StoredRow, Submission, check  # noqa: E402
from bench.loadlib.client import LoadPlan, LoadResult, OpenModelLoad, RelaySampler  # noqa: E402
from bench.loadlib.faults import (  # noqa: E402
    TIMED_KINDS,
    EventLog,
    FaultMix,
    FaultRunner,
    TimedFault,
    apply_mix,
    parse_timed,
)
from bench.loadlib.processes import (  # noqa: E402
    RelayProcess,
    SimulatorControl,
    SimulatorProcess,
    TokenSpec,
    free_port,
    read_store,
    token_specs,
    write_relay_config,
)

CHAT_BASE = 7_000_000
PROGRESS_SECONDS = 10.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench/load.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    load = parser.add_argument_group("load")
    load.add_argument("--rate", type=float, default=100.0, help="messages per second (default 100)")
    load.add_argument("--duration", type=float, default=10.0, help="seconds of load (default 10)")
    load.add_argument("--messages", type=int, help="how many messages (overrides --duration)")
    load.add_argument("--batch", type=int, default=1,
                      help="messages per request; 1 uses POST /v1/messages, more /v1/messages/batch")
    load.add_argument("--concurrency", type=int, default=32, help="most requests in flight (default 32)")
    load.add_argument("--chats", type=int,
                      help="distinct chats, messages spread round-robin (default: 20 s of load per chat "
                           "round, so no chat nears Telegram's 1 msg/s)")
    load.add_argument("--give-up-seconds", type=float, default=120.0,
                      help="a request unanswered this long is given up (default 120)")

    system = parser.add_argument_group("the system under test")
    system.add_argument("--tokens", type=int, default=3, help="bot tokens in the pool (default 3)")
    system.add_argument("--simulator-url", help="use this running simulator (tokens: make_bots(--tokens))")
    system.add_argument("--relay-url", help="use this running relay (needs --store)")
    system.add_argument("--relay-token", default="", help="the running relay's API bearer token")
    system.add_argument("--store", type=Path, help="the running relay's SQLite file (read-only)")
    system.add_argument("--per-bot-per-second", type=int, default=30, help="simulator limit (Telegram: 30)")
    system.add_argument("--per-chat-per-second", type=int, default=1, help="simulator limit (Telegram: 1)")
    system.add_argument("--no-limits", action="store_true", help="the simulator enforces no rate limit")
    system.add_argument("--token-rate", type=float,
                        help="the relay's max_per_second per token (default: --per-bot-per-second)")
    system.add_argument("--request-timeout", type=float, default=3.0,
                        help="the relay's telegram.request_timeout_seconds (default 3)")
    system.add_argument("--synchronous", choices=("full", "normal"), default="full")
    system.add_argument("--seed", type=int, default=1, help="the simulator's fault dice")
    system.add_argument("--drain-timeout", type=float, default=300.0,
                        help="most seconds to wait for the backlog after the load (default 300)")

    faults = parser.add_argument_group("faults (times are seconds since the load started)")
    faults.add_argument("--latency-ms", type=float, default=0.0)
    faults.add_argument("--jitter-ms", type=float, default=0.0)
    faults.add_argument("--bad-gateway-rate", type=float, default=0.0, metavar="FRACTION",
                        help="HTML 502 pages")
    faults.add_argument("--reset-rate", type=float, default=0.0, metavar="FRACTION",
                        help="TCP resets without an answer")
    faults.add_argument("--accept-then-timeout-rate", type=float, default=0.0, metavar="FRACTION",
                        help="sends delivered whose answer is held back (in doubt for the relay)")
    faults.add_argument("--accept-then-timeout-seconds", type=float, default=6.0)
    faults.add_argument("--blocked-chats", type=int, default=0, metavar="K",
                        help="the first K chats block every bot (403: the recipient's fault)")
    faults.add_argument("--missing-chats", type=int, default=0, metavar="K",
                        help="the next K chats do not exist (400 chat not found)")
    faults.add_argument("--flood", action="append", default=[], metavar="TOKEN@T:S", help="429 storm")
    faults.add_argument("--revoke", action="append", default=[], metavar="TOKEN@T")
    faults.add_argument("--partition", action="append", default=[], metavar="T:S")
    faults.add_argument("--kill", action="append", default=[], metavar="T[:DOWN]",
                        help="SIGKILL the relay at T, start it again DOWN seconds later")

    output = parser.add_argument_group("output")
    output.add_argument("--run-dir", type=Path, help="default var/load-runs/<run id>")
    output.add_argument("--no-plots", action="store_true")
    output.add_argument("--check-only", type=Path, metavar="RUN_DIR",
                        help="check a finished run again from its files (deliveries from "
                             "--simulator-url when given, else the saved record)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.check_only is not None:
        return check_again(args.check_only, args.simulator_url, plots_wanted=not args.no_plots)
    try:
        settings, mix, timed = _settings(args)
    except ValueError as problem:
        parser.error(str(problem))
    return run(args, settings, mix, timed)


def _settings(args: argparse.Namespace) -> tuple[dict[str, Any], FaultMix, list[TimedFault]]:
    if args.run_dir is not None and (args.run_dir / "relay.db").exists() and not args.relay_url:
        raise ValueError(f"--run-dir {args.run_dir} holds an earlier run's store; give a fresh directory")
    if args.relay_url and args.store is None:
        raise ValueError("--relay-url needs --store (the checker reads the store's in-doubt counts)")
    if args.rate <= 0 or args.tokens < 1 or args.batch < 1 or args.concurrency < 1:
        raise ValueError("--rate, --tokens, --batch and --concurrency must be positive")
    messages = args.messages if args.messages is not None else round(args.rate * args.duration)
    if messages < 1:
        raise ValueError("no message to send: raise --rate, --duration or --messages")
    chats = args.chats or max(1, min(messages, round(args.rate * 20)))
    if args.blocked_chats + args.missing_chats >= chats:
        raise ValueError("--blocked-chats plus --missing-chats must leave some chats deliverable")
    names = [f"t{index}" for index in range(args.tokens)]
    timed = [parse_timed(kind, spec, names) for kind in TIMED_KINDS for spec in getattr(args, kind)]
    if args.relay_url and any(fault.kind == "kill" for fault in timed):
        raise ValueError("--kill needs the relay started by this tool, not --relay-url")
    mix = FaultMix(args.latency_ms, args.jitter_ms, args.bad_gateway_rate, args.reset_rate,
                   args.accept_then_timeout_rate, args.accept_then_timeout_seconds,
                   tuple(CHAT_BASE + index for index in range(args.blocked_chats)),
                   tuple(CHAT_BASE + args.blocked_chats + index for index in range(args.missing_chats)))
    settings = {"rate": args.rate, "messages": messages, "duration": messages / args.rate,
            "batch": args.batch, "concurrency": args.concurrency, "chats": chats,
            "chat_base": CHAT_BASE, "tokens": args.tokens,
            "simulator": args.simulator_url or "started by the tool",
            "relay": args.relay_url or "started by the tool",
            "limits": None if args.no_limits else {"per_bot_per_second": args.per_bot_per_second,
                                                   "per_chat_per_second": args.per_chat_per_second},
            "token_rate": args.token_rate or args.per_bot_per_second,
            "request_timeout": args.request_timeout, "synchronous": args.synchronous,
            "seed": args.seed, "drain_timeout": args.drain_timeout,
            "give_up_seconds": args.give_up_seconds,
            "fault_mix": asdict(mix), "timed_faults": [asdict(fault) for fault in timed]}
    return settings, mix, timed


def run(args: argparse.Namespace, settings: dict[str, Any], mix: FaultMix, timed: list[TimedFault]) -> int:
    began = time.monotonic()
    run_id = f"lt{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
    run_dir = args.run_dir or REPO / "var" / "load-runs" / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    tokens = token_specs(args.tokens)
    print(f"run {run_id}: {settings['messages']:,} messages at {args.rate:g}/s over {args.tokens} tokens; "
          f"files in {run_dir}", flush=True)
    simulator: SimulatorProcess | None = None
    relay: RelayProcess | None = None
    control: SimulatorControl | None = None
    try:
        if args.simulator_url:
            simulator_url = args.simulator_url.rstrip("/")
        else:
            options = ["--seed", str(args.seed)]
            options += (["--no-limits"] if args.no_limits else
                        ["--per-bot-per-second", str(args.per_bot_per_second),
                         "--per-chat-per-second", str(args.per_chat_per_second)])
            simulator = SimulatorProcess(run_dir, args.tokens, options)
            simulator_url = simulator.url
        control = SimulatorControl(simulator_url)
        if args.relay_url:
            relay_url, store_path = args.relay_url.rstrip("/"), args.store
        else:
            config = write_relay_config(
                run_dir, simulator_url=simulator_url, tokens=tokens, port=free_port(),
                token_rate=settings["token_rate"], request_timeout=args.request_timeout,
                synchronous=args.synchronous, per_chat_per_second=args.per_chat_per_second)
            relay = RelayProcess(config, run_dir)
            relay.start()
            relay_url, store_path = relay.url, run_dir / "relay.db"
        return _drive(args, settings, run_id, run_dir, tokens, mix, timed, control, relay, relay_url,
                      store_path, began)
    finally:
        if relay is not None:
            relay.terminate()
        if control is not None:
            control.close()
        if simulator is not None:
            simulator.stop()


def _drive(args: argparse.Namespace, settings: dict[str, Any], run_id: str, run_dir: Path,
           tokens: list[TokenSpec], mix: FaultMix, timed: list[TimedFault], control: SimulatorControl,
           relay: RelayProcess | None, relay_url: str, store_path: Path, began: float) -> int:
    plan = LoadPlan(url=relay_url, run_id=run_id, rate=args.rate, messages=settings["messages"],
                    batch=args.batch, concurrency=args.concurrency, chats=settings["chats"],
                    chat_base=CHAT_BASE, give_up_seconds=args.give_up_seconds,
                    auth_token=args.relay_token)
    load = OpenModelLoad(plan)
    sampler = RelaySampler(relay_url, plan.headers()).start()
    log = EventLog(time.time())
    apply_mix(control, mix, log)
    runner = FaultRunner(timed, control, relay, {token.name: token for token in tokens}, log).start()
    progress_stop = threading.Event()
    threading.Thread(target=_progress, args=(progress_stop, log.start_wall, load, sampler),
                     name="load-progress", daemon=True).start()
    try:
        result = load.run()
        load_seconds = time.time() - log.start_wall
        runner.join()
        drained = _drain(relay_url, plan.headers(), args.drain_timeout)
        drain_seconds = time.time() - log.start_wall - load_seconds
    finally:
        progress_stop.set()
        runner.stop()
        sampler.stop()
    log.add("drained" if drained else "drain timeout",
            f"backlog {'empty' if drained else 'not empty'} {drain_seconds:.1f} s after the load ended")
    print("fetching the simulator's delivery record", flush=True)
    deliveries = control.deliveries()
    if relay is not None:
        print("stopping the relay (SIGTERM) before reading its store", flush=True)
        code = relay.terminate()
        log.add("stop", f"relay stopped with SIGTERM (exit {code})")
    rows = read_store(store_path)
    record = {"run_id": run_id, "start_wall": log.start_wall, "machine": report.machine(),
              "settings": settings, "store_path": str(_relative_to(store_path, run_dir)),
              "tokens": [{"name": token.name, "bot_id": token.bot_id} for token in tokens],
              "events": log.events, "relay_samples": sampler.samples,
              "client": _client_figures(plan, result),
              "relay_starts": relay.starts if relay else None,
              "elapsed": {"load_seconds": load_seconds, "drain_seconds": drain_seconds,
                          "drained": drained, "total_seconds": time.monotonic() - began}}
    _save_records(run_dir, record, result.submissions, deliveries, run_id)
    return _report(run_dir, record, result.submissions, rows, deliveries, plots_wanted=not args.no_plots)


def _relative_to(path: Path, directory: Path) -> Path:
    """``path`` relative to ``directory`` when inside it, so a copied run directory checks its own."""
    try:
        return path.resolve().relative_to(directory.resolve())
    except ValueError:
        return path.resolve()


def _progress(stop: threading.Event, start_wall: float, load: OpenModelLoad, sampler: RelaySampler) -> None:
    while not stop.wait(PROGRESS_SECONDS):
        latest = sampler.samples[-1] if sampler.samples else {}
        counts = latest.get("counts")
        relay = ("relay down" if "down" in latest else
                 "  ".join(f"{name} {count:,}" for name, count in counts.items()) if counts else "-")
        print(f"  t={time.time() - start_wall:6.1f} s  accepted {load.accepted_so_far:,}  | {relay}",
              flush=True)


def _drain(url: str, headers: dict[str, str], timeout: float) -> bool:
    """Wait until no row is pending or sent (the relay may be restarting: keep asking)."""
    deadline = time.monotonic() + timeout
    with requests.Session() as session:
        session.headers.update(headers)
        while time.monotonic() < deadline:
            try:
                counts = session.get(f"{url}/v1/stats", timeout=10).json()["counts"]
                if counts["pending"] + counts["sent"] == 0:
                    return True
            except (requests.RequestException, ValueError, KeyError):
                pass
            time.sleep(0.5)
    return False


def _client_figures(plan: LoadPlan, result: LoadResult) -> dict[str, Any]:
    return {"messages_offered": plan.messages, "accepted": result.accepted,
            "scheduled_requests": result.scheduled_requests, "late_starts": result.late_starts,
            "late_after_seconds": plan.late_after_seconds,
            "lateness": report.percentiles(result.lateness_seconds),
            "attempts": result.attempts, "retries": result.retries,
            "answer": report.percentiles(result.answer_seconds),
            "offered_per_second": plan.messages / max(1e-9, result.finished_at - result.started_at)}


def _save_records(run_dir: Path, record: dict[str, Any], submissions: list[Submission],
                  deliveries: list[Delivered], run_id: str) -> None:
    (run_dir / "run.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    with (run_dir / "submissions.jsonl").open("w", encoding="utf-8") as file:
        file.writelines(json.dumps(asdict(submission)) + "\n" for submission in submissions)
    with (run_dir / "deliveries.jsonl").open("w", encoding="utf-8") as file:
        file.writelines(json.dumps(asdict(delivery)) + "\n" for delivery in deliveries
                        if delivery.text.startswith(f"{run_id} #"))


def _report(run_dir: Path, record: dict[str, Any], submissions: list[Submission], rows: list[StoredRow],
            deliveries: list[Delivered], *, plots_wanted: bool) -> int:
    run_id = record["run_id"]
    result = check(run_id, submissions, rows, deliveries)
    timed = [event["at"] for event in record["events"] if event["kind"] in TIMED_KINDS]
    analysis = report.analyse(run_id, record["start_wall"], record["tokens"], submissions, rows, deliveries,
                              quiet_until=min(timed, default=None))
    full = report.build_report(record, result, analysis)
    if plots_wanted:
        full["plots"] = plots.render(run_dir, full, analysis.latency["accept_to_delivered"])
    report.write(run_dir, full)
    print("\n".join(report.summary_lines(full)))
    print(f"  report: {run_dir / 'report.md'}")
    return 0 if full["verdict"]["passed"] else 1


def check_again(run_dir: Path, simulator_url: str | None, *, plots_wanted: bool) -> int:
    """``--check-only``: the checker over a finished run's files."""
    record = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    with (run_dir / "submissions.jsonl").open(encoding="utf-8") as file:
        submissions = [Submission(**json.loads(line)) for line in file]
    if simulator_url:
        control = SimulatorControl(simulator_url)
        try:
            deliveries = control.deliveries()
        finally:
            control.close()
    else:
        with (run_dir / "deliveries.jsonl").open(encoding="utf-8") as file:
            deliveries = [Delivered(**json.loads(line)) for line in file]
    store = Path(record["store_path"])
    rows = read_store(store if store.is_absolute() else run_dir / store)
    return _report(run_dir, record, submissions, rows, deliveries, plots_wanted=plots_wanted)


if __name__ == "__main__":
    sys.exit(main())
