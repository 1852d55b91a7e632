"""The HTTP API (CONTRACT.md, "HTTP API"): a real relay on a temporary SQLite file, a real
waitress server on loopback, real ``requests`` calls."""

from __future__ import annotations

import json
import logging
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from supervision.http_api import MAX_MESSAGE_BODY_BYTES, HttpApi
from tests.helpers_http import API_TOKEN, SECRETS, Served, make_config, served


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Served]:
    with served(make_config(tmp_path)) as serving:
        yield serving


def unique(prefix: str = "hello") -> str:
    return f"{prefix} {uuid.uuid4().hex}"


def raw_post(api: Served, path: str, data: bytes,
             content_type: str | None = "application/json") -> requests.Response:
    headers = {} if content_type is None else {"Content-Type": content_type}
    return api.session.post(api.url + path, data=data, headers=headers, timeout=60)


# --- POST /v1/messages ----------------------------------------------------------------------


def test_a_new_message_is_accepted_with_202_and_is_pending(api: Served) -> None:
    response = api.post("/v1/messages", {"chat_id": 42, "text": unique()})

    assert response.status_code == 202
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert body == {"id": body["id"], "status": "pending", "duplicate": False}
    assert api.relay.get(body["id"]).status == "pending"


def test_the_same_message_again_is_a_200_duplicate_carrying_the_original_id(api: Served) -> None:
    message = {"chat_id": 42, "text": unique()}
    first = api.post("/v1/messages", message).json()

    again = api.post("/v1/messages", message)

    assert again.status_code == 200
    assert again.json() == {"id": first["id"], "status": "pending", "duplicate": True}
    assert api.get("/v1/stats").json()["counts"]["pending"] == 1


def test_every_optional_field_is_accepted(api: Served) -> None:
    response = api.post("/v1/messages", {
        "chat_id": "@some_channel", "text": "<b>hi</b>", "pool": "ops", "dedup_key": unique("key"),
        "parse_mode": "HTML", "disable_notification": True})

    assert response.status_code == 202
    stored = api.get(f"/v1/messages/{response.json()['id']}").json()
    assert (stored["chat_id"], stored["pool"]) == ("@some_channel", "ops")


def test_a_reused_dedup_key_with_the_same_message_is_a_duplicate(api: Served) -> None:
    message = {"chat_id": 7, "text": unique(), "dedup_key": unique("key")}
    first = api.post("/v1/messages", message).json()

    again = api.post("/v1/messages", message)

    assert (again.status_code, again.json()["id"]) == (200, first["id"])


def test_a_reused_dedup_key_with_another_text_is_a_409_conflict(api: Served) -> None:
    key = unique("key")
    first = api.post("/v1/messages", {"chat_id": 7, "text": unique(), "dedup_key": key}).json()

    conflict = api.post("/v1/messages", {"chat_id": 7, "text": unique(), "dedup_key": key})

    assert conflict.status_code == 409
    assert key in conflict.json()["error"]
    assert str(first["id"]) in conflict.json()["error"]


def test_a_text_of_exactly_4096_code_points_outside_the_bmp_is_accepted(api: Served) -> None:
    response = api.post("/v1/messages", {"chat_id": 1, "text": "\U0001f600" * 4095 + "x"})

    assert response.status_code == 202


