"""The load tool (bench/load.py): a short real run, and a checker that fails when it should.

A checker that cannot fail proves nothing: after a clean run, the tests damage the evidence on
purpose (a row the store claims confirmed that the simulator never received, a delivery taken
out of the record, a second delivery of a delivered message) and expect exactly that reported.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import apsw
import pytest
import requests

from bench.loadlib.check import Delivered, StoredRow, Submission, check
from bench.loadlib.client import LoadPlan, OpenModelLoad
from simulator import BotApiSimulator, Limits, Rate, make_bots

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
LOAD = [sys.executable, str(REPO / "bench" / "load.py")]
TOKENS = 3
RATE = 40
SECONDS = 3
MESSAGES = RATE * SECONDS


@dataclass
class FinishedRun:
    run_dir: Path
    process: subprocess.CompletedProcess[str]
    simulator: BotApiSimulator

    @property
    def report(self) -> dict[str, Any]:
        return json.loads((self.run_dir / "report.json").read_text())

    @property
    def run_id(self) -> str:
        return str(self.report["run_id"])


def load_tool(*arguments: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LOAD, *arguments], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def simulator() -> Iterator[BotApiSimulator]:
    limits = Limits(per_bot=Rate(100, 1.0), per_private_chat=Rate(1, 1.0), per_group=Rate(20, 60.0))
    with BotApiSimulator(bots=make_bots(TOKENS), limits=limits, seed=3) as sim:
        yield sim


@pytest.fixture(scope="module")
def finished_run(simulator: BotApiSimulator, tmp_path_factory: pytest.TempPathFactory) -> FinishedRun:
    """One short run against the simulator above, with a revoked token and a blocked chat."""
    run_dir = tmp_path_factory.mktemp("load") / "run"
    process = load_tool("--simulator-url", simulator.url, "--tokens", str(TOKENS), "--rate", str(RATE),
                        "--duration", str(SECONDS), "--chats", "60", "--blocked-chats", "1",
                        "--bad-gateway-rate", "0.03", "--revoke", "t2@1", "--run-dir", str(run_dir))
    return FinishedRun(run_dir, process, simulator)


def damaged_copy(run: FinishedRun, tmp_path: Path) -> Path:
    copy = tmp_path / "damaged"
    shutil.copytree(run.run_dir, copy)
    return copy


def check_again(run_dir: Path, *options: str) -> tuple[int, dict[str, Any]]:
    process = load_tool("--check-only", str(run_dir), "--no-plots", *options)
    assert process.returncode in (0, 1), process.stderr
    return process.returncode, json.loads((run_dir / "report.json").read_text())["check"]


# --- a real run -------------------------------------------------------------------------------


def test_a_short_run_under_faults_accounts_for_every_message(finished_run: FinishedRun) -> None:
    assert finished_run.process.returncode == 0, finished_run.process.stdout + finished_run.process.stderr
    result = finished_run.report["check"]
    # Chat 0 of 60 blocks every bot: messages 0, 60, 120, ... fail, and that is its fault.
    to_blocked_chat = len(range(0, MESSAGES, 60))
    assert result["population"] == result["accepted_by_client"] == MESSAGES
    assert result["lost"]["count"] == 0
    assert result["failed"] == {"total": to_blocked_chat, "recipient": to_blocked_chat, "other": 0,
                                "by_reason": {"Forbidden: bot was blocked by the user": to_blocked_chat}}
    assert result["confirmed"] == MESSAGES - to_blocked_chat
    assert result["deliverable_rate"] == 1.0
    assert result["duplicates"]["deliveries"] <= result["in_doubt_total"]
    assert "PASSED" in finished_run.process.stdout


def test_the_report_agrees_with_the_simulators_own_record(finished_run: FinishedRun) -> None:
    report = finished_run.report
    delivered = {(d.chat_id, d.text) for d in finished_run.simulator.record.deliveries()
                 if d.text.startswith(f"{finished_run.run_id} #")}
    assert report["check"]["confirmed"] == len(delivered)
    assert sum(token["delivered"] for token in report["tokens"]) >= len(delivered)
    assert [token["name"] for token in report["tokens"]] == ["t0", "t1", "t2"]


def test_the_fault_events_are_in_the_report_with_their_times(finished_run: FinishedRun) -> None:
    events = finished_run.report["events"]
    by_kind = {event["kind"]: event for event in events}
    assert by_kind["revoke"]["detail"] == "token t2 revoked"
    assert by_kind["revoke"]["t"] == pytest.approx(1.0, abs=0.5)
    assert {"steady": "HTML 502 on 3.00% of requests"}.items() <= {
        event["kind"]: event["detail"] for event in events if "502" in event["detail"]}.items()
    assert by_kind["drained"]["t"] >= SECONDS


def test_the_run_writes_json_markdown_and_pictures(finished_run: FinishedRun) -> None:
    run_dir = finished_run.run_dir
    markdown = (run_dir / "report.md").read_text()
    assert "| **lost** | **0** |" in markdown
    for picture in ("throughput.png", "tokens.png", "latency.png", "overview.png"):
        assert (run_dir / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({picture})" in markdown
    timeline = finished_run.report["timeline"]
    assert sum(timeline["accepted"]) == MESSAGES
    assert timeline["backlog"][-1] == 0


# --- the checker must be able to fail ---------------------------------------------------------


def test_the_checker_reports_a_row_confirmed_in_the_store_that_the_simulator_never_received(
        finished_run: FinishedRun, tmp_path: Path) -> None:
    run_dir = damaged_copy(finished_run, tmp_path)
    phantom = f"{finished_run.run_id} #999999"
    db = apsw.Connection(str(run_dir / "relay.db"))
    db.execute("INSERT INTO message_store (chat_id, message_text, timestamp, status, "
               "telegram_message_id, pool, next_attempt_at, updated_at) "
               "VALUES (7000005, ?, 0, 'confirmed', 4242, 'default', 0, 0)", (phantom,))
    db.close()

    code, result = check_again(run_dir)

    assert code == 1
    assert result["lost"]["count"] == 1
    (lost,) = result["lost"]["sample"]
    assert (lost["chat_id"], lost["text"]) == (7000005, phantom)
    assert "confirmed" in lost["why"]
    assert result["duplicates"]["unexplained"]["count"] == 0
    assert "1 lost" in result["problems"]


def test_the_checker_reports_an_accepted_message_taken_out_of_the_delivery_record(
        finished_run: FinishedRun, tmp_path: Path) -> None:
    run_dir = damaged_copy(finished_run, tmp_path)
    record = run_dir / "deliveries.jsonl"
    lines = record.read_text().splitlines(keepends=True)
    removed = json.loads(lines[7])
    record.write_text("".join(line for line in lines
                              if (json.loads(line)["chat_id"], json.loads(line)["text"])
                              != (removed["chat_id"], removed["text"])))

    code, result = check_again(run_dir)

    assert code == 1
    assert result["lost"]["count"] == 1
    assert result["lost"]["sample"][0]["text"] == removed["text"]
    assert result["confirmed"] == finished_run.report["check"]["confirmed"] - 1


def test_the_checker_reports_a_second_delivery_of_a_delivered_message_as_an_unexplained_duplicate(
        finished_run: FinishedRun, tmp_path: Path) -> None:
    run_dir = damaged_copy(finished_run, tmp_path)
    rows = apsw.Connection(str(run_dir / "relay.db"), flags=apsw.SQLITE_OPEN_READONLY).execute(
        "SELECT chat_id, message_text FROM message_store WHERE status = 'confirmed' "
        "AND in_doubt_count = 0 ORDER BY id LIMIT 1").fetchall()
    chat_id, text = rows[0]
    bot = finished_run.simulator.bots[0]
    answer = requests.post(f"{finished_run.simulator.url}/bot{bot.token}/sendMessage",
                           json={"chat_id": chat_id, "text": text}, timeout=10).json()
    assert answer["ok"], answer

    code, result = check_again(run_dir, "--simulator-url", finished_run.simulator.url)

    assert code == 1
    assert result["duplicates"]["deliveries"] == finished_run.report["check"]["duplicates"]["deliveries"] + 1
    (unexplained,) = result["duplicates"]["unexplained"]["sample"]
    assert (unexplained["chat_id"], unexplained["text"], unexplained["in_doubt_count"]) == (chat_id, text, 0)
    assert result["lost"]["count"] == 0


# --- the checker's rules, on made-up records -------------------------------------------------


RUN = "lt-test"


def row(seq: int, status: str, *, in_doubt: int = 0, error: str | None = None,
        telegram_id: int | None = 1) -> StoredRow:
    return StoredRow(seq + 1, 100 + seq, f"{RUN} #{seq}", status, error, in_doubt, 0, "t0",
                     telegram_id if status == "confirmed" else None, 10.0, 11.0)


def accepted(seq: int) -> Submission:
    return Submission(seq, 100 + seq, f"{RUN} #{seq}", 9.0, 9.5, seq + 1, "accepted")


def delivered(seq: int, message_id: int = 1, at: float = 10.5) -> Delivered:
    return Delivered(1, 100 + seq, f"{RUN} #{seq}", message_id, at)


def test_a_message_failed_because_the_chat_blocked_every_bot_is_the_recipients_fault_not_lost() -> None:
    result = check(RUN, [accepted(0)], [row(0, "failed", error="Forbidden: bot was blocked by the user "
                                                   "(refused by every token of the pool: t0, t1)")], [])
    assert (result.failed_recipient, result.failed_other, result.lost) == (1, 0, [])
    assert result.failed_by_reason == {"Forbidden: bot was blocked by the user": 1}
    assert result.problems() == []


def test_a_pending_message_the_simulator_never_received_is_lost() -> None:
    result = check(RUN, [accepted(0), accepted(1)], [row(0, "confirmed"), row(1, "pending")], [delivered(0)])
    assert [finding.text for finding in result.lost] == [f"{RUN} #1"]
    assert "still pending" in result.lost[0].why


def test_an_accepted_message_with_no_row_and_no_delivery_is_lost() -> None:
    result = check(RUN, [accepted(0)], [], [])
    assert result.lost[0].why == "no row in the store"


def test_a_duplicate_is_explained_only_by_in_doubt_sends_of_that_same_message() -> None:
    rows = [row(0, "confirmed", in_doubt=1), row(1, "confirmed")]
    deliveries = [delivered(0), delivered(0, 2, 11.0), delivered(1), delivered(1, 2, 11.0)]
    result = check(RUN, [accepted(0), accepted(1)], rows, deliveries)
    assert result.duplicate_deliveries == 2
    assert result.in_doubt_total == 1
    assert [(d.text, d.explained) for d in result.duplicates] == [(f"{RUN} #0", True), (f"{RUN} #1", False)]
    assert "1 unexplained duplicates" in result.problems()


def test_a_confirmation_with_a_message_id_telegram_never_gave_is_reported() -> None:
    result = check(RUN, [accepted(0)], [row(0, "confirmed", telegram_id=77)], [delivered(0, message_id=5)])
    assert len(result.wrong_message_id) == 1
    assert result.confirmed == 0


def test_two_rows_for_one_message_are_reported_as_a_repeat_that_got_past_dedup() -> None:
    second = StoredRow(99, 100, f"{RUN} #0", "confirmed", None, 0, 0, "t1", 2, 10.0, 11.0)
    result = check(RUN, [accepted(0)], [row(0, "confirmed"), second], [delivered(0), delivered(0, 2, 11.0)])
    assert [finding.why for finding in result.accepted_twice] == ["2 rows: ids [1, 99]"]
    assert [(d.copies, d.explained) for d in result.duplicates] == [(2, False)]


def test_a_row_the_client_never_heard_accepted_is_checked_too() -> None:
    result = check(RUN, [], [row(0, "pending")], [])
    assert (result.accepted_unacknowledged, len(result.lost)) == (1, 1)


def test_other_runs_messages_are_ignored() -> None:
    other = Delivered(1, 5, "another-run #0", 1, 1.0)
    result = check(RUN, [accepted(0)], [row(0, "confirmed")], [delivered(0), other])
    assert result.problems() == []
    assert result.unexpected_deliveries == []


# --- the open model ---------------------------------------------------------------------------


class SlowRelay:
    """A stand-in for the relay's POST /v1/messages: answers 202 after ``delay`` seconds; the
    first ``failures`` requests get 503 (the messages were committed anyway: repeats are
    answered as duplicates, as the relay's dedup does)."""

    def __init__(self, delay: float, failures: int = 0) -> None:
        self.delay = delay
        self.failures = failures
        self.arrivals: list[float] = []
        self.seen: dict[str, int] = {}
        self._lock = threading.Lock()
        relay = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, answer = relay.answer(body["text"])
                time.sleep(relay.delay)
                payload = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, text: str) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.arrivals.append(time.monotonic())
            known = self.seen.setdefault(text, len(self.seen) + 1)
            if self.failures > 0:
                self.failures -= 1
                return 503, {"error": "the store is busy"}
            duplicate = len(self.arrivals) > len(self.seen)
            return (200 if duplicate else 202), {"id": known, "status": "pending", "duplicate": duplicate}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def slow_relay() -> Iterator[SlowRelay]:
    relay = SlowRelay(delay=0.4)
    yield relay
    relay.close()


