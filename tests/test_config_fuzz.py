"""Hostile config files: whatever the file holds, the answer is a Config or a ConfigError naming the
key and the problem, never another exception; ``tgrelay check-config`` exits 2 without a traceback.

Two generators: arbitrary and TOML-flavoured garbage (mostly not TOML at all), and well-formed
TOML made from a valid config by setting values of the wrong type or range, adding unknown keys
and deleting keys. The tests marked ``xfail(strict=True)`` pin bugs found here; each turns into
a failure (XPASS) once the bug is fixed, so the mark can go.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from datetime import date, datetime, time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.errors import ConfigError
from supervision.config import Config, load_config, parse_config
from tests.conftest import fake_token
from tests.helpers_http import REPO

SECRETS = (fake_token(111111111), fake_token(222222222), fake_token(333333333))
ENVIRON = {"TGRELAY_API_TOKEN": "api-token-0123456789", "BOT_ALPHA_TOKEN": SECRETS[0]}
VARIABLES = ("${TGRELAY_API_TOKEN}", "${BOT_ALPHA_TOKEN}", "${NOT_SET}", "${", "$}", "${1}")

BASE: dict[str, Any] = {
    "store": {"path": "var/fuzz.db", "synchronous": "normal", "retention_days": 30,
              "archive_path": "", "busy_timeout_ms": 5000, "max_db_megabytes": 0,
              "integrity_check_minutes": 60},
    "dedup": {"window_seconds": 300, "ttl_seconds": 86400},
    "telegram": {"api_base_url": "https://api.telegram.org", "request_timeout_seconds": 10,
                 "per_chat_per_second": 1, "per_group_per_minute": 20},
    "http": {"listen": "0.0.0.0:8780", "auth_token": "${TGRELAY_API_TOKEN}"},
    "statsd": {"host": "127.0.0.1", "port": 8125, "prefix": "tgrelay"},
    "alerts": {"chat_id": -1001234567890, "pool": "ops", "delivery_rate_threshold": 0.95,
               "delivery_rate_window_seconds": 300, "backlog_age_seconds": 600, "repeat_minutes": 15},
    "pools": {
        "default": {"tokens": [
            {"name": "alpha", "token": "${BOT_ALPHA_TOKEN}", "weight": 2, "max_per_second": 30},
            {"name": "beta", "token": SECRETS[1]}]},
        "ops": {"tokens": [{"name": "ops-bot", "token": SECRETS[2]}]},
    },
}

# --- a small TOML writer: every table inline, so any nesting is one `key = value` line --------


def toml_string(text: str) -> str:
    # JSON's escapes are TOML's, except that TOML also wants DEL escaped and has no surrogates.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value).__name__)


def toml_document(document: dict[str, Any]) -> str:
    return "".join(f"{toml_string(key)} = {toml_value(value)}\n" for key, value in document.items())


# --- strategies -------------------------------------------------------------------------------

scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, -1, 1, 65535, 65536, 2**31, 2**63 - 1]),
    st.floats(),
    st.text(max_size=40),
    st.sampled_from(VARIABLES),
    st.text(max_size=10).map(lambda text: f"x${{{text}}}y"),
    st.sampled_from(["full", "normal", "", "127.0.0.1:0", "[::1]:80", "localhost:99999",
                     "http://", "https://x", "@channel", fake_token(), fake_token() + "\n"]),
    st.datetimes(), st.dates(), st.times(),
)
toml_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)


def paths(document: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path in ``document`` (list items by index), tables and leaves alike."""
    found: list[tuple[Any, ...]] = []
    items = document.items() if isinstance(document, dict) else (
        enumerate(document) if isinstance(document, list) else ())
    for key, value in items:
        found.append((*prefix, key))
        found.extend(paths(value, (*prefix, key)))
    return found


def tables(document: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    return [()] + [path for path in paths(document) if isinstance(resolve(document, path), dict)]


def resolve(document: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        document = document[key]
    return document


@st.composite
def mutated_configs(draw: st.DrawFn) -> dict[str, Any]:
    """BASE with one to three keys set to any TOML value, added, or deleted."""
    document = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["set", "add", "delete"]))
        if action == "add":
            path = draw(st.sampled_from(tables(document)))
            # An empty top-level key is a known bug (see the xfail test below), not drawn here.
            resolve(document, path)[draw(st.text(min_size=0 if path else 1, max_size=12))] = draw(
                toml_values)
            continue
        candidates = paths(document)
        if not candidates:
            continue
        path = draw(st.sampled_from(candidates))
        parent = resolve(document, path[:-1])
        if action == "set":
            parent[path[-1]] = draw(toml_values)
        elif isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent.pop(path[-1])
    return document


