"""Helpers for the HTTP API and service command tests: configs, a served relay, relay processes.

Everything is real: a SQLite file in a temporary directory, a waitress server on loopback,
``requests`` calls, and subprocesses stopped with real signals.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from supervision.config import Config, parse_config
from supervision.http_api import HttpApi
from supervision.relay import RelaySystem

REPO = Path(__file__).resolve().parent.parent
API_TOKEN = "api-token-for-tests-0123456789"
ALPHA_SECRET = "123456789:" + "A" * 35
OPS_SECRET = "987654321:" + "B" * 35
SECRETS = (ALPHA_SECRET, OPS_SECRET, API_TOKEN)
LISTENING = re.compile(r"tgrelay listening on (http://\S+)")

# Runs the accepting side only, through the same function `tgrelay run` uses: the sending side
# is optional (RelaySystem.start(send=False)) and not what these tests are about.
ACCEPTING_SIDE_SCRIPT = """
import logging, sys
from supervision.config import load_config
from supervision.redact import install_log_redaction
from supervision.service_commands import serve_until_signalled
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
install_log_redaction()
sys.exit(serve_until_signalled(load_config(sys.argv[1]), drain_seconds=2, send=False))
"""


def config_toml(directory: Path, *, listen: str = "127.0.0.1:0", auth_token: str = API_TOKEN,
                store_extra: str = "", api_base_url: str = "http://127.0.0.1:9") -> str:
    return f'''
[store]
path = "{directory / "relay.db"}"
archive_path = ""
synchronous = "normal"
{store_extra}

[telegram]
api_base_url = "{api_base_url}"

[http]
listen = "{listen}"
auth_token = "{auth_token}"

[pools.default]
[[pools.default.tokens]]
name = "alpha"
token = "{ALPHA_SECRET}"
weight = 2

[pools.ops]
[[pools.ops.tokens]]
name = "ops-bot"
token = "{OPS_SECRET}"
'''


def make_config(directory: Path, **options: Any) -> Config:
    return parse_config(config_toml(directory, **options), environ={})


def write_config(directory: Path, **options: Any) -> Path:
    path = directory / "tgrelay.toml"
    path.write_text(config_toml(directory, **options), encoding="utf-8")
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Served:
    relay: RelaySystem
    api: HttpApi
    session: requests.Session

    @property
    def url(self) -> str:
        return self.api.url

    def post(self, path: str, body: Any = None, **options: Any) -> requests.Response:
        return self.session.post(self.url + path, json=body, timeout=60, **options)

    def get(self, path: str, **options: Any) -> requests.Response:
        return self.session.get(self.url + path, timeout=60, **options)


@contextmanager
def served(config: Config, **api_options: Any) -> Iterator[Served]:
    """A relay (accepting side) and its HTTP API on a free loopback port, with a session."""
    relay = RelaySystem.start(config, send=False)
    try:
        api = HttpApi(relay, config.http, **api_options)
        api.start()
        try:
            with requests.Session() as session:
                if config.http.auth_token:
                    session.headers["Authorization"] = f"Bearer {config.http.auth_token}"
                yield Served(relay, api, session)
        finally:
            api.stop()
    finally:
        relay.stop(0)


@dataclass
class RelayProcess:
    process: subprocess.Popen[bytes]
    log_path: Path
    url: str

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def terminate(self, timeout: float = 20) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


@contextmanager
def relay_process(command: list[str], log_path: Path, timeout: float = 20) -> Iterator[RelayProcess]:
    """Start ``command``, wait for its listening line; SIGKILL it if the test leaves it running."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + timeout
        while True:
            match = LISTENING.search(log_path.read_text(encoding="utf-8", errors="replace"))
            if match:
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the relay did not start (exit {process.poll()}):\n"
                                     + log_path.read_text(encoding="utf-8", errors="replace"))
            time.sleep(0.02)
        yield RelayProcess(process, log_path, match.group(1))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def accepting_side_command(config_path: Path) -> list[str]:
    return [sys.executable, "-c", ACCEPTING_SIDE_SCRIPT, str(config_path)]


def cli_command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "supervision.cli", *arguments]
