"""The token actor's parts: classification of Bot API answers and network errors (against the
real simulator over loopback), getMe, rate limits, health, and keeping the secret out."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from actors.messages import ClaimedMessage
from actors.ratelimit import ChatLimits, Gcra, is_group_chat
from actors.sending_messages import FailureKind
from actors.token import (
    Health,
    TokenSettings,
    check_token,
    classify_response,
    keep_alive_session,
    send_message,
)
from simulator import BAD_GATEWAY_PAGE, BotApiSimulator, make_bots
from tests.helpers_sending import UNLIMITED

BOTS = make_bots(2)
ALPHA, BRAVO = BOTS


@pytest.fixture
def sim() -> Iterator[BotApiSimulator]:
    with BotApiSimulator(bots=BOTS, limits=UNLIMITED, seed=3) as simulator:
        yield simulator


def settings_for(url: str, bot: object = ALPHA, **changes: object) -> TokenSettings:
    return TokenSettings(name="alpha", pool="default", secret=bot.token,  # type: ignore[attr-defined]
                         api_base_url=url, **changes)  # type: ignore[arg-type]


def row(chat_id: int | str = 42, text: str = "hello") -> ClaimedMessage:
    return ClaimedMessage(1, chat_id, text, "default", None, False, 0, "alpha#1", "alpha")


def send(url: str, chat_id: int | str = 42, bot: object = ALPHA, **changes: object) -> object:
    with keep_alive_session(url) as session:
        return send_message(session, settings_for(url, bot, **changes), row(chat_id))


# --- classification of answers ----------------------------------------------------------------


def test_a_delivered_message_answers_telegrams_message_id(sim: BotApiSimulator) -> None:
    outcome = send(sim.url)

    assert outcome == sim.record.deliveries()[0].message_id


def test_a_429_is_rate_limited_with_its_retry_after(sim: BotApiSimulator) -> None:
    sim.flood(ALPHA, seconds=3)

    outcome = send(sim.url)

    assert outcome.kind is FailureKind.RATE_LIMITED  # type: ignore[attr-defined]
    assert outcome.retry_after == 3  # type: ignore[attr-defined]


def test_a_401_means_the_token_is_rejected(sim: BotApiSimulator) -> None:
    sim.revoke(ALPHA)

    outcome = send(sim.url)

    assert outcome.kind is FailureKind.TOKEN_REJECTED  # type: ignore[attr-defined]
    assert outcome.description == "Unauthorized"  # type: ignore[attr-defined]


def test_a_403_means_this_token_cannot_reach_this_chat(sim: BotApiSimulator) -> None:
    sim.block_chat(42, bot=ALPHA)

    assert send(sim.url).kind is FailureKind.UNREACHABLE  # type: ignore[attr-defined]
    assert isinstance(send(sim.url, bot=BRAVO), int)


def test_a_migrated_group_answers_its_new_chat_id(sim: BotApiSimulator) -> None:
    sim.migrate_group(-77, -1_000_000_000_077)

    outcome = send(sim.url, chat_id=-77)

    assert outcome.kind is FailureKind.MIGRATED  # type: ignore[attr-defined]
    assert outcome.migrate_to_chat_id == -1_000_000_000_077  # type: ignore[attr-defined]


def test_any_other_400_is_a_permanent_failure_with_telegrams_description(
        sim: BotApiSimulator) -> None:
    sim.add_missing_chat(404404)

    outcome = send(sim.url, chat_id=404404)

    assert outcome.kind is FailureKind.BAD_REQUEST  # type: ignore[attr-defined]
    assert outcome.description == "Bad Request: chat not found"  # type: ignore[attr-defined]


def test_an_html_502_page_is_a_server_error_to_retry(sim: BotApiSimulator) -> None:
    sim.set_bad_gateway_rate(1.0)

    outcome = send(sim.url)

    assert outcome.kind is FailureKind.SERVER_ERROR  # type: ignore[attr-defined]
    assert outcome.description == "HTTP 502 Bad Gateway (an HTML page)"  # type: ignore[attr-defined]
    assert not outcome.in_doubt  # type: ignore[attr-defined]


def test_classification_reads_the_envelope_not_just_the_status() -> None:
    assert classify_response(502, "Bad Gateway", BAD_GATEWAY_PAGE).kind is FailureKind.SERVER_ERROR  # type: ignore[union-attr]
    assert classify_response(200, "OK", b'{"ok":true,"result":{"message_id":7}}') == 7
    weird = classify_response(200, "OK", b'{"ok":true,"result":true}')
    assert weird.kind is FailureKind.SERVER_ERROR  # type: ignore[union-attr]
    flood = classify_response(429, "Too Many Requests", b'{"ok":false,"error_code":429,'
                              b'"description":"Too Many Requests: retry after 5"}')
    assert flood.retry_after == 1, "no parameters.retry_after: wait at least a second"  # type: ignore[union-attr]


# --- classification of network errors --------------------------------------------------------


def test_a_refused_connection_is_a_connect_failure_that_is_safe_to_retry() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens here once the socket closes

    outcome = send(f"http://127.0.0.1:{port}")

    assert outcome.kind is FailureKind.CONNECT_FAILED  # type: ignore[attr-defined]
    assert not outcome.in_doubt  # type: ignore[attr-defined]


def test_a_reset_after_the_request_left_is_in_doubt(sim: BotApiSimulator) -> None:
    sim.set_reset_rate(1.0)

    outcome = send(sim.url)

    assert outcome.kind is FailureKind.CONNECTION_LOST  # type: ignore[attr-defined]
    assert outcome.in_doubt  # type: ignore[attr-defined]


def test_an_answer_later_than_the_timeout_is_in_doubt_though_it_was_delivered(
        sim: BotApiSimulator) -> None:
    sim.set_accept_then_timeout(1.0, delay_seconds=1.0)

    outcome = send(sim.url, request_timeout=0.2)

    assert outcome.kind is FailureKind.TIMED_OUT  # type: ignore[attr-defined]
    assert outcome.in_doubt  # type: ignore[attr-defined]
    assert sim.record.delivery_count() == 1


def test_no_failure_description_contains_the_secret(sim: BotApiSimulator) -> None:
    sim.set_reset_rate(1.0)
    secret = ALPHA.token.split(":")[1]
    outcomes = [send(sim.url), send("http://127.0.0.1:9"), send(sim.url, request_timeout=0.001)]

    for outcome in outcomes:
        assert secret not in outcome.description  # type: ignore[attr-defined]
    assert secret not in repr(settings_for(sim.url))


# --- getMe ------------------------------------------------------------------------------------


def test_get_me_tells_a_valid_token_from_a_revoked_one_and_from_silence(
        sim: BotApiSimulator) -> None:
    sim.revoke(BRAVO)

    valid = check_token(settings_for(sim.url, ALPHA))
    revoked = check_token(settings_for(sim.url, BRAVO))
    sim.partition(5)
    unknown = check_token(settings_for(sim.url, ALPHA, request_timeout=0.5))

    assert (valid.valid, valid.bot_username, valid.error) == (True, "alpha_bot", None)
    assert (revoked.valid, revoked.error) == (False, "Unauthorized")
    assert unknown.valid is None, "a network failure proves nothing about the token"


def test_a_session_sends_requests_over_one_kept_alive_connection(sim: BotApiSimulator) -> None:
    settings = settings_for(sim.url)
    with keep_alive_session(sim.url) as session:
        for chat in range(5):
            send_message(session, settings, row(chat_id=100 + chat))
        pools = session.get_adapter(sim.url).poolmanager.pools
        opened = [pools[key].num_connections for key in pools.keys()]  # noqa: SIM118

    assert opened == [1]
    assert sim.record.delivery_count() == 5


# --- rate limits ------------------------------------------------------------------------------


def test_the_bot_budget_allows_a_burst_then_paces_at_the_rate() -> None:
    budget = Gcra(rate=10, burst=3)
    now = 100.0
    for _ in range(3):
        assert budget.wait(now) == 0
        budget.consume(now)

    assert budget.wait(now) == pytest.approx(0.1)
    assert budget.wait(now + 0.1) == 0


def test_a_private_chat_waits_a_second_between_sends_and_a_group_twenty_a_minute() -> None:
    limits = ChatLimits(per_second=1, per_minute=20)
    limits.record(42, 10.0)
    for n in range(20):
        assert limits.wait(-42, 10.0 + n) == 0
        limits.record(-42, 10.0 + n)

    assert 1.0 < limits.wait(42, 10.0) < 1.1
    assert limits.wait(42, 11.1) == 0
    assert 60.0 < limits.wait(-42, 30.0) + 20.0 < 61.5, "the 21st waits until the minute is over"
    assert limits.wait(-43, 30.0) == 0, "another group has its own budget"


def test_a_429_blocks_its_chat_until_retry_after() -> None:
    limits = ChatLimits(per_second=1, per_minute=20)
    limits.block(7, until=15.0)

    assert limits.wait(7, 10.0) == 5.0
    assert limits.wait(8, 10.0) == 0


def test_negative_ids_and_channel_names_count_as_groups() -> None:
    assert is_group_chat(-100123)
    assert is_group_chat("@news")
    assert not is_group_chat(42)


# --- health -----------------------------------------------------------------------------------


def test_health_drops_with_errors_and_429s_and_recovers_with_time() -> None:
    health = Health()
    now = 1000.0
    assert health.score(now) == 1.0
    for _ in range(10):
        health.record(False, None, now)
    hurt = health.score(now)
    health.rate_limited(now)

    assert hurt < 0.5
    assert health.score(now) == pytest.approx(hurt / 2, abs=0.01)
    assert health.score(now + 120) > 0.95, "errors fade; a 429 is forgotten after a while"


def test_a_slow_token_scores_lower_than_a_fast_one() -> None:
    fast, slow = Health(), Health()
    for _ in range(20):
        fast.record(True, 0.1, 0.0)
        slow.record(True, 2.0, 0.0)

    assert fast.score(0.0) == 1.0
    assert slow.score(0.0) < 0.5