def test_requests_leave_on_schedule_however_slow_the_answers_are(slow_relay: SlowRelay) -> None:
    plan = LoadPlan(url=slow_relay.url, run_id=RUN, rate=20, messages=20, concurrency=16,
                    late_after_seconds=0.25)
    started = time.monotonic()
    result = OpenModelLoad(plan).run()
    assert result.late_starts == 0
    assert slow_relay.arrivals[-1] - started == pytest.approx(19 / 20, abs=0.25)
    assert result.accepted == 20


def test_a_full_set_of_slots_makes_later_requests_start_late_and_they_are_counted(
        slow_relay: SlowRelay) -> None:
    plan = LoadPlan(url=slow_relay.url, run_id=RUN, rate=20, messages=20, concurrency=2)
    result = OpenModelLoad(plan).run()
    assert result.late_starts >= 10
    assert max(result.lateness_seconds) > 2.0
    assert result.accepted == 20


def test_an_unanswered_request_is_sent_again_and_a_repeat_keeps_the_original_id() -> None:
    relay = SlowRelay(delay=0.0, failures=1)
    try:
        result = OpenModelLoad(LoadPlan(url=relay.url, run_id=RUN, rate=50, messages=1)).run()
    finally:
        relay.close()
    (submission,) = result.submissions
    assert (submission.outcome, submission.message_id, submission.attempts) == ("duplicate", 1, 2)
    assert result.retries == {"HTTP 503": 1}


# --- the whole thing, processes included ------------------------------------------------------


def test_a_run_with_its_own_simulator_and_relay_loses_nothing_across_a_sigkill(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    process = load_tool("--tokens", "2", "--rate", "60", "--duration", "3", "--batch", "5",
                        "--per-bot-per-second", "100", "--reset-rate", "0.02",
                        "--accept-then-timeout-rate", "0.05", "--accept-then-timeout-seconds", "4",
                        "--kill", "1.5", "--no-plots", "--run-dir", str(run_dir))
    assert process.returncode == 0, process.stdout + process.stderr
    report = json.loads((run_dir / "report.json").read_text())
    assert [event["kind"] for event in report["events"] if event["kind"] in ("kill", "restart")] == [
        "kill", "restart"]
    assert report["check"]["lost"]["count"] == 0
    assert report["check"]["population"] == 180
    assert report["check"]["duplicates"]["deliveries"] <= report["check"]["in_doubt_total"]
    assert (run_dir / "relay-2.log").exists()