BAD_PAYLOADS: list[tuple[str, bytes, str]] = [
    ("empty body", b"", "empty"),
    ("only whitespace", b"  \n", "empty"),
    ("not JSON", b"{chat_id: 1}", "not valid JSON"),
    ("truncated JSON", b'{"chat_id": 1, "text": "hi"', "not valid JSON"),
    ("not UTF-8", b'{"chat_id": 1, "text": "caf\xe9"}', "not valid UTF-8"),
    ("UTF-16", '{"chat_id": 1, "text": "hi"}'.encode("utf-16"), "UTF-8"),
    ("a byte order mark", b'\xef\xbb\xbf{"chat_id": 1, "text": "hi"}', "not valid JSON"),
    ("a JSON array", b'[{"chat_id": 1, "text": "hi"}]', "JSON object"),
    ("a JSON string", b'"hi"', "JSON object"),
    ("JSON null", b"null", "JSON object"),
    ("nesting deeper than the parser allows", b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
     "not valid JSON"),
    ("an integer over the digit limit", b'{"chat_id": 1' + b"0" * 5000 + b', "text": "hi"}',
     "not valid JSON"),
    ("missing text", b'{"chat_id": 1}', "text is required"),
    ("missing chat_id", b'{"text": "hi"}', "chat_id is required"),
    ("empty text", b'{"chat_id": 1, "text": ""}', "text must not be empty"),
    ("blank text", b'{"chat_id": 1, "text": " \\n\\t "}', "text must not be empty"),
    ("numeric text", b'{"chat_id": 1, "text": 5}', "text must be a string"),
    ("null text", b'{"chat_id": 1, "text": null}', "text must be a string"),
    ("array text", b'{"chat_id": 1, "text": ["hi"]}', "text must be a string"),
    ("text over 4096 code points", json.dumps({"chat_id": 1, "text": "x" * 4097}).encode(), "4096"),
    ("text with a lone surrogate", b'{"chat_id": 1, "text": "bad \\ud800 text"}', "surrogate"),
    ("dedup_key with a lone surrogate", b'{"chat_id": 1, "text": "hi", "dedup_key": "\\udfff"}',
     "surrogate"),
    ("boolean chat_id", b'{"chat_id": true, "text": "hi"}', "chat_id"),
    ("fractional chat_id", b'{"chat_id": 1.5, "text": "hi"}', "chat_id"),
    ("NaN chat_id", b'{"chat_id": NaN, "text": "hi"}', "chat_id"),
    ("zero chat_id", b'{"chat_id": 0, "text": "hi"}', "chat_id"),
    ("chat_id beyond 64 bits", b'{"chat_id": 18446744073709551616, "text": "hi"}', "chat_id"),
    ("chat_id that is neither a number nor an @name", b'{"chat_id": "someone", "text": "hi"}',
     "chat_id"),
    ("chat_id @name too short", b'{"chat_id": "@ab", "text": "hi"}', "chat_id"),
    ("object chat_id", b'{"chat_id": {"id": 1}, "text": "hi"}', "chat_id"),
    ("unknown pool", b'{"chat_id": 1, "text": "hi", "pool": "nope"}', "unknown pool 'nope'"),
    ("numeric pool", b'{"chat_id": 1, "text": "hi", "pool": 5}', "pool must be a string"),
    ("unknown field", b'{"chat_id": 1, "text": "hi", "colour": "red"}', "unknown field 'colour'"),
    ("empty dedup_key", b'{"chat_id": 1, "text": "hi", "dedup_key": ""}', "dedup_key"),
    ("numeric dedup_key", b'{"chat_id": 1, "text": "hi", "dedup_key": 5}', "dedup_key"),
    ("overlong dedup_key", json.dumps({"chat_id": 1, "text": "hi", "dedup_key": "k" * 257}).encode(),
     "dedup_key"),
    ("unknown parse_mode", b'{"chat_id": 1, "text": "hi", "parse_mode": "XML"}', "parse_mode"),
    ("string disable_notification", b'{"chat_id": 1, "text": "hi", "disable_notification": "yes"}',
     "disable_notification"),
]


@pytest.mark.parametrize(("payload", "reason"), [(payload, reason) for _, payload, reason in BAD_PAYLOADS],
                         ids=[name for name, _, _ in BAD_PAYLOADS])
def test_a_bad_payload_is_a_400_with_a_reason_and_stores_nothing(api: Served, payload: bytes,
                                                                  reason: str) -> None:
    response = raw_post(api, "/v1/messages", payload)

    assert response.status_code == 400
    assert response.headers["Content-Type"] == "application/json"
    assert reason in response.json()["error"]
    assert sum(api.get("/v1/stats").json()["counts"].values()) == 0


def test_a_json_content_type_with_a_utf8_charset_is_accepted(api: Served) -> None:
    response = raw_post(api, "/v1/messages", json.dumps({"chat_id": 1, "text": unique()}).encode(),
                        content_type="application/json; charset=UTF-8")

    assert response.status_code == 202


