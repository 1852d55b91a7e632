"""Hostile input: schemathesis fuzzes a real `tgrelay run` process through its own OpenAPI document.

The relay runs as a subprocess with its sending side on, against the Bot API simulator in this
process, so every endpoint does its real work (``validate`` calls getMe). Schemathesis loads the
description the relay serves at ``/openapi.json`` and, for every operation, sends valid and
invalid requests (its examples, coverage and fuzzing phases) with every built-in check on: no 5xx,
every status and body as documented, valid input accepted, invalid input refused, and requests
without the bearer token refused. On top of that, every rejection must carry a reason, and the
relay must be healthy, and have logged no internal error, once the fuzzing is over.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import given
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode

from simulator import BotApiSimulator, make_bots
from supervision.http_api import MAX_BODY_BYTES, MAX_MESSAGE_BODY_BYTES
from supervision.openapi import NOT_ONLY_WHITESPACE, decimal_above, openapi_document
from supervision.relay import MAX_BATCH
from tests.helpers_http import API_TOKEN, RelayProcess, cli_command, free_port, relay_process

pytestmark = pytest.mark.slow

MAX_EXAMPLES = 300  # per operation; the whole module stays well under a minute
REQUEST_TIMEOUT = 15  # seconds: an answer slower than this counts as a hang
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


@dataclass
class FuzzedRelay:
    process: RelayProcess
    simulator: BotApiSimulator

    @property
    def url(self) -> str:
        return self.process.url


def write_config(directory: Path, simulator: BotApiSimulator) -> Path:
    tokens = {pool: "".join(
        f'[[pools.{pool}.tokens]]\nname = "{bot.username.removesuffix("_bot")}"\n'
        f'token = "{bot.token}"\n' for bot in bots)
        for pool, bots in (("default", simulator.bots[:2]), ("ops", simulator.bots[2:]))}
    path = directory / "tgrelay.toml"
    path.write_text(f'''
[store]
path = "{directory / "relay.db"}"
archive_path = ""
synchronous = "normal"

[telegram]
api_base_url = "{simulator.url}"
request_timeout_seconds = 2

[http]
listen = "127.0.0.1:{free_port()}"
auth_token = "{API_TOKEN}"

[pools.default]
{tokens["default"]}
[pools.ops]
{tokens["ops"]}''', encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def fuzzed_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzedRelay]:
    directory = tmp_path_factory.mktemp("fuzz")
    with BotApiSimulator(bots=make_bots(3), seed=11) as simulator:
        config = write_config(directory, simulator)
        command = cli_command("run", "-c", str(config), "--drain-seconds", "1")
        with relay_process(command, directory / "relay.log") as process:
            yield FuzzedRelay(process, simulator)


def expected_description() -> dict[str, Any]:
    """What the relay of :func:`write_config` must serve (its pools and token names are fixed)."""
    return openapi_document(pools=["default", "ops"], tokens=["alpha", "bravo", "charlie"],
                            authenticated=True, max_batch=MAX_BATCH, max_body_bytes=MAX_BODY_BYTES,
                            max_message_body_bytes=MAX_MESSAGE_BODY_BYTES)


# Loaded at import: schemathesis' lazy loading from a fixture does not work with pytest 9
# (it sets node._nodeid). The first test proves the relay serves exactly this document.
described = schemathesis.openapi.from_dict(expected_description())
described.config.update(headers=AUTH, request_timeout=REQUEST_TIMEOUT)
described.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                                   max_examples=MAX_EXAMPLES, deterministic=True)


def test_the_relay_serves_its_description_only_with_the_bearer_token(fuzzed_relay: FuzzedRelay) -> None:
    anonymous = requests.get(f"{fuzzed_relay.url}/openapi.json", timeout=REQUEST_TIMEOUT)
    served = requests.get(f"{fuzzed_relay.url}/openapi.json", headers=AUTH, timeout=REQUEST_TIMEOUT)

    assert anonymous.status_code == 401 and anonymous.json()["error"]
    assert served.status_code == 200
    document = served.json()
    assert document == expected_description()
    assert document["openapi"].startswith("3.")
    assert set(document["paths"]) == {"/v1/messages", "/v1/messages/batch", "/v1/messages/{id}",
                                      "/v1/tokens", "/v1/tokens/{name}/validate", "/v1/stats",
                                      "/openapi.json", "/healthz"}
    message = document["components"]["schemas"]["Message"]["properties"]
    assert (message["text"]["minLength"], message["text"]["maxLength"]) == (1, 4096)
    assert document["components"]["schemas"]["BatchRequest"]["properties"]["messages"]["maxItems"] == 1000


@described.parametrize()
def test_every_answer_is_documented_and_every_rejection_is_a_4xx_with_a_reason(
        case: Case, fuzzed_relay: FuzzedRelay) -> None:
    response = case.call_and_validate(base_url=fuzzed_relay.url, timeout=REQUEST_TIMEOUT)

    assert response.status_code < 500 or case.path == "/healthz", response.text
    if response.status_code >= 400:
        body = response.json()
        assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], body


def test_the_relay_is_healthy_and_logged_no_internal_error_after_the_fuzzing(fuzzed_relay: FuzzedRelay) -> None:
    health = requests.get(f"{fuzzed_relay.url}/healthz", timeout=REQUEST_TIMEOUT)
    accepted = requests.post(f"{fuzzed_relay.url}/v1/messages", headers=AUTH, timeout=REQUEST_TIMEOUT,
                             json={"chat_id": 4242, "text": "still accepting after the fuzzing"})

    assert (health.status_code, health.json()) == (200, {"ok": True})
    assert accepted.status_code == 202
    assert fuzzed_relay.process.process.poll() is None, "the relay is still running"
    log = fuzzed_relay.process.log()
    assert "unexpected error" not in log and "Traceback" not in log, log[-5000:]
    for bot in fuzzed_relay.simulator.bots:
        assert bot.token.split(":", 1)[1] not in log


# --- the document's hand-written rules match the relay's ---------------------------------------


def test_the_whitespace_class_is_exactly_what_str_strip_removes() -> None:
    pattern = re.compile(NOT_ONLY_WHITESPACE)
    for code in range(0x110000):
        character = chr(code)
        assert bool(pattern.fullmatch(character)) is not character.isspace(), hex(code)


@given(st.integers(min_value=0, max_value=10**19 - 1))
def test_decimal_above_matches_exactly_the_19_digit_decimals_past_the_bound(number: int) -> None:
    text = str(number).zfill(19)
    matched = re.fullmatch(f"(?:{decimal_above(2**63 - 1, 19)})", text) is not None

    assert matched is (number > 2**63 - 1)


def test_a_channel_name_with_a_trailing_newline_is_refused(fuzzed_relay: FuzzedRelay) -> None:
    refused = requests.post(f"{fuzzed_relay.url}/v1/messages", headers=AUTH, timeout=REQUEST_TIMEOUT,
                            json={"chat_id": "@abcd\n", "text": "a newline in a channel name"})

    assert refused.status_code == 400
