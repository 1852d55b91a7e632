"""Configuration: defaults, ${VAR} substitution, and an error naming the key for every mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.errors import ConfigError
from supervision.config import load_config, parse_config, resolve_config_path
from tests.conftest import fake_token

TOKEN = fake_token()
POOL = f'[pools.default]\n[[pools.default.tokens]]\nname = "alpha"\ntoken = "{TOKEN}"\n'


def test_an_empty_file_gives_the_documented_defaults() -> None:
    config = parse_config("", environ={})
    assert config.store.path == "var/tgrelay.db" and config.store.synchronous == "full"
    assert config.store.retention_days == 30 and config.dedup.window_seconds == 300
    assert config.dedup.ttl_seconds == 86400 and config.telegram.per_group_per_minute == 20
    assert config.http.listen == "127.0.0.1:8780" and config.statsd is None and config.pools == {}


def test_the_shipped_example_config_is_valid() -> None:
    example = Path(__file__).parents[1] / "conf" / "tgrelay.toml"
    environ = {"TGRELAY_API_TOKEN": "secret", "BOT_ALPHA_TOKEN": TOKEN,
               "BOT_BETA_TOKEN": fake_token(987654321), "BOT_OPS_TOKEN": fake_token(555555555)}
    config = parse_config(example.read_text(), environ=environ)
    assert [token.name for _, token in config.tokens()]


def test_environment_variables_are_substituted() -> None:
    config = parse_config('[pools.default]\n[[pools.default.tokens]]\nname = "alpha"\n'
                          'token = "${BOT_ALPHA_TOKEN}"\nweight = 3\n', environ={"BOT_ALPHA_TOKEN": TOKEN})
    (pool_name, token), = config.tokens()
    assert (pool_name, token.name, token.token, token.weight, token.max_per_second) == (
        "default", "alpha", TOKEN, 3.0, 30.0)


def test_a_token_secret_never_appears_in_the_config_repr() -> None:
    config = parse_config(POOL, environ={})
    assert TOKEN not in repr(config)


@pytest.mark.parametrize(("text", "key", "problem"), [
    ("[store]\npaht = 'x'\n", "store.paht", "unknown key"),
    ("[storage]\n", "storage", "unknown key"),
    ("[store]\nsynchronous = 'sometimes'\n", "store.synchronous", '"full" or "normal"'),
    ("[store]\nretention_days = 'thirty'\n", "store.retention_days", "must be a number"),
    ("[store]\nretention_days = 0\n", "store.retention_days", "greater than 0"),
    ("[dedup]\nwindow_seconds = true\n", "dedup.window_seconds", "must be a number"),
    ("[dedup]\nwindow_seconds = 600\nttl_seconds = 60\n", "dedup.ttl_seconds", "at least"),
    ("[telegram]\napi_base_url = 'ftp://x'\n", "telegram.api_base_url", "http"),
    ("[http]\nlisten = '0.0.0.0:8780'\n", "http.auth_token", "required when http.listen"),
    ("[http]\nlisten = 'nonsense'\n", "http.listen", "HOST:PORT"),
    ("[http]\nauth_token = '${NOT_SET_ANYWHERE}'\n", "http.auth_token", "NOT_SET_ANYWHERE is not set"),
    ("[statsd]\nport = 70000\n", "statsd.port", "between"),
    ("[pools.default]\n", "pools.default.tokens", "empty"),
    ("[pools.default]\ntokens = []\n", "pools.default.tokens", "empty"),
    ('[pools.default]\n[[pools.default.tokens]]\nname = "alpha"\n', "pools.default.tokens[0].token", "required"),
    ('[pools.default]\n[[pools.default.tokens]]\nname = "alpha"\ntoken = "12345:short"\n',
     "pools.default.tokens[0].token", "not a bot token"),
    (POOL + "weight = -1\n", "pools.default.tokens[0].weight", "greater than 0"),
    (POOL + "colour = 'red'\n", "pools.default.tokens[0].colour", "unknown key"),
    (POOL + f'[[pools.default.tokens]]\nname = "alpha"\ntoken = "{fake_token(987654321)}"\n',
     "pools.default.tokens[1].name", "duplicate token name"),
    (POOL + f'[pools.ops]\n[[pools.ops.tokens]]\nname = "alpha"\ntoken = "{fake_token(987654321)}"\n',
     "pools.ops.tokens[0].name", "duplicate token name"),
    (POOL + "[alerts]\nchat_id = -100\npool = 'ops'\n", "alerts.pool", "not defined"),
    ("[store\n", "", "not valid TOML"),
])
def test_each_mistake_is_an_error_naming_the_key_and_the_problem(text: str, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config(text, environ={})
    assert raised.value.key == key
    assert problem in str(raised.value)


def test_a_malformed_token_error_does_not_echo_the_secret() -> None:
    secret = "999999:has a space+and-punctuation!-so-it-is-bad"
    with pytest.raises(ConfigError) as raised:
        parse_config(f'[pools.p]\n[[pools.p.tokens]]\nname = "a"\ntoken = "{secret}"\n', environ={})
    assert secret not in str(raised.value)


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.toml")


def test_the_config_path_comes_from_the_flag_then_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TGRELAY_CONFIG", "/etc/tgrelay.toml")
    assert resolve_config_path("mine.toml") == Path("mine.toml")
    assert resolve_config_path(None) == Path("/etc/tgrelay.toml")
    monkeypatch.delenv("TGRELAY_CONFIG")
    assert resolve_config_path(None) == Path("conf/tgrelay.toml")