def test_a_body_without_a_content_type_is_read_as_json(api: Served) -> None:
    response = raw_post(api, "/v1/messages", json.dumps({"chat_id": 1, "text": unique()}).encode(),
                        content_type=None)

    assert response.status_code == 202


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "application/json; charset=latin-1"])
def test_a_body_that_says_it_is_not_utf8_json_is_a_415(api: Served, content_type: str) -> None:
    response = raw_post(api, "/v1/messages", b'{"chat_id": 1, "text": "hi"}', content_type=content_type)

    assert response.status_code == 415
    assert "application/json" in response.json()["error"]


def test_a_single_message_body_over_one_mebibyte_is_a_413(api: Served) -> None:
    body = json.dumps({"chat_id": 1, "text": "hi", "pool": "x" * MAX_MESSAGE_BODY_BYTES}).encode()

    response = raw_post(api, "/v1/messages", body)

    assert response.status_code == 413
    assert "at most" in response.json()["error"]


def test_a_body_over_the_server_limit_is_a_413_even_when_chunked(tmp_path: Path) -> None:
    with served(make_config(tmp_path), max_body_bytes=4096) as api:
        body = json.dumps({"messages": [{"chat_id": 1, "text": "x" * 4000}] * 2}).encode()

        declared = raw_post(api, "/v1/messages/batch", body)
        chunked = api.session.post(api.url + "/v1/messages/batch", data=iter([body[:3000], body[3000:]]),
                                   headers={"Content-Type": "application/json"}, timeout=60)

        assert (declared.status_code, chunked.status_code) == (413, 413)


def test_the_largest_legal_batch_fits_even_with_every_character_escaped(api: Served) -> None:
    # 1000 texts of 4096 characters outside the BMP: json.dumps escapes each as a 12-byte pair.
    texts = [chr(0x1F600 + n % 64) * 4095 + str(n % 10) for n in range(1000)]
    body = json.dumps({"messages": [{"chat_id": n + 1, "text": text} for n, text in enumerate(texts)]})
    assert len(body) > 49_000_000

    response = raw_post(api, "/v1/messages/batch", body.encode())

    assert response.status_code == 200
    assert {result["http_status"] for result in response.json()["results"]} == {202}


# --- POST /v1/messages/batch ----------------------------------------------------------------


def test_a_batch_answers_one_result_per_message_in_order(api: Served) -> None:
    earlier = api.post("/v1/messages", {"chat_id": 5, "text": "already here"}).json()
    key = unique("key")
    messages: list[Any] = [
        {"chat_id": 1, "text": "first"},
        {"chat_id": 1, "text": ""},
        {"chat_id": 5, "text": "already here"},
        "not an object",
        {"chat_id": 2, "text": "second", "pool": "missing"},
        {"chat_id": 3, "text": "third", "dedup_key": key},
        {"chat_id": 3, "text": "another", "dedup_key": key},
        {"chat_id": 1, "text": "first"},
    ]

    response = api.post("/v1/messages/batch", {"messages": messages})

    assert response.status_code == 200
    results = response.json()["results"]
    assert [result["http_status"] for result in results] == [202, 400, 200, 400, 400, 202, 409, 200]
    assert results[0]["status"] == "pending" and results[0]["duplicate"] is False
    assert "text must not be empty" in results[1]["error"]
    assert results[2] == {"id": earlier["id"], "status": "pending", "duplicate": True, "http_status": 200}
    assert "JSON object" in results[3]["error"]
    assert "unknown pool" in results[4]["error"]
    assert key in results[6]["error"]
    assert results[7]["id"] == results[0]["id"] and results[7]["duplicate"] is True
    assert api.get("/v1/stats").json()["counts"]["pending"] == 3


def test_an_empty_batch_has_no_results(api: Served) -> None:
    response = api.post("/v1/messages/batch", {"messages": []})

    assert (response.status_code, response.json()) == (200, {"results": []})


def test_a_batch_of_1000_is_accepted_and_1001_is_a_400(api: Served) -> None:
    batch = [{"chat_id": 1, "text": f"message {n}"} for n in range(1001)]

    too_many = api.post("/v1/messages/batch", {"messages": batch})
    just_right = api.post("/v1/messages/batch", {"messages": batch[:1000]})

    assert too_many.status_code == 400
    assert "at most 1000" in too_many.json()["error"]
    assert just_right.status_code == 200
    assert len(just_right.json()["results"]) == 1000