FRAGMENTS = ["[store]", "[pools.default]", "[[pools.default.tokens]]", "[http", "]]", "[", "]",
             "{", "}", "=", " = ", ",", ".", '"', "'", '"""', "'''", "\\", "\\u", "\\U0011FFFF",
             "\n", "\r", "\t", "#", "key", "name", "token", "1", "-1", "1e999", "0x1F", "nan",
             "true", "1979-05-27", "07:32:00", "${X}", "\x00", "\x7f", "é", "\ufeff"]
garbage = st.one_of(
    st.text(max_size=300),
    st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=5), max_size=40).map("".join),
)


def known_key(error: ConfigError, document: dict[str, Any]) -> bool:
    return any(error.key == key or error.key.startswith((f"{key}.", f"{key}["))
               for key in document)


# --- the properties ---------------------------------------------------------------------------


def test_the_base_config_of_these_tests_is_valid() -> None:
    config = parse_config(toml_document(BASE), environ=ENVIRON)
    assert [token.name for _, token in config.tokens()] == ["alpha", "beta", "ops-bot"]


@settings(max_examples=600, deadline=None)
@given(garbage)
def test_any_text_is_a_config_or_a_config_error_with_a_problem(text: str) -> None:
    try:
        config = parse_config(text, environ=ENVIRON)
    except ConfigError as error:
        assert error.problem
        assert error.key or error.problem.startswith("not valid TOML: "), error
    else:
        assert isinstance(config, Config)


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_configs())
def test_well_formed_toml_with_wrong_keys_types_or_values_is_a_config_error_naming_the_key(
        document: dict[str, Any]) -> None:
    try:
        config = parse_config(toml_document(document), environ=ENVIRON)
    except ConfigError as error:
        assert error.key and error.problem, error
        assert known_key(error, document), f"{error.key!r} is not a key of the file"
        assert not any(secret in str(error) for secret in SECRETS), "a token secret leaked"
    else:
        assert isinstance(config, Config)


# --- the command line -------------------------------------------------------------------------


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "supervision.cli", "check-config", "-c", str(path)],
                          cwd=REPO, capture_output=True, text=True, timeout=60, check=False)


def assert_refused_without_a_traceback(result: subprocess.CompletedProcess[str], key: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("config error: "), result.stderr
    assert key in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize(("text", "key"), [
    ("[store\npath = 1", "not valid TOML"),
    ('[store]\nretention_days = "thirty"', "store.retention_days"),
    ("[store]\nsynchronous = 1979-05-27", "store.synchronous"),
    ("[telegram]\nper_chat_per_second = -1", "telegram.per_chat_per_second"),
    ('[pools.default]\n[[pools.default.tokens]]\nname = "a"\ntoken = "${NOT_SET_ANYWHERE}"',
     "pools.default.tokens[0].token"),
    ('[pools.default]\n[[pools.default.tokens]]\nname = "a"\ntoken = "not-a-token"\nspeed = 3',
     "pools.default.tokens[0].speed"),
    ("[[store]]\n", "store"),
])
def test_check_config_exits_2_naming_the_key_for_a_hand_picked_mistake(
        tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "tgrelay.toml"
    path.write_text(text, encoding="utf-8")

    assert_refused_without_a_traceback(check_config(path), key)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutated_configs())
def test_check_config_exits_2_naming_the_key_for_generated_mistakes(
        tmp_path: Path, document: dict[str, Any]) -> None:
    text = toml_document(document)
    try:
        parse_config(text, environ=ENVIRON)
    except ConfigError as error:
        expected = error.key
    else:
        return  # a valid mutation: nothing to refuse
    path = tmp_path / "generated.toml"
    path.write_text(text, encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "supervision.cli", "check-config", "-c", str(path)],
                            cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
                            env={**ENVIRON, "PATH": "/usr/bin:/bin"})

    assert_refused_without_a_traceback(result, expected)


# --- bugs these generators found, fixed since -----------------------------------------


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[store]\npath = "caf\xe9.db"\n')

    with pytest.raises(ConfigError):
        load_config(path)


def test_deeply_nested_toml_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        parse_config("store = " + "[" * 2000, environ={})


@pytest.mark.parametrize("setting", ["[store]\nretention_days = nan",
                                     "[telegram]\nrequest_timeout_seconds = nan",
                                     "[telegram]\nper_chat_per_second = inf",
                                     "[dedup]\nwindow_seconds = nan"])
def test_a_number_that_is_not_finite_is_a_config_error(setting: str) -> None:
    with pytest.raises(ConfigError):
        parse_config(setting, environ={})


@pytest.mark.parametrize(("name", "token"), [("alpha\n", fake_token()), ("alpha", fake_token() + "\n")])
def test_a_token_name_or_secret_with_a_trailing_newline_is_a_config_error(name: str, token: str) -> None:
    document = {"pools": {"default": {"tokens": [{"name": name, "token": token}]}}}

    with pytest.raises(ConfigError):
        parse_config(toml_document(document), environ={})


def test_an_unknown_empty_top_level_key_is_named_in_the_error() -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config('"" = 1\n', environ={})

    assert refused.value.key
