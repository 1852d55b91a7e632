"""End to end through a real `tgrelay run` process and the Bot API simulator over HTTP.

The relay runs as a subprocess started with the real command line; the simulator runs in this
test process so the test can read its delivery record and inject faults while messages flow.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from simulator import BotApiSimulator, Limits, Rate, make_bots
from tests.helpers_http import API_TOKEN, cli_command, free_port, relay_process

pytestmark = pytest.mark.slow

BOTS = 3


@pytest.fixture
def simulator() -> Iterator[BotApiSimulator]:
    limits = Limits(per_bot=Rate(300, 1.0), per_private_chat=Rate(1, 1.0), per_group=Rate(20, 60.0))
    with BotApiSimulator(bots=make_bots(BOTS), limits=limits, seed=7) as sim:
        yield sim


def write_config(directory: Path, sim: BotApiSimulator) -> Path:
    tokens = "".join(
        f'[[pools.default.tokens]]\nname = "{bot.username.removesuffix("_bot")}"\n'
        f'token = "{bot.token}"\nmax_per_second = 100\n' for bot in sim.bots)
    path = directory / "tgrelay.toml"
    path.write_text(f'''
[store]
path = "{directory / "relay.db"}"
archive_path = ""

[telegram]
api_base_url = "{sim.url}"
request_timeout_seconds = 2

[http]
listen = "127.0.0.1:{free_port()}"
auth_token = "{API_TOKEN}"

[pools.default]
{tokens}''', encoding="utf-8")
    return path


class Client:
    def __init__(self, url: str) -> None:
        self.url = url
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {API_TOKEN}"

    def post_batch(self, messages: list[dict]) -> list[int]:
        answer = self.session.post(f"{self.url}/v1/messages/batch", json={"messages": messages}, timeout=60)
        answer.raise_for_status()
        return [result["id"] for result in answer.json()["results"]]

    def get(self, path: str) -> dict:
        answer = self.session.get(f"{self.url}{path}", timeout=30)
        answer.raise_for_status()
        return answer.json()

    def wait_until_final(self, expected: int, timeout: float = 90) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            stats = self.get("/v1/stats")
            counts = stats["counts"]
            if counts["confirmed"] + counts["failed"] >= expected:
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"not all messages finished: {counts}")
            time.sleep(0.2)


def messages(count: int, prefix: str = "m") -> list[dict]:
    return [{"chat_id": 1000 + index, "text": f"{prefix} {index}"} for index in range(count)]


def run_relay(config: Path, tmp_path: Path, name: str = "relay.log"):  # type: ignore[no-untyped-def]
    return relay_process(cli_command("run", "-c", str(config), "--drain-seconds", "2"), tmp_path / name)


def assert_each_confirmed_with_the_simulators_message_id(client: Client, sim: BotApiSimulator,
                                                         ids: list[int]) -> None:
    delivered = {(d.chat_id, d.text): d.message_id for d in sim.record.deliveries()}
    for message_id in ids:
        stored = client.get(f"/v1/messages/{message_id}")
        assert stored["status"] == "confirmed", stored
        key = (stored["chat_id"], f"m {stored['chat_id'] - 1000}")
        assert delivered[key] == stored["telegram_message_id"]


def test_every_message_is_delivered_once_and_confirmed_with_telegrams_message_id(
        simulator: BotApiSimulator, tmp_path: Path) -> None:
    config = write_config(tmp_path, simulator)
    with run_relay(config, tmp_path) as relay:
        client = Client(relay.url)
        ids = client.post_batch(messages(300))
        stats = client.wait_until_final(300)
        assert stats["counts"]["confirmed"] == 300
        assert_each_confirmed_with_the_simulators_message_id(client, simulator, ids)
        assert simulator.record.duplicates() == []
        assert relay.terminate() == 0


def test_a_token_revoked_midway_loses_nothing(simulator: BotApiSimulator, tmp_path: Path) -> None:
    config = write_config(tmp_path, simulator)
    simulator.set_latency(20)
    with run_relay(config, tmp_path) as relay:
        client = Client(relay.url)
        ids = client.post_batch(messages(400))
        time.sleep(0.5)
        simulator.revoke(simulator.bots[0])
        stats = client.wait_until_final(400)
        assert stats["counts"] == {"pending": 0, "sent": 0, "confirmed": 400, "failed": 0}
        assert_each_confirmed_with_the_simulators_message_id(client, simulator, ids)
        states = {token["name"]: token["state"] for token in client.get("/v1/tokens")["tokens"]}
        assert states["alpha"] == "revoked"
        assert relay.terminate() == 0


def test_a_relay_killed_midway_delivers_everything_after_restart(simulator: BotApiSimulator, tmp_path: Path) -> None:
    config = write_config(tmp_path, simulator)
    simulator.set_latency(30)
    with run_relay(config, tmp_path, "first.log") as relay:
        client = Client(relay.url)
        ids = client.post_batch(messages(400))
        deadline = time.monotonic() + 30
        while client.get("/v1/stats")["counts"]["confirmed"] < 100 and time.monotonic() < deadline:
            time.sleep(0.05)
        relay.process.kill()
        relay.process.wait()
    assert len(simulator.record.deliveries()) < 400, "the kill happened while messages were in flight"
    with run_relay(config, tmp_path, "second.log") as relay:
        client = Client(relay.url)
        stats = client.wait_until_final(400)
        assert stats["counts"]["confirmed"] == 400
        assert_each_confirmed_with_the_simulators_message_id(client, simulator, ids)
        resent = sum(duplicate.count - 1 for duplicate in simulator.record.duplicates())
        assert resent <= stats["in_doubt"], "only sends in doubt at the kill may repeat"
        assert relay.terminate() == 0


def test_no_token_secret_reaches_a_log_an_answer_the_status_or_the_database(
        simulator: BotApiSimulator, tmp_path: Path) -> None:
    config = write_config(tmp_path, simulator)
    simulator.set_bad_gateway_rate(0.2)
    simulator.set_reset_rate(0.05)
    answers = []
    with run_relay(config, tmp_path) as relay:
        client = Client(relay.url)
        ids = client.post_batch(messages(100))
        simulator.revoke(simulator.bots[1])
        client.wait_until_final(100)
        for path in ("/v1/stats", "/v1/tokens", *(f"/v1/messages/{i}" for i in ids[:20])):
            answers.append(client.session.get(f"{relay.url}{path}", timeout=30).text)
        answers.append(client.session.post(f"{relay.url}/v1/tokens/bravo/validate", timeout=30).text)
        status = subprocess.run(cli_command("status", "-c", str(config)), capture_output=True, text=True,
                                timeout=60, check=False)
        answers += [status.stdout, status.stderr]
        assert relay.terminate() == 0
        answers.append(relay.log())
    database = b"".join(path.read_bytes() for path in tmp_path.glob("relay.db*"))
    for bot in simulator.bots:
        secret = bot.token.split(":", 1)[1]
        for text in answers:
            assert secret not in text
        assert secret.encode() not in database