@pytest.mark.parametrize(("body", "reason"), [
    (b'{"messages": {"chat_id": 1, "text": "hi"}}', "messages must be an array"),
    (b'{"messages": null}', "messages must be an array"),
    (b"{}", "messages must be an array"),
    (b'[{"chat_id": 1, "text": "hi"}]', "JSON object"),
    (b'{"messages": [], "extra": 1}', "unknown field 'extra'"),
    (b'{"messages": [', "not valid JSON"),
], ids=["an object", "null", "missing", "a bare array", "an unknown field", "broken JSON"])
def test_a_batch_whose_messages_are_not_a_list_is_a_400(api: Served, body: bytes, reason: str) -> None:
    response = raw_post(api, "/v1/messages/batch", body)

    assert response.status_code == 400
    assert reason in response.json()["error"]


# --- GET /v1/messages/{id} ------------------------------------------------------------------


def test_a_stored_message_is_read_back_by_id(api: Served) -> None:
    accepted = api.post("/v1/messages", {"chat_id": -100123, "text": unique()}).json()

    response = api.get(f"/v1/messages/{accepted['id']}")

    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"id", "chat_id", "pool", "status", "retry_count", "telegram_message_id",
                         "token", "last_error", "created_at", "updated_at"}
    assert (body["id"], body["chat_id"], body["pool"], body["status"]) == (
        accepted["id"], -100123, "default", "pending")


@pytest.mark.parametrize("message_id", ["999", "0", "9" * 25])
def test_an_unknown_message_id_is_a_404(api: Served, message_id: str) -> None:
    response = api.get(f"/v1/messages/{message_id}")

    assert response.status_code == 404
    assert "no message" in response.json()["error"]


@pytest.mark.parametrize("message_id", ["abc", "-1", "1.5", "1e3", "%20"])
def test_a_message_id_that_is_not_a_positive_integer_is_a_400(api: Served, message_id: str) -> None:
    response = api.get(f"/v1/messages/{message_id}")

    assert response.status_code == 400
    assert "positive integer" in response.json()["error"]


# --- tokens, stats, health ------------------------------------------------------------------


def test_tokens_are_an_empty_list_while_the_sending_side_is_not_running(api: Served) -> None:
    assert api.get("/v1/tokens").json() == {"tokens": []}


def test_validating_a_token_is_a_503_while_the_sending_side_is_not_running(api: Served) -> None:
    response = api.post("/v1/tokens/alpha/validate")

    assert response.status_code == 503
    assert "Retry-After" in response.headers


class FixedSendingSide:
    """The sending side's interface (relay.SendingSide) with fixed answers: that side is
    built separately, and these tests are about how the API passes its answers through."""

    def notify_accepted(self, pools: set[str]) -> None:
        pass

    def stop(self, drain_seconds: float) -> None:
        pass

    def statistics(self) -> dict[str, Any]:
        return {"in_flight": 0, "states": {"healthy"}}

    def tokens(self) -> list[dict[str, Any]]:
        return [{"name": "alpha", "pool": "default", "state": "healthy", "weight": 2, "sent": 3,
                 "failed": 0, "rate_limited_until": None}]

    def validate_token(self, name: str) -> dict[str, Any]:
        if name != "alpha":
            raise KeyError(name)
        return {"name": "alpha", "valid": True, "bot_username": "alpha_bot", "error": None}


def test_tokens_and_their_validation_come_from_the_sending_side(api: Served) -> None:
    api.relay.sending = FixedSendingSide()

    tokens = api.get("/v1/tokens")
    valid = api.post("/v1/tokens/alpha/validate")
    unknown = api.post("/v1/tokens/nobody/validate")

    assert tokens.json()["tokens"][0]["name"] == "alpha"
    assert valid.json() == {"name": "alpha", "valid": True, "bot_username": "alpha_bot", "error": None}
    assert unknown.status_code == 404
    assert "nobody" in unknown.json()["error"]
    assert api.get("/v1/stats").json()["sending"]["states"] == ["healthy"]


def test_stats_count_messages_by_status(api: Served) -> None:
    api.post("/v1/messages/batch", {"messages": [{"chat_id": 1, "text": f"m{n}"} for n in range(3)]})

    stats = api.get("/v1/stats").json()

    assert stats["counts"] == {"pending": 3, "sent": 0, "confirmed": 0, "failed": 0}
    assert stats["delivery_rate"] is None
    assert stats["db_bytes"] > 0


