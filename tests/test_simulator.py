"""The Bot API simulator behaves like Telegram: real sockets on loopback, real requests."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from simulator import (
    BAD_GATEWAY_PAGE,
    BotApiSimulator,
    FaultSet,
    Limits,
    Rate,
    SimBot,
    bot_id_of,
    channel_id_for,
    make_bots,
    make_token,
)
from simulator.limits import RateLimiter

ROOT = Path(__file__).resolve().parent.parent
BOTS = make_bots(3)
ALPHA, BRAVO, CHARLIE = BOTS
UNLIMITED = Limits(per_bot=Rate(10_000, 1.0), per_private_chat=Rate(10_000, 1.0), per_group=Rate(10_000, 1.0))


@pytest.fixture
def sim() -> Iterator[BotApiSimulator]:
    with BotApiSimulator(bots=BOTS, limits=UNLIMITED, seed=7) as simulator:
        yield simulator


@pytest.fixture
def session() -> Iterator[requests.Session]:
    with requests.Session() as http:
        yield http


def call(
    sim: BotApiSimulator,
    method: str,
    bot: SimBot = ALPHA,
    http: requests.Session | None = None,
    timeout: float = 5.0,
    **params: Any,
) -> requests.Response:
    client = http or requests
    return client.post(f"{sim.url}/bot{bot.token}/{method}", json=params, timeout=timeout)


def send(sim: BotApiSimulator, chat_id: int | str, text: str = "hello", **kw: Any) -> Any:
    return call(sim, "sendMessage", chat_id=chat_id, text=text, **kw)


def control(sim: BotApiSimulator, action: str, **body: Any) -> requests.Response:
    return requests.post(f"{sim.url}/_control/{action}", json=body, timeout=5)


def assert_error(response: requests.Response, code: int, description: str) -> dict[str, Any]:
    body = response.json()
    assert response.status_code == code
    assert body["ok"] is False
    assert body["error_code"] == code
    assert body["description"] == description
    return body


# -- envelopes and methods -------------------------------------------------------------------


def test_get_me_answers_the_bot_user_in_an_ok_envelope(sim: BotApiSimulator) -> None:
    response = call(sim, "getMe")

    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert body["ok"] is True
    assert body["result"]["id"] == ALPHA.id
    assert body["result"]["is_bot"] is True
    assert body["result"]["username"] == "alpha_bot"
    assert body["result"]["first_name"] == "Alpha"


def test_send_message_answers_a_message_object(sim: BotApiSimulator) -> None:
    before = int(time.time())

    result = send(sim, 42, "hello there").json()["result"]

    assert result["message_id"] == 1
    assert before <= result["date"] <= time.time()
    assert result["chat"] == {"id": 42, "first_name": "User 42", "type": "private"}
    assert result["from"] == {
        "id": ALPHA.id,
        "is_bot": True,
        "first_name": "Alpha",
        "username": "alpha_bot",
    }
    assert result["text"] == "hello there"


def test_message_ids_increase_per_chat(sim: BotApiSimulator) -> None:
    ids = [send(sim, 42, f"m{i}").json()["result"]["message_id"] for i in range(3)]
    other = send(sim, 43).json()["result"]["message_id"]
    from_another_bot = call(sim, "sendMessage", BRAVO, chat_id=42, text="x").json()

    assert ids == [1, 2, 3]
    assert other == 1
    assert from_another_bot["result"]["message_id"] == 4


def test_send_message_accepts_a_form_encoded_body(sim: BotApiSimulator) -> None:
    response = requests.post(
        f"{sim.url}/bot{ALPHA.token}/sendMessage", data={"chat_id": "42", "text": "form"}
    )

    assert response.status_code == 200
    assert response.json()["result"]["text"] == "form"
    assert response.json()["result"]["chat"]["id"] == 42


def test_send_message_accepts_query_parameters_on_get(sim: BotApiSimulator) -> None:
    response = requests.get(
        f"{sim.url}/bot{ALPHA.token}/sendMessage", params={"chat_id": "-5", "text": "query"}
    )

    assert response.status_code == 200
    assert response.json()["result"]["chat"]["type"] == "group"


def test_send_message_accepts_a_multipart_body(sim: BotApiSimulator) -> None:
    response = requests.post(
        f"{sim.url}/bot{ALPHA.token}/sendMessage",
        files={"chat_id": (None, "42"), "text": (None, "multipart ✓")},
    )

    assert response.status_code == 200
    assert response.json()["result"]["text"] == "multipart ✓"


def test_send_message_reads_a_chunked_body(sim: BotApiSimulator) -> None:
    chunks = iter([b'{"chat_id": 42, ', b'"text": "chunked"}'])

    response = requests.post(
        f"{sim.url}/bot{ALPHA.token}/sendMessage",
        data=chunks,
        headers={"Content-Type": "application/json"},
    )

    assert response.status_code == 200
    assert response.json()["result"]["text"] == "chunked"


def test_method_names_are_case_insensitive(sim: BotApiSimulator) -> None:
    assert call(sim, "getme").status_code == 200
    assert call(sim, "SENDMESSAGE", chat_id=1, text="x").status_code == 200


def test_unknown_token_gets_401_unauthorized(sim: BotApiSimulator) -> None:
    stranger = SimBot(token=make_token(999), username="stranger_bot")

    assert_error(call(sim, "getMe", stranger), 401, "Unauthorized")
    assert_error(call(sim, "sendMessage", stranger, chat_id=1, text="x"), 401, "Unauthorized")


def test_malformed_token_path_gets_404_not_found(sim: BotApiSimulator) -> None:
    for path in ("/bot123:short/getMe", f"/bot{ALPHA.token}x/getMe", "/bot/getMe", "/"):
        assert_error(requests.get(sim.url + path), 404, "Not Found")


def test_unknown_method_gets_404_not_found(sim: BotApiSimulator) -> None:
    assert_error(call(sim, "getUpdatesPlease"), 404, "Not Found")


def test_an_unparsable_json_body_is_a_bad_request(sim: BotApiSimulator) -> None:
    response = requests.post(
        f"{sim.url}/bot{ALPHA.token}/sendMessage",
        data=b"{not json",
        headers={"Content-Type": "application/json"},
    )

    assert_error(response, 400, "Bad Request: can't parse JSON object")


# -- chats -----------------------------------------------------------------------------------


def test_chat_type_follows_telegram_id_ranges(sim: BotApiSimulator) -> None:
    def chat_of(chat_id: int | str) -> dict[str, Any]:
        return send(sim, chat_id).json()["result"]["chat"]

    assert chat_of(42)["type"] == "private"
    assert chat_of(-42)["type"] == "group"
    assert chat_of(-1001234567890)["type"] == "supergroup"
    channel = chat_of("@news_channel")
    assert channel["type"] == "channel"
    assert channel["id"] == channel_id_for("news_channel")
    assert channel["username"] == "news_channel"


def test_channel_posts_carry_sender_chat_instead_of_from(sim: BotApiSimulator) -> None:
    result = send(sim, "@news_channel").json()["result"]

    assert "from" not in result
    assert result["sender_chat"] == result["chat"]


def test_user_who_blocked_the_bot_gets_403_forbidden() -> None:
    blocked = SimBot(token=make_token(501), username="blocked_bot", blocked_by=frozenset({42}))
    with BotApiSimulator(bots=[blocked, BRAVO]) as sim:
        assert_error(
            call(sim, "sendMessage", blocked, chat_id=42, text="x"),
            403,
            "Forbidden: bot was blocked by the user",
        )
        assert call(sim, "sendMessage", BRAVO, chat_id=42, text="x").status_code == 200


def test_group_that_kicked_the_bot_gets_403_with_telegrams_reason(sim: BotApiSimulator) -> None:
    sim.block_chat(-42, bot=ALPHA)
    sim.block_chat(-1001234567890)

    assert_error(send(sim, -42), 403, "Forbidden: bot was kicked from the group chat")
    assert_error(send(sim, -1001234567890), 403, "Forbidden: bot was kicked from the supergroup chat")
    assert call(sim, "sendMessage", BRAVO, chat_id=-42, text="x").status_code == 200


def test_chat_that_does_not_exist_gets_400_chat_not_found() -> None:
    with BotApiSimulator(bots=BOTS, missing_chats=[404, "@gone_channel"]) as sim:
        assert_error(send(sim, 404), 400, "Bad Request: chat not found")
        assert_error(send(sim, "@gone_channel"), 400, "Bad Request: chat not found")
        assert_error(send(sim, "not a chat"), 400, "Bad Request: chat not found")


def test_migrated_group_gets_400_with_migrate_to_chat_id() -> None:
    with BotApiSimulator(bots=BOTS, migrated_groups={-42: -1009876543210}) as sim:
        body = assert_error(send(sim, -42), 400, "Bad Request: group chat was upgraded to a supergroup chat")
        assert body["parameters"] == {"migrate_to_chat_id": -1009876543210}

        resent = send(sim, body["parameters"]["migrate_to_chat_id"])

        assert resent.status_code == 200
        assert resent.json()["result"]["chat"]["type"] == "supergroup"


def test_text_over_4096_code_points_is_too_long(sim: BotApiSimulator) -> None:
    assert send(sim, 42, "é" * 4096).status_code == 200
    assert send(sim, 43, "😀" * 4096).status_code == 200
    assert_error(send(sim, 44, "é" * 4097), 400, "Bad Request: message is too long")


def test_empty_text_is_rejected(sim: BotApiSimulator) -> None:
    assert_error(send(sim, 42, ""), 400, "Bad Request: message text is empty")
    assert_error(send(sim, 42, "  \n "), 400, "Bad Request: message text is empty")
    assert_error(call(sim, "sendMessage", chat_id=42), 400, "Bad Request: message text is empty")


def test_missing_chat_id_is_rejected(sim: BotApiSimulator) -> None:
    assert_error(call(sim, "sendMessage", text="x"), 400, "Bad Request: chat_id is empty")
    assert_error(send(sim, ""), 400, "Bad Request: chat_id is empty")


def test_unsupported_parse_mode_is_rejected(sim: BotApiSimulator) -> None:
    assert send(sim, 42, "<b>x</b>", parse_mode="HTML").status_code == 200
    assert_error(send(sim, 43, "x", parse_mode="BBCode"), 400, "Bad Request: unsupported parse_mode")


def test_rejected_sends_are_not_delivered(sim: BotApiSimulator) -> None:
    sim.add_missing_chat(404)
    send(sim, 404)
    send(sim, 42, "")

    assert sim.record.delivery_count() == 0


# -- HTTP/1.1 ----------------------------------------------------------------------------------


def test_one_keep_alive_connection_serves_many_requests(
    sim: BotApiSimulator, session: requests.Session
) -> None:
    for index in range(20):
        response = call(sim, "sendMessage", http=session, chat_id=index + 1, text="x")
        assert response.headers["Connection"] == "keep-alive"
        assert int(response.headers["Content-Length"]) == len(response.content)
    stranger = SimBot(token=make_token(9), username="stranger_bot")
    assert call(sim, "getMe", stranger, http=session).status_code == 401
    assert call(sim, "sendMessage", http=session, chat_id=1, text="").status_code == 400

    assert sim.connections_accepted == 1


def test_http_1_0_client_gets_its_answer_and_then_the_connection_closes(
    sim: BotApiSimulator,
) -> None:
    with socket.create_connection((sim.host, sim.port), timeout=5) as raw:
        raw.sendall(f"GET /bot{ALPHA.token}/getMe HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        answer = b""
        while chunk := raw.recv(65536):
            answer += chunk

    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"Connection: close" in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert json.loads(body)["result"]["id"] == ALPHA.id


def test_pipelined_requests_on_one_connection_are_answered_in_order(sim: BotApiSimulator) -> None:
    requests_text = "".join(
        f"GET /bot{ALPHA.token}/sendMessage?chat_id=42&text=n{index} HTTP/1.1\r\nHost: x\r\n\r\n"
        for index in range(3)
    )
    with socket.create_connection((sim.host, sim.port), timeout=5) as raw:
        raw.sendall(requests_text.encode())
        reader = raw.makefile("rb")
        texts = []
        for _ in range(3):
            length = 0
            while (line := reader.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            texts.append(json.loads(reader.read(length))["result"]["text"])

    assert texts == ["n0", "n1", "n2"]


def test_concurrent_sends_to_one_chat_get_distinct_message_ids(sim: BotApiSimulator) -> None:
    ids: list[int] = []

    def worker() -> None:
        with requests.Session() as http:
            for _ in range(25):
                response = call(sim, "sendMessage", http=http, chat_id=-77, text="x")
                ids.append(response.json()["result"]["message_id"])

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(ids) == list(range(1, 201))


def test_stop_cuts_open_keep_alive_connections(session: requests.Session) -> None:
    sim = BotApiSimulator(bots=BOTS).start()
    assert call(sim, "getMe", http=session).status_code == 200
    url = sim.url

    sim.stop()

    with pytest.raises(requests.ConnectionError):
        session.post(f"{url}/bot{ALPHA.token}/getMe", timeout=2)


# -- rate limits -----------------------------------------------------------------------------


def test_second_message_within_a_second_to_a_private_chat_gets_429() -> None:
    with BotApiSimulator(bots=BOTS) as sim:
        assert send(sim, 42).status_code == 200

        body = assert_error(send(sim, 42), 429, "Too Many Requests: retry after 1")

        assert body["parameters"] == {"retry_after": 1}
        assert send(sim, 43).status_code == 200


def test_group_limit_allows_a_burst_then_answers_429_with_retry_after() -> None:
    limits = Limits(per_group=Rate(3, 60.0))
    with BotApiSimulator(bots=BOTS, limits=limits) as sim:
        assert [send(sim, -42).status_code for _ in range(3)] == [200, 200, 200]

        body = send(sim, -42).json()

        assert body["error_code"] == 429
        assert body["parameters"]["retry_after"] == 20
        assert body["description"] == "Too Many Requests: retry after 20"
        assert call(sim, "sendMessage", BRAVO, chat_id=-42, text="x").status_code == 200


def test_per_bot_limit_answers_429_across_chats() -> None:
    limits = Limits(per_bot=Rate(5, 60.0))
    with BotApiSimulator(bots=BOTS, limits=limits) as sim:
        statuses = [send(sim, chat_id).status_code for chat_id in range(1, 7)]

        assert statuses == [200] * 5 + [429]
        assert call(sim, "sendMessage", BRAVO, chat_id=99, text="x").status_code == 200


def test_client_that_waits_retry_after_is_served() -> None:
    with BotApiSimulator(bots=BOTS) as sim:
        send(sim, 42)
        retry_after = send(sim, 42).json()["parameters"]["retry_after"]

        time.sleep(retry_after)

        assert send(sim, 42).status_code == 200


def test_client_pacing_at_the_limit_is_never_rate_limited(session: requests.Session) -> None:
    limits = Limits(per_private_chat=Rate(10, 0.1), per_bot=Rate(10_000, 1.0))
    with BotApiSimulator(bots=BOTS, limits=limits) as sim:
        statuses = []
        next_send = time.monotonic()
        for index in range(60):
            delay = next_send - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            next_send = time.monotonic() + 0.01
            response = call(sim, "sendMessage", http=session, chat_id=42, text=str(index))
            statuses.append(response.status_code)

        assert statuses == [200] * 60


@settings(max_examples=200, deadline=None)
@given(gaps=st.lists(st.floats(min_value=0.0, max_value=0.7), min_size=1, max_size=60))
def test_any_schedule_within_n_per_window_is_accepted(gaps: list[float]) -> None:
    window, limit = 1.0, 4
    times: list[float] = []
    accepted: list[float] = []
    now = 0.0
    for gap in gaps:
        now += gap
        times.append(now)
    for moment in times:
        if sum(1 for earlier in accepted if earlier > moment - window) < limit:
            accepted.append(moment)
    clock = iter(accepted)
    limiter = RateLimiter(
        Limits(per_bot=Rate(limit, window), per_private_chat=Rate(limit, window)),
        clock=lambda: next(clock),
    )

    assert [limiter.acquire(1, 42, is_group=False) for _ in accepted] == [None] * len(accepted)


def test_failed_and_rejected_sends_use_no_rate_budget() -> None:
    limits = Limits(per_private_chat=Rate(1, 60.0))
    with BotApiSimulator(bots=BOTS, limits=limits, missing_chats=[404]) as sim:
        send(sim, 404)
        send(sim, 42, "")

        assert send(sim, 42).status_code == 200
        assert send(sim, 42).status_code == 429
        assert send(sim, 42).status_code == 429


def test_limits_are_not_enforced_when_disabled() -> None:
    with BotApiSimulator(bots=BOTS, enforce_limits=False) as sim:
        assert [send(sim, 42).status_code for _ in range(5)] == [200] * 5


# -- faults ----------------------------------------------------------------------------------


def test_bad_gateway_fault_answers_nginx_html_502(sim: BotApiSimulator) -> None:
    sim.set_bad_gateway_rate(1.0)

    response = send(sim, 42)

    assert response.status_code == 502
    assert response.headers["Content-Type"] == "text/html"
    assert response.content == BAD_GATEWAY_PAGE
    assert "<title>502 Bad Gateway</title>" in response.text
    assert sim.record.delivery_count() == 0


def test_a_fraction_of_requests_get_bad_gateway() -> None:
    with BotApiSimulator(bots=BOTS, limits=UNLIMITED, seed=1) as sim:
        sim.set_bad_gateway_rate(0.5)
        with requests.Session() as http:
            statuses = [call(sim, "getMe", http=http).status_code for _ in range(100)]

    assert 25 < statuses.count(502) < 75
    assert statuses.count(502) + statuses.count(200) == 100


def test_reset_fault_makes_requests_raise_connection_error(
    sim: BotApiSimulator, session: requests.Session
) -> None:
    assert call(sim, "getMe", http=session).status_code == 200
    sim.set_reset_rate(1.0)

    with pytest.raises(requests.ConnectionError):
        call(sim, "sendMessage", http=session, chat_id=42, text="x")

    assert sim.record.delivery_count() == 0
    assert sim.record.calls(method="sendMessage")[0].status is None
    sim.set_reset_rate(0.0)
    assert call(sim, "getMe", http=session).status_code == 200


def test_partition_resets_every_request_until_it_heals(sim: BotApiSimulator) -> None:
    healed_at = time.monotonic() + 0.5
    sim.partition(0.5)

    with pytest.raises(requests.ConnectionError):
        call(sim, "getMe")
    with pytest.raises(requests.ConnectionError):
        send(sim, 42)
    time.sleep(max(0.0, healed_at - time.monotonic()) + 0.05)

    assert call(sim, "getMe").status_code == 200


def test_partition_of_one_bot_spares_the_others(sim: BotApiSimulator) -> None:
    sim.partition(30, bot=ALPHA)

    with pytest.raises(requests.ConnectionError):
        call(sim, "getMe", ALPHA)
    assert call(sim, "getMe", BRAVO).status_code == 200

    sim.partition(0, bot=ALPHA)
    assert call(sim, "getMe", ALPHA).status_code == 200


def test_revoked_token_gets_401_on_every_method_until_unrevoked(sim: BotApiSimulator) -> None:
    sim.revoke(ALPHA)

    assert_error(call(sim, "getMe"), 401, "Unauthorized")
    assert_error(send(sim, 42), 401, "Unauthorized")
    assert call(sim, "getMe", BRAVO).status_code == 200

    sim.unrevoke(ALPHA.token)
    assert call(sim, "getMe").status_code == 200


def test_bot_created_revoked_answers_401_from_the_start() -> None:
    revoked = SimBot(token=make_token(77), username="old_bot", revoked=True)
    with BotApiSimulator(bots=[revoked]) as sim:
        assert call(sim, "getMe", revoked).status_code == 401
        sim.clear_faults()
        assert call(sim, "getMe", revoked).status_code == 401


def test_flood_answers_every_call_of_that_token_with_429_until_it_ends(
    sim: BotApiSimulator,
) -> None:
    sim.flood(ALPHA, seconds=2.9)

    first = assert_error(send(sim, 42), 429, "Too Many Requests: retry after 3")
    assert first["parameters"] == {"retry_after": 3}
    assert call(sim, "getMe").status_code == 429
    assert send(sim, 43, bot=BRAVO).status_code == 200

    sim.flood(ALPHA, seconds=0.2, retry_after=7)
    assert send(sim, 42).json()["parameters"]["retry_after"] == 7
    time.sleep(0.25)
    assert send(sim, 42).status_code == 200


def test_accept_then_timeout_delivers_yet_the_client_times_out(sim: BotApiSimulator) -> None:
    sim.set_accept_then_timeout(1.0, delay_seconds=2.0)

    with pytest.raises(requests.ReadTimeout):
        send(sim, 42, "in doubt", timeout=0.3)

    (delivery,) = sim.record.deliveries()
    assert delivery.text == "in doubt"
    assert delivery.answer_delayed is True
    assert sim.record.calls()[0].fault == "accept_then_timeout"


def test_latency_fault_delays_every_answer(sim: BotApiSimulator) -> None:
    sim.set_latency(150, jitter_ms=50)

    started = time.monotonic()
    assert call(sim, "getMe").status_code == 200
    elapsed = time.monotonic() - started

    assert 0.15 <= elapsed < 1.0


def test_faults_scoped_to_one_bot_spare_the_others(sim: BotApiSimulator) -> None:
    sim.set_bad_gateway_rate(1.0, bot="@alpha_bot")

    assert call(sim, "getMe", ALPHA).status_code == 502
    assert call(sim, "getMe", BRAVO).status_code == 200


def test_control_endpoint_injects_and_clears_faults(sim: BotApiSimulator) -> None:
    assert control(sim, "bad_gateway", rate=1.0, bot=ALPHA.id).json() == {
        "ok": True,
        "result": True,
    }
    assert call(sim, "getMe").status_code == 502
    assert control(sim, "clear_faults").status_code == 200
    assert call(sim, "getMe").status_code == 200

    control(sim, "revoke", token=ALPHA.token)
    assert call(sim, "getMe").status_code == 401
    control(sim, "unrevoke", bot="alpha_bot")
    assert call(sim, "getMe").status_code == 200

    control(sim, "flood", bot=BRAVO.id, seconds=30, retry_after=5)
    assert send(sim, 1, bot=BRAVO).json()["parameters"]["retry_after"] == 5

    control(sim, "migrate_group", group_id=-42, supergroup_id=-1001111111111)
    assert send(sim, -42).json()["parameters"]["migrate_to_chat_id"] == -1001111111111


def test_control_endpoint_drives_every_fault(sim: BotApiSimulator) -> None:
    control(sim, "latency", ms=100)
    started = time.monotonic()
    call(sim, "getMe")
    assert time.monotonic() - started >= 0.1
    control(sim, "latency", ms=0)

    control(sim, "reset_connections", rate=1.0, bot=ALPHA.id)
    with pytest.raises(requests.ConnectionError):
        call(sim, "getMe")
    control(sim, "reset_connections", rate=0.0, bot=ALPHA.id)

    control(sim, "partition", seconds=30)
    with pytest.raises(requests.ConnectionError):
        call(sim, "getMe", BRAVO)
    control(sim, "partition", seconds=0)

    control(sim, "accept_then_timeout", rate=1.0, delay_seconds=2)
    with pytest.raises(requests.ReadTimeout):
        send(sim, 42, timeout=0.3)
    control(sim, "accept_then_timeout", rate=0.0, delay_seconds=0)

    control(sim, "block_chat", chat_id=42)
    assert send(sim, 42).status_code == 403
    control(sim, "unblock_chat", chat_id=42)
    control(sim, "missing_chat", chat_id="@lost_channel")
    assert send(sim, "@lost_channel").status_code == 400
    control(sim, "found_chat", chat_id="@lost_channel")
    assert send(sim, "@lost_channel").status_code == 200


def test_control_endpoint_changes_limits(sim: BotApiSimulator) -> None:
    answer = control(sim, "limits", per_private_chat=[1, 1.0]).json()

    assert answer["result"]["per_private_chat"] == [1, 1.0]
    assert send(sim, 42).status_code == 200
    assert send(sim, 42).status_code == 429
    control(sim, "limits", enforce=False)
    assert send(sim, 42).status_code == 200


def test_control_endpoint_rejects_unknown_actions_and_bad_arguments(sim: BotApiSimulator) -> None:
    assert control(sim, "meteor_strike").status_code == 404
    assert control(sim, "bad_gateway", rate="lots").status_code == 400
    assert control(sim, "bad_gateway", rate=2.0).status_code == 400
    assert control(sim, "revoke").status_code == 400
    assert control(sim, "revoke", bot="nobody_bot").status_code == 400
    assert control(sim, "revoke", bot=123456).status_code == 400


def test_control_reset_clears_faults_record_and_budgets() -> None:
    with BotApiSimulator(bots=BOTS) as sim:
        send(sim, 42)
        sim.revoke(BRAVO)
        sim.set_bad_gateway_rate(1.0, bot=CHARLIE)
        sim.block_chat(43)

        assert control(sim, "reset").status_code == 200

        assert sim.record.delivery_count() == 0
        assert sim.record.calls() == []
        assert send(sim, 42).status_code == 200
        assert send(sim, 43).status_code == 200
        assert call(sim, "getMe", BRAVO).status_code == 200
        assert call(sim, "getMe", CHARLIE).status_code == 200


def test_faults_given_to_the_constructor_apply_from_the_start() -> None:
    with BotApiSimulator(bots=BOTS, faults=FaultSet(bad_gateway_rate=1.0)) as sim:
        assert call(sim, "getMe").status_code == 502
        sim.clear_faults()
        assert call(sim, "getMe").status_code == 502
        sim.set_bad_gateway_rate(0.0)
        assert call(sim, "getMe").status_code == 200


# -- the record ------------------------------------------------------------------------------


def test_record_keeps_every_delivered_message(sim: BotApiSimulator) -> None:
    send(sim, 42, "one")
    call(sim, "sendMessage", BRAVO, chat_id="@news_channel", text="two")

    first, second = sim.record.deliveries()

    assert (first.bot_id, first.bot_username, first.chat_id, first.text, first.message_id) == (
        ALPHA.id,
        "alpha_bot",
        42,
        "one",
        1,
    )
    assert second.chat_id == channel_id_for("news_channel")
    assert second.chat_ref == "@news_channel"
    assert sim.record.delivery_count(bot_id=BRAVO.id) == 1
    assert sim.record.delivered_texts(chat_id=42) == ["one"]


def test_duplicates_are_the_same_text_delivered_twice_to_one_chat(sim: BotApiSimulator) -> None:
    send(sim, 42, "once")
    send(sim, 42, "twice")
    call(sim, "sendMessage", BRAVO, chat_id=42, text="twice")
    send(sim, 43, "once")

    (duplicate,) = sim.record.duplicates()

    assert (duplicate.chat_id, duplicate.text, duplicate.count) == (42, "twice", 2)
    assert [d.bot_id for d in duplicate.deliveries] == [ALPHA.id, BRAVO.id]


def test_deliveries_endpoint_lists_messages_and_duplicates_without_tokens(
    sim: BotApiSimulator,
) -> None:
    send(sim, 42, "a")
    send(sim, 42, "a")
    send(sim, 43, "b", bot=BRAVO)

    response = requests.get(f"{sim.url}/_control/deliveries", timeout=5)
    only_bravo = requests.get(f"{sim.url}/_control/deliveries?bot={BRAVO.id}", timeout=5)
    page = requests.get(f"{sim.url}/_control/deliveries?offset=1&limit=1", timeout=5)

    result = response.json()["result"]
    assert result["count"] == 3
    assert [d["text"] for d in result["deliveries"]] == ["a", "a", "b"]
    assert result["deliveries"][0]["bot_username"] == "alpha_bot"
    assert result["duplicates"] == [
        {"chat_id": 42, "text": "a", "count": 2, "message_ids": [1, 2], "bot_ids": [ALPHA.id] * 2}
    ]
    assert [d["text"] for d in only_bravo.json()["result"]["deliveries"]] == ["b"]
    assert page.json()["result"]["deliveries"][0]["message_id"] == 2
    for bot in BOTS:
        assert bot.token.split(":")[1] not in response.text


def test_record_counts_calls_and_429s_per_bot_with_their_times() -> None:
    with BotApiSimulator(bots=BOTS) as sim:
        started = time.monotonic()
        send(sim, 42)
        send(sim, 42)
        call(sim, "getMe", BRAVO)

        assert sim.record.call_counts() == {ALPHA.id: 2, BRAVO.id: 1}
        assert sim.record.rate_limited_counts() == {ALPHA.id: 1}
        times = sim.record.call_times(ALPHA.id)
        assert len(times) == 2
        assert started <= times[0] <= times[1] <= time.monotonic()
        stats = requests.get(f"{sim.url}/_control/stats", timeout=5).json()["result"]
        assert stats["bots"][str(ALPHA.id)]["rate_limited"] == 1
        assert stats["bots"][str(ALPHA.id)]["by_status"] == {"200": 1, "429": 1}


def test_retry_after_violations_name_calls_made_before_it_expired(sim: BotApiSimulator) -> None:
    sim.flood(ALPHA, seconds=30, retry_after=1)
    send(sim, 42)
    too_early = send(sim, 43)
    assert too_early.status_code == 429

    violations = sim.record.retry_after_violations()

    assert [call.chat_id for call in violations] == [43]
    assert sim.record.retry_after_violations(per_chat=True) == []
    assert sim.record.retry_after_violations(grace=5.0) == []


def test_calls_endpoint_lists_calls_by_bot(sim: BotApiSimulator) -> None:
    send(sim, 42)
    call(sim, "getMe", BRAVO)

    calls = requests.get(f"{sim.url}/_control/calls?bot={BRAVO.id}", timeout=5).json()
    assert [c["method"] for c in calls["result"]["calls"]] == ["getMe"]


# -- secrets and tokens ----------------------------------------------------------------------


def test_make_token_is_deterministic_and_telegram_shaped() -> None:
    token = make_token(123456)

    assert token == make_token(123456)
    assert token != make_token(123457)
    assert re.fullmatch(r"123456:[A-Za-z0-9_-]{35}", token)
    assert bot_id_of(token) == 123456


def test_a_malformed_token_is_refused_for_a_bot() -> None:
    with pytest.raises(ValueError, match="malformed"):
        SimBot(token="123:short", username="x_bot")


def test_tokens_never_reach_logs_reprs_or_the_record(
    sim: BotApiSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sim.set_bad_gateway_rate(0.3)
    for index in range(10):
        send(sim, index + 1)
    call(sim, "getMe", SimBot(token=make_token(5), username="stranger_bot"))
    sim.revoke(ALPHA.token)
    dump = json.dumps(
        [
            sim.statistics(),
            [c.to_json() for c in sim.record.calls()],
            [d.to_json() for d in sim.record.deliveries()],
            repr(BOTS),
        ]
    )

    our_logs = "\n".join(
        record.getMessage() for record in caplog.records if record.name.startswith("simulator")
    )

    assert "bot 7000000001 sendMessage" in our_logs
    for secret in [bot.token.split(":")[1] for bot in BOTS] + [make_token(5).split(":")[1]]:
        assert secret not in our_logs
        assert secret not in dump


# -- the command line ------------------------------------------------------------------------


def test_cli_serves_until_sigterm_and_writes_tokens_only_to_the_env_file(tmp_path: Path) -> None:
    env_file = tmp_path / "sim.env"
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from simulator.cli import main; sys.exit(main(sys.argv[1:]))",
            "--port", "0", "--bots", "2", "--env-file", str(env_file), "--revoke", "bravo_bot",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        first_line = process.stdout.readline()
        url = re.search(r"http://\S+", first_line)
        assert url, first_line
        env = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
        assert env["TGRELAY_SIM_URL"] == url.group(0)
        alpha_token = env["BOT_ALPHA_TOKEN"]

        assert requests.get(f"{url.group(0)}/bot{alpha_token}/getMe", timeout=5).status_code == 200
        bravo = requests.get(f"{url.group(0)}/bot{env['BOT_BRAVO_TOKEN']}/getMe", timeout=5)
        assert bravo.status_code == 401
    finally:
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=10)
    assert process.returncode == 0
    assert alpha_token.split(":")[1] not in first_line + stdout + stderr
    assert oct(env_file.stat().st_mode & 0o777) == "0o600"


def test_cli_reports_a_usage_error_with_exit_code_2() -> None:
    from simulator.cli import main

    assert main(["--migrate", "nonsense", "--port", "0"]) == 2
    assert main(["--no-such-flag"]) == 2
