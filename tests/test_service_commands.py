"""``tgrelay run``, ``send``, ``status`` and ``check-config``: real relay processes stopped with
real signals, real HTTP, the real command line."""

from __future__ import annotations

import io
import json
import logging
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from supervision import cli
from supervision.service_commands import Progress, _Tally, render_status, serve
from tests.helpers_http import (
    ALPHA_SECRET,
    API_TOKEN,
    OPS_SECRET,
    REPO,
    Served,
    accepting_side_command,
    cli_command,
    free_port,
    make_config,
    relay_process,
    served,
    write_config,
)


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[Served, Path]]:
    """A relay serving on a free port, and a config file that points the commands at it."""
    with served(make_config(tmp_path)) as serving:
        yield serving, write_config(tmp_path, listen=f"127.0.0.1:{serving.api.port}")


def pending(serving: Served) -> int:
    count: int = serving.get("/v1/stats").json()["counts"]["pending"]
    return count


# --- check-config ---------------------------------------------------------------------------


def test_check_config_prints_pools_and_token_names_but_never_secrets(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path)

    code = cli.main(["check-config", "-c", str(path)])

    out = capsys.readouterr().out
    assert code == 0
    assert f"{path}: OK" in out
    assert "2 pool(s), 2 token(s)" in out
    assert "alpha (weight 2" in out and "ops-bot" in out
    assert not [secret for secret in (ALPHA_SECRET, OPS_SECRET, API_TOKEN) if secret in out]


def test_check_config_reads_the_path_from_tgrelay_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TGRELAY_CONFIG", str(write_config(tmp_path)))

    assert cli.main(["check-config"]) == 0
    assert "OK" in capsys.readouterr().out


def test_check_config_exits_2_naming_the_offending_key(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    path.write_text(path.read_text() + '\n[dedup]\nwindow_seconds = "soon"\n')

    finished = subprocess.run(cli_command("check-config", "-c", str(path)), cwd=REPO,
                              capture_output=True, text=True, timeout=60, check=False)

    assert finished.returncode == 2
    assert "dedup.window_seconds" in finished.stderr
    assert ALPHA_SECRET not in finished.stderr + finished.stdout


def test_check_config_of_a_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["check-config", "-c", str(tmp_path / "absent.toml")])

    assert code == 2
    assert "cannot read config file" in capsys.readouterr().err