def test_health_is_200_without_credentials_while_the_store_answers(api: Served) -> None:
    response = requests.get(api.url + "/healthz", timeout=10)

    assert (response.status_code, response.json()) == (200, {"ok": True})


def test_health_and_acceptance_are_503_when_the_store_has_stopped(api: Served) -> None:
    api.relay.store.actor.stop()

    health = api.get("/healthz")
    accepted = api.post("/v1/messages", {"chat_id": 1, "text": unique()})

    assert health.status_code == 503
    assert accepted.status_code == 503
    assert accepted.headers["Retry-After"].isdigit()
    assert "store" in accepted.json()["error"]


def test_a_full_database_is_a_503_and_nothing_half_written_remains(tmp_path: Path) -> None:
    with served(make_config(tmp_path, store_extra="max_db_megabytes = 1")) as api:
        accepted = 0
        for n in range(2000):
            response = api.post("/v1/messages", {"chat_id": 1, "text": f"{n} " + "x" * 4000})
            if response.status_code != 202:
                break
            accepted += 1

        assert response.status_code == 503
        assert "full" in response.json()["error"]
        assert response.headers["Retry-After"].isdigit()
        assert 0 < accepted < 2000
        assert api.get("/v1/stats").json()["counts"]["pending"] == accepted
        assert api.get("/healthz").status_code == 200


# --- authentication -------------------------------------------------------------------------


@pytest.mark.parametrize("authorization", [None, "", "Bearer", "Bearer wrong-token", f"Basic {API_TOKEN}",
                                           f"Bearer {API_TOKEN}x", "Bearer caf\u00e9"])
def test_a_missing_or_wrong_bearer_token_is_a_401(api: Served, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization.encode("latin-1")}

    for method, path in [("POST", "/v1/messages"), ("GET", "/v1/stats"), ("GET", "/v1/tokens"),
                         ("GET", "/v1/messages/1"), ("GET", "/nowhere")]:
        response = requests.request(method, api.url + path, headers=headers,
                                    json={"chat_id": 1, "text": "hi"}, timeout=10)

        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert API_TOKEN not in response.text
    assert sum(api.get("/v1/stats").json()["counts"].values()) == 0


def test_the_bearer_scheme_is_case_insensitive(api: Served) -> None:
    response = requests.get(api.url + "/v1/stats", headers={"Authorization": f"bearer {API_TOKEN}"},
                            timeout=10)

    assert response.status_code == 200


def test_no_credentials_are_needed_when_no_auth_token_is_configured(tmp_path: Path) -> None:
    with served(make_config(tmp_path, auth_token="")) as api:
        response = requests.post(api.url + "/v1/messages", json={"chat_id": 1, "text": "hi"}, timeout=10)

        assert response.status_code == 202


# --- routing --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/v1", "/v1/message", "/v1/messages/1/extra", "/v1/tokens/alpha",
                                  "/v1/tokens//validate", "/v2/messages"])
def test_an_unknown_path_is_a_404(api: Served, path: str) -> None:
    response = api.get(path)

    assert response.status_code == 404
    assert response.json()["error"]


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("GET", "/v1/messages", "POST"),
    ("PUT", "/v1/messages", "POST"),
    ("GET", "/v1/messages/batch", "POST"),
    ("DELETE", "/v1/messages/1", "GET"),
    ("POST", "/v1/stats", "GET"),
    ("POST", "/v1/tokens", "GET"),
    ("GET", "/v1/tokens/alpha/validate", "POST"),
    ("POST", "/healthz", "GET"),
])
def test_a_wrong_method_is_a_405_naming_the_allowed_one(api: Served, method: str, path: str,
                                                        allowed: str) -> None:
    response = api.session.request(method, api.url + path, timeout=10)

    assert response.status_code == 405
    assert response.headers["Allow"] == allowed


# --- concurrency, secrets, failures ---------------------------------------------------------


