"""A message acknowledged is a message kept: SIGKILL the accepting process and look."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from supervision import RelaySystem, parse_config
from tests.conftest import config_text

CHILD = Path(__file__).with_name("crash_child.py")


def run_and_kill(config_path: Path, threads: int, acks_before_kill: int) -> dict[int, str]:
    child = subprocess.Popen(
        [sys.executable, str(CHILD), str(config_path), str(threads)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    acknowledged: dict[int, str] = {}
    deadline = time.monotonic() + 60
    while len(acknowledged) < acks_before_kill and time.monotonic() < deadline:
        line = child.stdout.readline()
        message_id, text = line.split()
        acknowledged[int(message_id)] = text
    os.kill(child.pid, signal.SIGKILL)
    for line in child.stdout:  # acknowledgements already in the pipe count too
        if line.endswith("\n"):
            message_id, text = line.split()
            acknowledged[int(message_id)] = text
    child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL
    return acknowledged


@pytest.mark.slow
@pytest.mark.parametrize("synchronous", ["full", "normal"])
@pytest.mark.parametrize("threads", [1, 8])
def test_every_acknowledged_message_survives_sigkill(tmp_path: Path, synchronous: str, threads: int) -> None:
    config_path = tmp_path / "tgrelay.toml"
    config_path.write_text(config_text(tmp_path, f'synchronous = "{synchronous}"'))
    acknowledged = run_and_kill(config_path, threads, acks_before_kill=1500)
    assert len(acknowledged) >= 1500

    with RelaySystem.start(parse_config(config_path.read_text(), environ={}), send=False) as relay:
        for message_id, text in acknowledged.items():
            assert relay.get(message_id).text == text
        counts = relay.stats()["counts"]
        assert counts["pending"] >= len(acknowledged)
        # after the restart, the same messages are recognised as duplicates, not accepted again
        sample = sorted(acknowledged)[:20]
        for message_id in sample:
            text = acknowledged[message_id]
            worker, index = (int(part[1:]) for part in text.split("-"))
            receipt = relay.send(chat_id=worker * 10_000_000 + index + 1, text=text)
            assert receipt.duplicate and receipt.id == message_id