# --- run ------------------------------------------------------------------------------------


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_the_relay_process_stops_cleanly_on_a_signal_and_keeps_what_it_accepted(
        tmp_path: Path, stop_signal: signal.Signals) -> None:
    config_path = write_config(tmp_path, listen=f"127.0.0.1:{free_port()}")
    headers = {"Authorization": f"Bearer {API_TOKEN}"}

    with relay_process(accepting_side_command(config_path), tmp_path / "first.log") as relay:
        accepted = requests.post(relay.url + "/v1/messages", json={"chat_id": 5, "text": "keep me"},
                                 headers=headers, timeout=10).json()
        sent = subprocess.run(cli_command("send", "-c", str(config_path), "--chat", "6", "--text", "me too"),
                              cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
        relay.process.send_signal(stop_signal)
        code = relay.process.wait(20)

    assert code == 0, relay.log()
    assert sent.returncode == 0 and sent.stdout.startswith("id ") and "accepted" in sent.stdout
    assert "tgrelay stopped" in relay.log()
    with relay_process(accepting_side_command(config_path), tmp_path / "second.log") as again:
        stored = requests.get(f"{again.url}/v1/messages/{accepted['id']}", headers=headers, timeout=10)
        stats = requests.get(f"{again.url}/v1/stats", headers=headers, timeout=10).json()
        assert again.terminate() == 0
    assert stored.status_code == 200
    assert stored.json()["chat_id"] == 5
    assert stats["counts"]["pending"] + stats["counts"]["sent"] + stats["counts"]["confirmed"] == 2


def test_tgrelay_run_serves_until_sigterm_and_exits_0(tmp_path: Path) -> None:
    config_path = write_config(tmp_path, listen=f"127.0.0.1:{free_port()}")

    with relay_process(cli_command("run", "-c", str(config_path), "--drain-seconds", "1"),
                       tmp_path / "run.log") as relay:
        response = requests.post(relay.url + "/v1/messages", json={"chat_id": 5, "text": "hello"},
                                 headers={"Authorization": f"Bearer {API_TOKEN}"}, timeout=10)
        code = relay.terminate()

    assert response.status_code == 202
    assert code == 0, relay.log()
    assert ALPHA_SECRET not in relay.log()


def test_serving_on_a_taken_port_fails_with_exit_1_and_says_why(
        live: tuple[Served, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    serving, _ = live
    other = tmp_path / "other"
    other.mkdir()
    config = make_config(other, listen=f"127.0.0.1:{serving.api.port}")

    with caplog.at_level(logging.ERROR):
        code = serve(config, send=False, wait_for_stop=lambda: pytest.fail("it should not serve"))

    assert code == 1
    assert f"cannot listen on 127.0.0.1:{serving.api.port}" in caplog.text


def test_serving_fails_with_exit_1_when_the_store_cannot_be_opened(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "not-a-directory").write_text("")
    config = make_config(tmp_path / "not-a-directory")

    with caplog.at_level(logging.ERROR):
        code = serve(config, send=False, wait_for_stop=lambda: pytest.fail("it should not serve"))

    assert code == 1
    assert "cannot open the store" in caplog.text


# --- send -----------------------------------------------------------------------------------


def test_send_prints_the_id_then_reports_the_duplicate_with_its_status(
        live: tuple[Served, Path], capsys: pytest.CaptureFixture[str]) -> None:
    serving, config_path = live

    first = cli.main(["send", "-c", str(config_path), "--chat", "42", "--text", "hello"])
    first_out = capsys.readouterr().out
    second = cli.main(["send", "-c", str(config_path), "--chat", "42", "--text", "hello"])
    second_out = capsys.readouterr().out

    message_id = first_out.split()[1]
    assert (first, second) == (0, 0)
    assert first_out == f"id {message_id} accepted\n"
    assert second_out == f"id {message_id} duplicate (status pending)\n"
    assert pending(serving) == 1


def test_send_passes_the_pool_and_the_dedup_key(live: tuple[Served, Path],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    serving, config_path = live

    code = cli.main(["send", "-c", str(config_path), "--chat", "@news_channel", "--text", "a",
                     "--pool", "ops", "--key", "k-1"])
    conflict = cli.main(["send", "-c", str(config_path), "--chat", "@news_channel", "--text", "b",
                         "--pool", "ops", "--key", "k-1"])

    captured = capsys.readouterr()
    message_id = captured.out.split()[1]
    assert (code, conflict) == (0, 1)
    assert serving.get(f"/v1/messages/{message_id}").json()["pool"] == "ops"
    assert "rejected" in captured.err and "k-1" in captured.err


def test_send_of_a_message_the_relay_rejects_exits_1_with_the_reason(
        live: tuple[Served, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _, config_path = live

    code = cli.main(["send", "-c", str(config_path), "--chat", "not a chat", "--text", "hi"])

    assert code == 1
    assert "rejected: chat_id" in capsys.readouterr().err


@pytest.mark.parametrize("arguments", [[], ["--chat", "1"], ["--text", "hi"],
                                       ["--file", "x.jsonl", "--chat", "1", "--text", "hi"],
                                       ["--file", "x.jsonl", "--key", "k"]])
def test_send_without_exactly_one_of_file_or_chat_and_text_is_a_usage_error(
        tmp_path: Path, arguments: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["send", "-c", str(write_config(tmp_path)), *arguments])

    assert code == 2
    assert "usage" in capsys.readouterr().err


def test_send_when_no_relay_is_running_exits_1_with_a_clear_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    config_path = write_config(tmp_path, listen=f"127.0.0.1:{port}")

    code = cli.main(["send", "-c", str(config_path), "--chat", "1", "--text", "hi"])

    assert code == 1
    assert f"no relay is running at http://127.0.0.1:{port}" in capsys.readouterr().err


def test_send_with_another_api_token_exits_1_and_says_the_token_was_refused(
        live: tuple[Served, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    serving, _ = live
    other = tmp_path / "other"
    other.mkdir()
    config_path = write_config(other, listen=f"127.0.0.1:{serving.api.port}", auth_token="not-the-token")

    code = cli.main(["send", "-c", str(config_path), "--chat", "1", "--text", "hi"])

    assert code == 1
    assert "refused the API token" in capsys.readouterr().err


def test_send_without_a_fixed_port_is_a_config_error(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["send", "-c", str(write_config(tmp_path)), "--chat", "1", "--text", "hi"])

    assert code == 2
    assert "http.listen" in capsys.readouterr().err


def test_send_file_sends_every_good_line_and_reports_bad_ones_by_line_number(
        live: tuple[Served, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    serving, config_path = live
    lines = [json.dumps({"chat_id": n % 50 + 1, "text": f"bulk {n}"}) for n in range(1200)]
    lines[4] = '{"chat_id": 1, "text": '              # line 5: not JSON
    lines[9] = json.dumps({"chat_id": 1, "text": ""})  # line 10: rejected by the relay
    lines[10] = lines[0]                               # line 11: a duplicate of line 1
    lines[700] = ""                                    # a blank line is skipped
    jsonl = tmp_path / "bulk.jsonl"
    jsonl.write_text("\n".join(lines) + "\n", encoding="utf-8")

    code = cli.main(["send", "-c", str(config_path), "--file", str(jsonl)])

    captured = capsys.readouterr()
    assert code == 1
    assert "line 5: not a JSON object" in captured.err
    assert "line 10: rejected: text must not be empty" in captured.err
    assert "1199 of 1199 lines" in captured.out
    assert "1196 accepted, 1 duplicates, 2 rejected" in captured.out
    assert "[########################] 1199/1199" in captured.err
    assert pending(serving) == 1196


def test_send_file_of_good_lines_exits_0_and_applies_the_pool_option(
        live: tuple[Served, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    serving, config_path = live
    jsonl = tmp_path / "ops.jsonl"
    jsonl.write_text("".join(json.dumps({"chat_id": 7, "text": f"ops {n}"}) + "\n" for n in range(3)))

    code = cli.main(["send", "-c", str(config_path), "--file", str(jsonl), "--pool", "ops"])

    assert code == 0
    assert "3 accepted, 0 duplicates, 0 rejected" in capsys.readouterr().out
    assert serving.get("/v1/messages/1").json()["pool"] == "ops"


def test_send_file_that_cannot_be_read_exits_2(live: tuple[Served, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    _, config_path = live

    code = cli.main(["send", "-c", str(config_path), "--file", str(tmp_path / "absent.jsonl")])

    assert code == 2
    assert "cannot read" in capsys.readouterr().err


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_redraws_in_place_on_a_terminal_and_prints_lines_otherwise() -> None:
    now = [0.0]
    terminal, log = Terminal(), io.StringIO()
    bars = [Progress(1000, stream, clock=lambda: now[0]) for stream in (terminal, log)]
    tally = _Tally(accepted=500)

    for bar in bars:
        now[0] = 10.0
        bar.update(500, tally)
        bar.note("line 3: rejected: text must not be empty")
        now[0] = 20.0
        tally.accepted = 1000
        bar.finish(1000, tally)
        tally.accepted = 500

    assert terminal.getvalue().startswith("\r[############............] 500/1000  50%")
    assert "50/s  ETA 10 s" in terminal.getvalue()
    assert "\r" + " " * 10 in terminal.getvalue()  # the bar is wiped before a note
    assert terminal.getvalue().endswith("ETA -\n")
    assert log.getvalue().splitlines()[0].startswith("[############............] 500/1000")
    assert "\r" not in log.getvalue()
    assert len(log.getvalue().splitlines()) == 3


# --- status ---------------------------------------------------------------------------------


def test_status_prints_counts_by_status_and_the_database(
        live: tuple[Served, Path], capsys: pytest.CaptureFixture[str]) -> None:
    serving, config_path = live
    serving.post("/v1/messages/batch", {"messages": [{"chat_id": 1, "text": f"s{n}"} for n in range(4)]})

    code = cli.main(["status", "-c", str(config_path)])

    out = capsys.readouterr().out
    assert code == 0
    assert f"running at {serving.url}" in out
    assert "pending 4  sent 0  confirmed 0  failed 0" in out
    assert "KiB" in out
    assert "integrity check ok at" in out
    assert "tokens: none" in out


def test_status_json_is_one_object_with_stats_and_tokens(
        live: tuple[Served, Path], capsys: pytest.CaptureFixture[str]) -> None:
    serving, config_path = live
    serving.post("/v1/messages", {"chat_id": 1, "text": "one"})

    code = cli.main(["status", "-c", str(config_path), "--json"])

    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["running"] is True
    assert report["stats"]["counts"]["pending"] == 1
    assert report["tokens"] == []


def test_status_when_the_relay_is_not_running_exits_1_and_reads_counts_from_the_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    config = make_config(tmp_path, listen=f"127.0.0.1:{port}")
    config_path = write_config(tmp_path, listen=f"127.0.0.1:{port}")
    with served(config) as serving:
        serving.post("/v1/messages", {"chat_id": 1, "text": "left behind"})

    code = cli.main(["status", "-c", str(config_path)])
    text = capsys.readouterr().out
    json_code = cli.main(["status", "-c", str(config_path), "--json"])
    report = json.loads(capsys.readouterr().out)

    assert (code, json_code) == (1, 1)
    assert "tgrelay is not running" in text
    assert "(read-only): pending 1" in text
    assert report["running"] is False
    assert report["counts"]["pending"] == 1


def test_the_status_table_has_one_row_per_token() -> None:
    stats = {"counts": {"pending": 1, "sent": 2, "confirmed": 30, "failed": 1}, "in_flight": 2,
             "in_doubt": 1, "oldest_pending_age_seconds": 300.0, "delivery_rate": 30 / 31,
             "db_bytes": 5 * 1024 * 1024, "last_integrity_check": {"at": 1_700_000_000, "ok": True},
             "sending": {"delivered_per_second": 12.5}}
    tokens = [
        {"name": "alpha", "pool": "default", "state": "healthy", "weight": 2, "sent": 1234, "failed": 1,
         "rate_limited_until": None},
        {"name": "beta", "pool": "default", "state": "rate_limited", "weight": 1, "sent": 5, "failed": 0,
         "rate_limited_until": 1000.0 + 42},
    ]

    table = render_status("http://127.0.0.1:8780", stats, tokens, now=1000.0)

    assert "delivery rate   96.77% of finished messages confirmed" in table
    assert "oldest pending  5.0 min" in table
    assert "database        5.0 MiB" in table
    assert "sending         delivered per second 12.5" in table
    rows = table.splitlines()
    header = next(row for row in rows if row.startswith("TOKEN"))
    assert header.split() == ["TOKEN", "POOL", "STATE", "WEIGHT", "SENT", "FAILED",
                              "RATE", "LIMITED", "UNTIL"]
    assert any(row.split()[:6] == ["alpha", "default", "healthy", "2", "1,234", "1"] for row in rows)
    assert any(row.startswith("beta") and "(in 42 s)" in row for row in rows)