def test_sixteen_threads_posting_the_same_message_get_one_202_and_fifteen_duplicates(api: Served) -> None:
    message: dict[str, Any] = {"chat_id": 99, "text": unique()}
    barrier = threading.Barrier(16)
    answers: list[tuple[int, int]] = []

    def post() -> None:
        with requests.Session() as session:
            session.headers["Authorization"] = f"Bearer {API_TOKEN}"
            barrier.wait()
            response = session.post(api.url + "/v1/messages", json=message, timeout=30)
            answers.append((response.status_code, response.json()["id"]))

    threads = [threading.Thread(target=post) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(status for status, _ in answers) == [200] * 15 + [202]
    assert len({message_id for _, message_id in answers}) == 1
    assert api.get("/v1/stats").json()["counts"]["pending"] == 1


class LeakySendingSide(FixedSendingSide):
    """A sending side that puts a secret where it must not be (DESIGN.md 8's safety net)."""

    def validate_token(self, name: str) -> dict[str, Any]:
        return {"name": name, "valid": False, "bot_username": None,
                "error": f"getMe failed: https://api.telegram.org/bot{SECRETS[0]}/getMe"}


def test_no_token_secret_appears_in_any_response(api: Served) -> None:
    api.relay.sending = LeakySendingSide()
    secret_shaped: list[tuple[str, str, Any]] = [
        ("POST", "/v1/messages", {"chat_id": 1, "text": "hi", SECRETS[0]: 1}),
        ("POST", "/v1/messages", {"chat_id": 1, "text": "hi", "pool": SECRETS[1]}),
        ("POST", "/v1/messages", {"chat_id": SECRETS[0], "text": "hi"}),
        ("POST", "/v1/messages", {"chat_id": 1, "text": f"token {SECRETS[0]}", "dedup_key": "k"}),
        ("POST", "/v1/messages", {"chat_id": 1, "text": "other", "dedup_key": "k"}),
        ("POST", "/v1/messages/batch", {"messages": [{"chat_id": 1, "text": "x", "pool": SECRETS[0]}]}),
        ("POST", f"/v1/tokens/{SECRETS[0]}/validate", None),
        ("POST", "/v1/tokens/alpha/validate", None),
        ("GET", f"/v1/messages/{SECRETS[0]}", None),
        ("GET", f"/{SECRETS[1]}", None),
        ("GET", "/v1/messages/1", None),
        ("GET", "/v1/tokens", None),
        ("GET", "/v1/stats", None),
        ("GET", "/healthz", None),
    ]
    seen = []
    for method, path, body in secret_shaped:
        response = api.session.request(method, api.url + path, json=body, timeout=10)
        assert response.status_code < 500, (path, response.text)
        seen.append(response.text + json.dumps(dict(response.headers)))

    everything = "\n".join(seen)
    assert not [secret for secret in SECRETS if secret in everything]
    assert SECRETS[0].split(":")[1] not in everything


class BrokenSendingSide(FixedSendingSide):
    def statistics(self) -> dict[str, Any]:
        raise RuntimeError(f"bug while holding {SECRETS[0]}")


def test_an_unexpected_error_is_a_generic_500_and_is_logged(api: Served,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    api.relay.sending = BrokenSendingSide()

    with caplog.at_level(logging.ERROR, logger="tgrelay.http"):
        response = api.get("/v1/stats")

    assert response.status_code == 500
    assert response.json() == {"error": "internal error; the relay's log has the details"}
    assert SECRETS[0] not in response.text
    assert "GET /v1/stats" in caplog.text
    assert "RuntimeError" in caplog.text


# --- the server -----------------------------------------------------------------------------


def test_port_zero_binds_a_free_port_that_url_reports(api: Served) -> None:
    assert api.api.port > 0
    assert api.url == f"http://127.0.0.1:{api.api.port}"


def test_a_taken_port_fails_when_the_api_is_created(api: Served, tmp_path: Path) -> None:
    taken = make_config(tmp_path, listen=f"127.0.0.1:{api.api.port}")

    with pytest.raises(OSError, match="in use"):
        HttpApi(api.relay, taken.http)


def test_stopping_the_server_closes_idle_keep_alive_connections(tmp_path: Path) -> None:
    with served(make_config(tmp_path)) as api:
        assert api.get("/v1/stats").status_code == 200
        port = api.api.port
        connection = socket.create_connection(("127.0.0.1", port))
        api.api.stop(grace_seconds=1)

        connection.settimeout(5)
        try:
            assert connection.recv(1) == b""
        except ConnectionResetError:
            pass  # closed before it was accepted: the peer resets it
        finally:
            connection.close()
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
