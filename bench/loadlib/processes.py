"""The processes a load run drives: the Bot API simulator and the relay, plus their files.

Both run as real subprocesses started with the real command line (``python -m supervision.cli
simulate ...`` and ``... run -c CONFIG``), logging into the run directory. The relay can be
SIGKILLed and started again on the same config, port and database, as an operator would.
The store is read straight from its SQLite file, read-only, after the relay has stopped (or
while an external relay runs: WAL lets a reader in).

Tokens come from :func:`simulator.make_bots`, which derives them from the bot id, so a
simulator started elsewhere with ``--bots N`` knows the same tokens.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apsw
import requests

from simulator import make_bots

from .check import Delivered, StoredRow

REPO = Path(__file__).resolve().parents[2]
LISTENING = re.compile(r"tgrelay listening on (http://\S+)")
DELIVERY_PAGE = 20_000


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class TokenSpec:
    """A pool token: its name in the relay, and the simulator bot behind it."""

    name: str
    bot_id: int
    secret: str


def token_specs(count: int) -> list[TokenSpec]:
    return [TokenSpec(f"t{index}", bot.id, bot.token) for index, bot in enumerate(make_bots(count))]


class SimulatorProcess:
    """``tgrelay simulate`` on a free loopback port, logging to ``run_dir/simulator.log``."""

    def __init__(self, run_dir: Path, bots: int, options: Sequence[str] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = (run_dir / "simulator.log").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "supervision.cli", "simulate", "--port", str(self.port),
             "--bots", str(bots), "--log-level", "WARNING", *options],
            cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(f"{self.url}/_control/stats", timeout=1)
                return
            except requests.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the simulator did not start; see {run_dir / 'simulator.log'}"
                                       ) from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


class SimulatorControl:
    """The simulator's ``/_control`` endpoint."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self._session = requests.Session()

    def post(self, action: str, **arguments: Any) -> Any:
        answer = self._session.post(f"{self.url}/_control/{action}", json=arguments, timeout=30)
        return _result(answer, action)

    def get(self, action: str, **parameters: Any) -> Any:
        answer = self._session.get(f"{self.url}/_control/{action}", params=parameters, timeout=120)
        return _result(answer, action)

    def deliveries(self) -> list[Delivered]:
        """Every delivery the simulator recorded, in pages."""
        found: list[Delivered] = []
        while True:
            page = self.get("deliveries", offset=len(found), limit=DELIVERY_PAGE)["deliveries"]
            found += [Delivered(d["bot_id"], d["chat_id"], d["text"], d["message_id"], d["timestamp"],
                                bool(d.get("answer_delayed"))) for d in page]
            if len(page) < DELIVERY_PAGE:
                return found

    def close(self) -> None:
        self._session.close()


def _result(answer: requests.Response, action: str) -> Any:
    body = answer.json()
    if not body.get("ok"):
        raise RuntimeError(f"simulator control {action}: {body.get('description')}")
    return body["result"]


def write_relay_config(run_dir: Path, *, simulator_url: str, tokens: Sequence[TokenSpec], port: int,
                       token_rate: float, request_timeout: float, synchronous: str,
                       per_chat_per_second: float) -> Path:
    """A config with one pool of ``tokens``, the store in ``run_dir``, the API on ``port``."""
    pool = "".join(f'[[pools.default.tokens]]\nname = "{token.name}"\ntoken = "{token.secret}"\n'
                   f"max_per_second = {token_rate:g}\n\n" for token in tokens)
    path = run_dir / "tgrelay.toml"
    path.write_text(f'''# written by bench/load.py
[store]
path = "{run_dir / "relay.db"}"
archive_path = ""
synchronous = "{synchronous}"

[telegram]
api_base_url = "{simulator_url}"
request_timeout_seconds = {request_timeout:g}
per_chat_per_second = {per_chat_per_second:g}

[http]
listen = "127.0.0.1:{port}"

[pools.default]
{pool}''', encoding="utf-8")
    path.chmod(0o600)  # it holds the (simulated) token secrets
    return path


class RelayProcess:
    """``tgrelay run -c CONFIG``; each start logs to ``run_dir/relay-<n>.log``."""

    def __init__(self, config_path: Path, run_dir: Path, drain_seconds: float = 5.0) -> None:
        self._config_path = config_path
        self._run_dir = run_dir
        self._drain_seconds = drain_seconds
        self.starts = 0
        self.url = ""
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0) -> float:
        """Start and wait for the listening line; returns the seconds that took."""
        self.starts += 1
        log_path = self._run_dir / f"relay-{self.starts}.log"
        began = time.monotonic()
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "supervision.cli", "run", "-c", str(self._config_path),
                 "--drain-seconds", f"{self._drain_seconds:g}"],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        while True:
            match = LISTENING.search(log_path.read_text(encoding="utf-8", errors="replace"))
            if match:
                self.url = match.group(1)
                return time.monotonic() - began
            if self.process.poll() is not None or time.monotonic() - began > timeout:
                raise RuntimeError(f"the relay did not start (exit {self.process.poll()}); see {log_path}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: no drain, no goodbye."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; the exit code (SIGKILL after ``timeout``, then -9)."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


ROW_COLUMNS = ("id, chat_id, message_text, status, last_error, in_doubt_count, retry_count, token, "
               "telegram_message_id, timestamp, updated_at")


def read_store(path: Path) -> list[StoredRow]:
    """Every ``message_store`` row, from the SQLite file opened read-only."""
    db = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        db.setbusytimeout(10_000)
        return [StoredRow(*row) for row in db.execute(f"SELECT {ROW_COLUMNS} FROM message_store")]
    finally:
        db.close()
